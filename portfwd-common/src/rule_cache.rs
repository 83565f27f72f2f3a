//! The rule cache: copies of the rules maps' entries (`RULES_V4` / `RULES_V6`, keys
//! and values as they are) in an array map, [`RULE_CACHE_V4`] / [`RULE_CACHE_V6`].
//!
//! Why: the verifier inlines an array lookup (a bounds check and an add), while a
//! hash-map lookup is a call into the kernel, which hashes the key and walks a bucket.
//! On CPUs whose call and return mitigations are costly (retpolines, AMD's SRSO
//! "Safe RET") that call was half of what a packet for a published port cost
//! (BPF_PROG_RUN, XDP exact hit: +70 ns over an empty program, +37 ns without it).
//!
//! Direct-mapped: a key has one slot ([`CachedRule::slot`], a multiplicative hash).
//! The daemon writes an entry after the rules map gains or changes its key, if the
//! slot is free or holds that key; it clears the slot before the key leaves the rules
//! map. A key whose slot holds another key (a collision) is served by the rules map.
//! The daemon's write is a plain copy, which a packet on another CPU may read half
//! done: each entry carries a check over its key and backend, and the kernel takes an
//! entry only if the check matches the key it looked for and the backend it read
//! ([`CachedRule::backend_for`]). The rules map stays the authority: a packet that
//! finds no valid entry for its key looks there. The cache is not pinned: each daemon
//! fills a fresh one from the rules it adopts.
//!
//! [`RULE_CACHE_V4`]: crate::RULE_CACHE_V4
//! [`RULE_CACHE_V6`]: crate::RULE_CACHE_V6

use crate::{BackendV4, BackendV6, RuleKeyV4, RuleKeyV6};

/// log2 of the slots of each rule cache.
pub const RULE_CACHE_BITS: u32 = 16;
/// Slots of each rule cache: 1.5 MiB for IPv4, 3 MiB for IPv6. A host publishing a few
/// hundred ports (times its addresses, for wildcard rules) rarely sees a collision;
/// 65,535 ports published at once fill it about half (the rest from the rules map).
pub const RULE_CACHE_SLOTS: u32 = 1 << RULE_CACHE_BITS;

/// One slot: a rules map entry and its check. All zeroes is an empty slot (its check
/// never matches).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedRule<K, B> {
    key: K,
    backend: B,
    check: u32,
}

/// A slot of [`crate::RULE_CACHE_V4`].
pub type CachedRuleV4 = CachedRule<RuleKeyV4, BackendV4>;
/// A slot of [`crate::RULE_CACHE_V6`].
pub type CachedRuleV6 = CachedRule<RuleKeyV6, BackendV6>;
const _: () = assert!(core::mem::size_of::<CachedRuleV4>() == 24);
const _: () = assert!(core::mem::size_of::<CachedRuleV6>() == 48);

/// The multiplier of the hash (2^64 over the golden ratio, odd).
pub(crate) const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
/// Where a key's hash starts.
const SEED: u64 = 0x5bd1_e995_2f1c_2c6b;

/// Word `i` (32 bits, memory order) of `t`.
///
/// # Safety
/// `4 * i + 4 <= size_of::<T>()`; `T` has no padding.
#[inline(always)]
pub(crate) unsafe fn word<T>(t: &T, i: usize) -> u32 {
    // Word loads, not four byte loads each: every type cached is aligned to 4.
    const { assert!(core::mem::align_of::<T>() >= 4 && core::mem::size_of::<T>().is_multiple_of(4)) };
    // SAFETY: the caller's; aligned (asserted above).
    unsafe { *(t as *const T as *const u32).add(i) }
}

/// Mixes `t`'s bytes, 32 bits at a time in memory order, into `h`. `T` is one of the
/// map types above: sizes multiples of 4, aligned to 4, no padding.
#[inline(always)]
fn mix<T: Copy>(mut h: u64, t: &T) -> u64 {
    let words = core::mem::size_of::<T>() / 4;
    let mut i = 0;
    while i < words {
        // SAFETY: `i * 4 + 4 <= size_of::<T>()`; the types have no padding.
        let w = unsafe { word(t, i) };
        // A multiply carries a bit's change only upwards: the shift brings the high
        // half back down before the next word.
        h = (h ^ u64::from(w)).wrapping_mul(MULTIPLIER);
        h ^= h >> 32;
        i += 1;
    }
    h
}

impl<K: Copy + PartialEq, B: Copy> CachedRule<K, B> {
    /// The entry for `key`, served by `backend`.
    #[inline(always)]
    pub fn new(key: K, backend: B) -> Self {
        Self {
            key,
            backend,
            check: check(mix(SEED, &key), &backend),
        }
    }

    /// The slot that caches `key`, below [`RULE_CACHE_SLOTS`].
    #[inline(always)]
    pub fn slot(key: &K) -> u32 {
        Self::slot_and_hash(key).0
    }

    /// The slot of `key` and the hash its check continues from, in one pass (the
    /// kernel's lookup).
    #[inline(always)]
    pub fn slot_and_hash(key: &K) -> (u32, u64) {
        let h = mix(SEED, key);
        ((h >> (64 - RULE_CACHE_BITS)) as u32, h)
    }

