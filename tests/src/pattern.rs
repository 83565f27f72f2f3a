//! The deterministic byte stream the test server sends for large transfers, and a digest
//! to compare both ends by. Both sides generate the same stream from the same seed, so the
//! test checks every byte that arrived without keeping 100 MB in memory.

/// An endless, deterministic stream of bytes (xorshift64*; any seed but 0).
#[derive(Clone, Debug)]
pub struct Pattern {
    state: u64,
    buf: [u8; 8],
    used: usize,
}

impl Pattern {
    pub const SEED: u64 = 0x9E37_79B9_7F4A_7C15;

    pub fn new() -> Self {
        Self::with_seed(Self::SEED)
    }

    pub fn with_seed(seed: u64) -> Self {
        Self {
            state: seed.max(1),
            buf: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes()
    }

    /// Fills `out` with the next bytes of the stream.
    pub fn fill(&mut self, out: &mut [u8]) {
        for b in out.iter_mut() {
            if self.used == 8 {
                self.buf = self.next_word();
                self.used = 0;
            }
            *b = self.buf[self.used];
            self.used += 1;
        }
    }
}

impl Default for Pattern {
    fn default() -> Self {
        Self::new()
    }
}

/// FNV-1a, 64 bit: order-sensitive, so a reordered or repeated chunk changes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fnv64(u64);

impl Fnv64 {
    pub fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    pub fn value(self) -> u64 {
        self.0
    }
}

impl Default for Fnv64 {
    fn default() -> Self {
        Self::new()
    }
}

/// The digest of the first `len` bytes of [`Pattern::new`].
pub fn pattern_digest(len: u64) -> u64 {
    let mut p = Pattern::new();
    let mut d = Fnv64::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        d.update(&buf[..n]);
        left -= n as u64;
    }
    d.value()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_does_not_change_the_stream() {
        let mut a = Pattern::new();
        let mut whole = [0u8; 100];
        a.fill(&mut whole);
        let mut b = Pattern::new();
        let mut parts = [0u8; 100];
        let (x, y) = parts.split_at_mut(13);
        b.fill(x);
        b.fill(y);
        assert_eq!(whole, parts);
    }

    #[test]
    fn digest_sees_order() {
        let mut d1 = Fnv64::new();
        d1.update(b"ab");
        let mut d2 = Fnv64::new();
        d2.update(b"ba");
        assert_ne!(d1.value(), d2.value());
        assert_ne!(pattern_digest(1000), pattern_digest(1001));
    }
}
