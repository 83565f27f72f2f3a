//! The reply cache: copies of established flows (`CONNTRACK_V4` / `CONNTRACK_V6`
//! entries) that replies met lately, in an array map, [`REPLY_CACHE_V4`] /
//! [`REPLY_CACHE_V6`], in front of the conntrack tables.
//!
//! Why: as for the rule cache (`rule_cache.rs`), the verifier inlines an array lookup,
//! while a hash-map lookup is a call into the kernel. The conntrack lookup was half of
//! what a reply cost (BPF_PROG_RUN: +51 ns over an empty program, about 25 of them the
//! lookup, on a CPU with AMD's SRSO "Safe RET").
//!
//! Direct-mapped: a flow key has one slot ([`CachedFlow::slot_and_hash`]). The reply
//! program fills the slot when conntrack answers it, and takes the entry while all of
//! these hold:
//! - it holds the reply's flow key, and its check matches (another CPU may be writing
//!   the slot: a torn read fails the check, as in the rule cache);
//! - its generation is the slot's current one ([`FLOW_GENERATIONS_V4`], shared by the
//!   CPUs). The entry records the generation read *before* the conntrack lookup that
//!   filled it, and whoever changes or removes a flow bumps its slot's generation
//!   *after* the change: the ingress programs when they record a new flow (it may reuse
//!   the key of one conntrack evicted but a slot still holds), the daemon when it
//!   forgets flows. So no entry from before a change is taken after it;
//! - it is younger than [`REFRESH_TICKS`] jiffies. Then the reply asks conntrack again,
//!   which refreshes the flow's LRU recency: a busy flow served from the cache is not
//!   evicted for looking idle.
//!
//! The conntrack table stays the authority; a flow whose slot holds another flow is
//! served by it. Neither map is pinned: each load starts empty, and its generations
//! with it. Deleting a conntrack entry behind portfwd's back (bpftool) leaves its
//! replies translated until the entry is refreshed.
//!
//! [`REPLY_CACHE_V4`]: crate::REPLY_CACHE_V4
//! [`REPLY_CACHE_V6`]: crate::REPLY_CACHE_V6
//! [`FLOW_GENERATIONS_V4`]: crate::FLOW_GENERATIONS_V4

use crate::rule_cache::{same, word, MULTIPLIER};
use crate::{FlowKeyV4, FlowKeyV6, FlowV4, FlowV6};

/// log2 of the slots of each reply cache.
pub const REPLY_CACHE_BITS: u32 = 14;
/// Slots of each reply cache (and of its generations): 640 KiB for IPv4, 1.2 MiB for
/// IPv6.
pub const REPLY_CACHE_SLOTS: u32 = 1 << REPLY_CACHE_BITS;
/// How long an entry serves without asking conntrack, in jiffies (0.1 s at
/// `CONFIG_HZ=1000`, 1 s at 100).
pub const REFRESH_TICKS: u32 = 100;

/// Where a flow key's hash starts (not the rule cache's: the two are unrelated).
const SEED: u64 = 0x2545_f491_4f6c_dd1d;

/// One slot: a conntrack entry, the slot generation and time it was read at, and a
/// check over the key, the flow and the generation. All zeroes is an empty slot (no
/// reply has a zero key).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachedFlow<K, F> {
    key: K,
    held: Held<F>,
    /// When it was filled (jiffies, low 32 bits). Outside the check: a torn value only
    /// moves the next refresh.
    jiffies: u32,
    check: u32,
}

/// What an entry answers: the flow, and the slot generation it was read under.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held<F> {
    flow: F,
    generation: u32,
}

/// A slot of [`crate::REPLY_CACHE_V4`].
pub type CachedFlowV4 = CachedFlow<FlowKeyV4, FlowV4>;
/// A slot of [`crate::REPLY_CACHE_V6`].
pub type CachedFlowV6 = CachedFlow<FlowKeyV6, FlowV6>;
const _: () = assert!(core::mem::size_of::<CachedFlowV4>() == 40);
const _: () = assert!(core::mem::size_of::<CachedFlowV6>() == 76);