    /// The backend this entry holds for `key` (`key_hash` from [`Self::slot_and_hash`]),
    /// or `None`: the slot holds another key, is empty, or was read half-written. The
    /// check is computed over the caller's key and the backend as read here, so a
    /// torn read fails it (but for a 2^-32 chance).
    #[inline(always)]
    pub fn backend_for(&self, key: &K, key_hash: u64) -> Option<B> {
        let backend = self.backend;
        (same(&self.key, key) && self.check == check(key_hash, &backend)).then_some(backend)
    }

    /// The key this slot holds, if it holds a valid entry (the daemon's view).
    pub fn key(&self) -> Option<K> {
        self.backend().map(|_| self.key)
    }

    /// The backend of a valid entry (the daemon's view).
    pub fn backend(&self) -> Option<B> {
        self.backend_for(&self.key, mix(SEED, &self.key))
    }
}

/// Whether `a` and `b` hold the same bytes, compared 32 bits at a time (the derived
/// comparison of byte arrays can crash LLVM's BPF backend on 20-byte keys).
#[inline(always)]
pub(crate) fn same<T: Copy>(a: &T, b: &T) -> bool {
    let words = core::mem::size_of::<T>() / 4;
    let mut i = 0;
    let mut diff = 0u32;
    while i < words {
        // SAFETY: as in `mix`.
        diff |= unsafe { word(a, i) ^ word(b, i) };
        i += 1;
    }
    diff == 0
}

/// An entry's check: the key's hash mixed with the backend, folded to 32 bits.
#[inline(always)]
fn check<B: Copy>(key_hash: u64, backend: &B) -> u32 {
    let h = mix(key_hash, backend);
    (h ^ (h >> 32)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::{Ipv4Addr, Ipv6Addr};
    use proptest::prelude::*;

    fn key(a: u32, port: u16, proto: u8) -> RuleKeyV4 {
        RuleKeyV4::from_parts(Ipv4Addr::from(a), port, proto)
    }

    #[test]
    fn empty_slot_holds_nothing() {
        let empty = CachedRuleV4::default();
        assert_eq!(empty.key(), None);
        let zero = RuleKeyV4::default();
        let (_, h) = CachedRuleV4::slot_and_hash(&zero);
        assert_eq!(empty.backend_for(&zero, h), None);
        assert_eq!(CachedRuleV6::default().key(), None);
    }

    #[test]
    fn entry_serves_its_key_only() {
        let k = key(0xc612_0101, 9000, 6);
        let b = BackendV4::new(Ipv4Addr::new(198, 19, 0, 2), 8080, 3);
        let e = CachedRuleV4::new(k, b);
        let (slot, h) = CachedRuleV4::slot_and_hash(&k);
        assert_eq!(slot, CachedRuleV4::slot(&k));
        assert_eq!(e.backend_for(&k, h), Some(b));
        assert_eq!(e.key(), Some(k));
        let other = key(0xc612_0101, 9001, 6);
        let (_, h2) = CachedRuleV4::slot_and_hash(&other);
        assert_eq!(e.backend_for(&other, h2), None);
    }

    #[test]
    fn ipv6_entry_round_trips() {
        let k = RuleKeyV6::from_parts(Ipv6Addr::LOCALHOST, 443, 17);
        let b = BackendV6::new(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2), 8443, 1);
        let e = CachedRuleV6::new(k, b);
        let (slot, h) = CachedRuleV6::slot_and_hash(&k);
        assert!(slot < RULE_CACHE_SLOTS);
        assert_eq!(e.backend_for(&k, h), Some(b));
    }

    proptest! {
        /// A slot read half-written (words of an old entry and a new one) is refused,
        /// unless the words taken from either entry agree (then it is that entry).
        #[test]
        fn torn_entries_are_refused(
            a in any::<u32>(), pa in 1u16.., b in any::<u32>(), pb in 1u16..,
            ba in any::<u32>(), bb in any::<u32>(), split in 1usize..6,
        ) {
            prop_assume!((a, pa) != (b, pb));
            let old = CachedRuleV4::new(key(a, pa, 6), BackendV4::new(Ipv4Addr::from(ba), 80, 1));
            let new = CachedRuleV4::new(key(b, pb, 6), BackendV4::new(Ipv4Addr::from(bb), 81, 2));
            let words = |e: &CachedRuleV4| -> [u32; 6] {
                // SAFETY: 24 bytes, no padding (asserted above).
                unsafe { core::mem::transmute(*e) }
            };
            let (o, n) = (words(&old), words(&new));
            let mut torn = n;
            torn[split..].copy_from_slice(&o[split..]);
            // SAFETY: any 24 bytes are a valid entry.
            let torn: CachedRuleV4 = unsafe { core::mem::transmute(torn) };
            for (k, e) in [(key(a, pa, 6), &old), (key(b, pb, 6), &new)] {
                let (_, h) = CachedRuleV4::slot_and_hash(&k);
                if let Some(got) = torn.backend_for(&k, h) {
                    prop_assert_eq!(Some(got), e.backend());
                }
            }
        }

        /// Slots spread as a random function's would: 4,096 keys in 65,536 slots share
        /// about 128 (the birthday bound; structured keys somewhat more).
        #[test]
        fn slots_spread(base in any::<u32>()) {
            let mut seen = std::collections::BTreeSet::new();
            for i in 0..4096u32 {
                seen.insert(CachedRuleV4::slot(&key(base.wrapping_add(i >> 4), 8000 + (i & 15) as u16, 6)));
            }
            prop_assert!(seen.len() > 3800, "{} slots", seen.len());
        }
    }
}
