//! The deterministic byte stream the test server sends for large transfers, and a digest
//! to compare both ends by. Both sides generate the same stream from the same seed, so the
//! test checks every byte that arrived without keeping 100 MB in memory.

use std::io::{self, Write};

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

    /// Writes the next `n` bytes of the stream to `out`, a chunk at a time (the server's
    /// `/bytes/N` answer, the client's upload, the expected digest).
    pub fn write_to(&mut self, out: &mut impl Write, n: u64) -> io::Result<()> {
        let mut buf = vec![0u8; CHUNK.min(n as usize)];
        let mut left = n;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            self.fill(&mut buf[..k]);
            out.write_all(&buf[..k])?;
            left -= k as u64;
        }
        Ok(())
    }
}

/// How many bytes [`Pattern::write_to`] makes and writes at once.
const CHUNK: usize = 256 * 1024;

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

/// Hashing as a sink: `io::copy` and [`Pattern::write_to`] can feed the digest.
impl Write for Fnv64 {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.update(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Default for Fnv64 {
    fn default() -> Self {
        Self::new()
    }
}

/// The digest of the first `len` bytes of [`Pattern::new`].
pub fn pattern_digest(len: u64) -> u64 {
    let mut d = Fnv64::new();
    Pattern::new()
        .write_to(&mut d, len)
        .expect("hashing into Fnv64 never fails");
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
    fn written_stream_is_the_filled_stream() {
        let n = CHUNK as u64 + 7; // more than one chunk
        let mut written = Vec::new();
        Pattern::new()
            .write_to(&mut written, n)
            .expect("write to a Vec");
        let mut filled = vec![0u8; n as usize];
        Pattern::new().fill(&mut filled);
        assert_eq!(written, filled);
        let mut d = Fnv64::new();
        d.update(&filled);
        assert_eq!(pattern_digest(n), d.value());
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