impl<K: Copy, F: Copy> CachedFlow<K, F> {
    /// The entry for `key` (`key_hash` from [`Self::slot_and_hash`]), as conntrack gave
    /// `flow`, after the slot's `generation` was read, at `jiffies`.
    #[inline(always)]
    pub fn new(key: K, key_hash: u64, flow: F, generation: u32, jiffies: u32) -> Self {
        let held = Held { flow, generation };
        Self {
            key,
            held,
            jiffies,
            check: check(key_hash, &held),
        }
    }

    /// The slot of `key`, below [`REPLY_CACHE_SLOTS`], and the hash its check continues
    /// from.
    #[inline(always)]
    pub fn slot_and_hash(key: &K) -> (u32, u64) {
        let h = mix_pairs(SEED, key);
        ((h >> (64 - REPLY_CACHE_BITS)) as u32, h)
    }

    /// The slot of `key` (the daemon's, to bump its generation).
    #[inline(always)]
    pub fn slot(key: &K) -> u32 {
        Self::slot_and_hash(key).0
    }

    /// The flow this entry holds for `key` (`key_hash` from [`Self::slot_and_hash`]), if
    /// it is whole, of the slot's current `generation` and younger than
    /// [`REFRESH_TICKS`] at `jiffies`.
    #[inline(always)]
    pub fn flow_for(&self, key: &K, key_hash: u64, generation: u32, jiffies: u32) -> Option<F> {
        let held = self.held;
        let current =
            held.generation == generation && jiffies.wrapping_sub(self.jiffies) < REFRESH_TICKS;
        (current && same(&self.key, key) && self.check == check(key_hash, &held))
            .then_some(held.flow)
    }

    /// Writes this entry into `slot`, 32 bits at a time: in BPF, assigning a struct to
    /// map memory may compile to a call to `memmove`.
    ///
    /// # Safety
    /// `slot` is valid for writes and aligned.
    #[inline(always)]
    pub unsafe fn write_to(&self, slot: *mut Self) {
        const { assert!(core::mem::size_of::<Self>().is_multiple_of(4)) };
        let (src, dst) = (self as *const Self as *const u32, slot as *mut u32);
        let mut i = 0;
        while i < core::mem::size_of::<Self>() / 4 {
            // SAFETY: within both (the size is a multiple of 4, both aligned to 4);
            // volatile, so LLVM does not merge the stores back into a `memmove`.
            unsafe { core::ptr::write_volatile(dst.add(i), *src.add(i)) };
            i += 1;
        }
    }

    /// The flow key this slot was filled for (a test's view: the entry may be stale).
    pub fn key(&self) -> &K {
        &self.key
    }
}

/// An entry's check: the key's hash mixed with the flow and generation, folded to 32
/// bits.
#[inline(always)]
fn check<F: Copy>(key_hash: u64, held: &Held<F>) -> u32 {
    let h = mix_pairs(key_hash, held);
    (h ^ (h >> 32)) as u32
}

/// Mixes `t`'s bytes into `h` as the rule cache's `mix` does, but 64 bits (two 32-bit
/// words, memory order) per multiply: the multiplies are a chain, and they were most of
/// what a cache hit cost. Each step is a bijection of `h`, so inputs that differ in any
/// word give different results before the final fold.
#[inline(always)]
fn mix_pairs<T: Copy>(mut h: u64, t: &T) -> u64 {
    let words = core::mem::size_of::<T>() / 4;
    let mut i = 0;
    while i < words {
        // SAFETY: `i * 4 + 4 <= size_of::<T>()` (and likewise for `i + 1` when read);
        // the types mixed are aligned to 4 and have no padding.
        let lo = u64::from(unsafe { word(t, i) });
        let hi = if i + 1 < words {
            u64::from(unsafe { word(t, i + 1) })
        } else {
            0
        };
        h = (h ^ (lo | hi << 32)).wrapping_mul(MULTIPLIER);
        h ^= h >> 32;
        i += 2;
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;
    use proptest::prelude::*;

    fn key(client: u32, port: u16) -> FlowKeyV4 {
        FlowKeyV4::new(
            [198, 19, 0, 2],
            8080u16.to_be_bytes(),
            client.to_be_bytes(),
            port.to_be_bytes(),
            proto::TCP,
        )
    }

    fn flow(host_port: u16) -> FlowV4 {
        FlowV4::new([198, 18, 0, 1], host_port.to_be_bytes(), 3)
    }

    #[test]
    fn entry_serves_its_key_while_current() {
        let k = key(0xc633_6401, 40000);
        let (slot, h) = CachedFlowV4::slot_and_hash(&k);
        assert!(slot < REPLY_CACHE_SLOTS);
        assert_eq!(slot, CachedFlowV4::slot(&k));
        let e = CachedFlowV4::new(k, h, flow(9000), 7, 1000);
        assert_eq!(e.flow_for(&k, h, 7, 1000), Some(flow(9000)));
        assert_eq!(
            e.flow_for(&k, h, 7, 1000 + REFRESH_TICKS - 1),
            Some(flow(9000))
        );
        assert_eq!(
            e.flow_for(&k, h, 7, 1000 + REFRESH_TICKS),
            None,
            "due a refresh"
        );
        assert_eq!(e.flow_for(&k, h, 8, 1000), None, "the slot's flows changed");
        let other = key(0xc633_6401, 40001);
        let (_, h2) = CachedFlowV4::slot_and_hash(&other);
        assert_eq!(e.flow_for(&other, h2, 7, 1000), None);
    }

    #[test]
    fn jiffies_wrap_keeps_the_age() {
        let k = key(1, 2);
        let (_, h) = CachedFlowV4::slot_and_hash(&k);
        let e = CachedFlowV4::new(k, h, flow(9000), 0, u32::MAX - 10);
        assert_eq!(e.flow_for(&k, h, 0, 5), Some(flow(9000)));
        assert_eq!(e.flow_for(&k, h, 0, REFRESH_TICKS), None);
    }

    #[test]
    fn empty_slot_holds_nothing() {
        // SAFETY: the entry types are plain bytes; all zeroes is what a new map holds.
        let empty: CachedFlowV4 = unsafe { core::mem::zeroed() };
        let zero = FlowKeyV4::new([0; 4], [0; 2], [0; 4], [0; 2], 0);
        let (_, h) = CachedFlowV4::slot_and_hash(&zero);
        assert_eq!(empty.flow_for(&zero, h, 0, 0), None);
    }

    #[test]
    fn ipv6_entry_round_trips() {
        let k = FlowKeyV6::new([0xfd; 16], [0, 80], [0x20; 16], [0x9c, 0x40], proto::UDP);
        let f = FlowV6::new([0x20; 16], [0x23, 0x28], 1);
        let (slot, h) = CachedFlowV6::slot_and_hash(&k);
        assert!(slot < REPLY_CACHE_SLOTS);
        let e = CachedFlowV6::new(k, h, f, 1, 2);
        assert_eq!(e.flow_for(&k, h, 1, 2), Some(f));
    }

    proptest! {
        /// A slot read half-written (32-bit words of an old entry and a new one, for
        /// keys in the same slot or not) is refused, unless the words taken from either
        /// entry agree (then it is that entry).
        #[test]
        fn torn_reads_are_refused(
            a in (any::<u32>(), any::<u16>(), any::<u16>(), any::<u32>()),
            b in (any::<u32>(), any::<u16>(), any::<u16>(), any::<u32>()),
            from_b in any::<u16>(),
        ) {
            let entry = |(client, port, host_port, generation): (u32, u16, u16, u32)| {
                let k = key(client, port);
                let (_, h) = CachedFlowV4::slot_and_hash(&k);
                (k, h, generation, CachedFlowV4::new(k, h, flow(host_port), generation, 0))
            };
            let (ka, ha, ga, ea) = entry(a);
            let (_, _, _, eb) = entry(b);
            let words = |e: &CachedFlowV4| -> [u32; 10] {
                // SAFETY: 40 bytes of plain data, read as ten words.
                unsafe { core::mem::transmute(*e) }
            };
            let (wa, wb) = (words(&ea), words(&eb));
            let mut torn = wa;
            for (i, w) in torn.iter_mut().enumerate() {
                if from_b & (1 << i) != 0 {
                    *w = wb[i];
                }
            }
            // SAFETY: as above, the other way.
            let t: CachedFlowV4 = unsafe { core::mem::transmute(torn) };
            if let Some(f) = t.flow_for(&ka, ha, ga, 0) {
                prop_assert!(t == ea || t == eb, "torn entry taken: {:?}", t);
                prop_assert_eq!(f, if t == ea { ea.held.flow } else { eb.held.flow });
            }
        }
    }
}
