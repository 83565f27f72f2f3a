//! The skb's checksum state for the TC programs: `ip_summed` of the kernel's
//! `struct sk_buff`, which `__sk_buff` does not show. Knowing it, TC rewrites checksums
//! with plain arithmetic as XDP does, instead of two checksum helper calls per packet
//! (each a call into the kernel: about 10 ns on CPUs with return-stack mitigations).
//!
//! The programs reach the `sk_buff` through the kfunc `bpf_cast_to_kern_ctx` (kernel
//! 6.3+, which the verifier inlines into a register move) and read the byte holding
//! `ip_summed` at the bit offset the running kernel's BTF gives. aya (0.14) cannot emit
//! a kfunc call, so the programs call a helper id no kernel has ([`KFUNC_MARKER`]) and
//! the loader rewrites that instruction in the object's code before loading it: into
//! the kfunc call, or, where the kernel has no such kfunc or BTF, into `r0 = 0` on a
//! path the programs never take ([`SKB_IP_SUMMED_BIT`] stays 0: the helpers are used).

/// The helper id the programs call where `bpf_cast_to_kern_ctx` is meant (see above).
pub const KFUNC_MARKER: u32 = 0x0cafe;

/// The global (`.rodata`) holding the bit offset of `ip_summed` in `struct sk_buff`
/// (0: unknown, the programs use the checksum helpers), set by the loader.
pub const SKB_IP_SUMMED_BIT: &str = "SKB_IP_SUMMED_BIT";

/// `skb->ip_summed` values (include/linux/skbuff.h).
pub const CHECKSUM_NONE: u8 = 0;
/// The device checked the checksum; it must stay right.
pub const CHECKSUM_UNNECESSARY: u8 = 1;
/// `skb->csum` holds the sum of the packet: the helpers keep it right.
pub const CHECKSUM_COMPLETE: u8 = 2;
/// The L4 checksum field holds the pseudo-header sum; the device or the kernel completes
/// it over the data later.
pub const CHECKSUM_PARTIAL: u8 = 3;

#[cfg(feature = "user")]
pub use loader::{patch_object, KernelCtx};

#[cfg(feature = "user")]
mod loader {
    extern crate std;

    use std::vec::Vec;

    use super::KFUNC_MARKER;

    /// What the running kernel's BTF says (`/sys/kernel/btf/vmlinux`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct KernelCtx {
        /// The BTF id of the kfunc `bpf_cast_to_kern_ctx`.
        pub cast_to_kern_ctx: u32,
        /// The bit offset of `ip_summed` in `struct sk_buff`.
        pub ip_summed_bit: u32,
    }

    impl KernelCtx {
        /// From the running kernel's BTF; `None` where it has no BTF, no such kfunc, or
        /// an `ip_summed` the programs cannot read (not 2 bits within one byte).
        pub fn of_running_kernel() -> Option<Self> {
            Self::from_btf(&std::fs::read("/sys/kernel/btf/vmlinux").ok()?)
        }

        /// From raw BTF.
        pub fn from_btf(btf: &[u8]) -> Option<Self> {
            let types = Types::parse(btf)?;
            Some(Self {
                cast_to_kern_ctx: types.find(KIND_FUNC, "bpf_cast_to_kern_ctx")?,
                ip_summed_bit: skb_ip_summed_bit(&types)?,
            })
        }
    }

    /// Rewrites every [`KFUNC_MARKER`] helper call in the object's code sections: into a
    /// call of `bpf_cast_to_kern_ctx` (`kctx`), or into `r0 = 0` without one. Returns how
    /// many it rewrote; an object that is not 64-bit little-endian ELF is left alone.
    pub fn patch_object(elf: &mut [u8], kctx: Option<KernelCtx>) -> usize {
        let marker = call_insn(0, KFUNC_MARKER);
        let with = match kctx {
            // BPF_JMP | BPF_CALL, src_reg BPF_PSEUDO_KFUNC_CALL (2), imm the BTF id.
            Some(k) => call_insn(2, k.cast_to_kern_ctx),
            // BPF_ALU64 | BPF_MOV | BPF_K: r0 = 0.
            None => [0xb7, 0, 0, 0, 0, 0, 0, 0],
        };
        let mut n = 0;
        for (start, len) in code_sections(elf) {
            for insn in elf[start..start + len].chunks_exact_mut(8) {
                if insn == marker {
                    insn.copy_from_slice(&with);
                    n += 1;
                }
            }
        }
        n
    }

    fn call_insn(src_reg: u8, imm: u32) -> [u8; 8] {
        let i = imm.to_le_bytes();
        [0x85, src_reg << 4, 0, 0, i[0], i[1], i[2], i[3]]
    }

    /// (offset, size) of the sections holding code (`SHF_EXECINSTR`) of a 64-bit
    /// little-endian ELF file.
    fn code_sections(elf: &[u8]) -> Vec<(usize, usize)> {
        const SHF_EXECINSTR: u64 = 4;
        let ok = elf.len() >= 64 && elf[..4] == *b"\x7fELF" && elf[4] == 2 && elf[5] == 1;
        if !ok {
            return Vec::new();
        }
        let shoff = u64_at(elf, 0x28) as usize;
        let shentsize = usize::from(u16_at(elf, 0x3a));
        let shnum = usize::from(u16_at(elf, 0x3c));
        (0..shnum)
            .filter_map(|i| {
                let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
                let header = elf.get(h..h.checked_add(64)?)?;
                let (flags, offset, size) = (
                    u64_at(header, 8),
                    u64_at(header, 24) as usize,
                    u64_at(header, 32) as usize,
                );
                let in_file = offset.checked_add(size)? <= elf.len();
                (flags & SHF_EXECINSTR != 0 && in_file).then_some((offset, size - size % 8))
            })
            .collect()
    }

    const KIND_STRUCT: u32 = 4;
    const KIND_UNION: u32 = 5;
    const KIND_FUNC: u32 = 12;

    /// The type section of a BTF blob, indexed by id (id 0 is `void`).
    struct Types<'a> {
        strings: &'a [u8],
        /// Per id: (kind, name offset, its kind_flag, its members' bytes).
        types: Vec<(u32, u32, bool, &'a [u8])>,
    }

    impl<'a> Types<'a> {
        fn parse(btf: &'a [u8]) -> Option<Self> {
            if btf.len() < 24 || u16_at(btf, 0) != 0xeb9f {
                return None;
            }
            let hdr_len = u32_at(btf, 4) as usize;
            let (type_off, type_len) = (u32_at(btf, 8) as usize, u32_at(btf, 12) as usize);
            let (str_off, str_len) = (u32_at(btf, 16) as usize, u32_at(btf, 20) as usize);
            let section = |off: usize, len: usize| {
                let start = hdr_len.checked_add(off)?;
                btf.get(start..start.checked_add(len)?)
            };
            let (data, strings) = (section(type_off, type_len)?, section(str_off, str_len)?);
            let mut types = Vec::from([(0, 0, false, &data[..0])]);
            let mut at = 0;
            while at < data.len() {
                let header = data.get(at..at + 12)?;
                let (name, info) = (u32_at(header, 0), u32_at(header, 4));
                let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
                let extra = match kind {
                    1 | 14 | 17 => 4,     // INT, VAR, DECL_TAG
                    3 => 12,              // ARRAY
                    4 | 5 => 12 * vlen,   // STRUCT, UNION: members
                    6 | 13 => 8 * vlen,   // ENUM, FUNC_PROTO
                    15 | 19 => 12 * vlen, // DATASEC, ENUM64
                    2 | 7..=12 | 16 | 18 => 0,
                    _ => return None,
                };
                let members = data.get(at + 12..at + 12 + extra)?;
                types.push((kind, name, info >> 31 != 0, members));
                at += 12 + extra;
            }
            Some(Self { strings, types })
        }

        fn name(&self, off: u32) -> &'a [u8] {
            let rest = self.strings.get(off as usize..).unwrap_or_default();
            &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
        }

        /// The first type of `kind` named `name`.
        fn find(&self, kind: u32, name: &str) -> Option<u32> {
            let id = self
                .types
                .iter()
                .position(|&(k, n, ..)| k == kind && self.name(n) == name.as_bytes())?;
            u32::try_from(id).ok()
        }

        /// The bit offset and bitfield size of member `name` of struct or union `id`,
        /// looked for through anonymous struct and union members too.
        fn member(&self, id: u32, name: &[u8], depth: u32) -> Option<(u32, u32)> {
            let &(kind, _, kind_flag, members) = self.types.get(id as usize)?;
            if !(kind == KIND_STRUCT || kind == KIND_UNION) || depth > 8 {
                return None;
            }
            members.chunks_exact(12).find_map(|m| {
                let (m_name, m_type, offset) = (u32_at(m, 0), u32_at(m, 4), u32_at(m, 8));
                let (bit, size) = if kind_flag {
                    (offset & 0x00ff_ffff, offset >> 24)
                } else {
                    (offset, 0)
                };
                if self.name(m_name) == name {
                    Some((bit, size))
                } else if self.name(m_name).is_empty() {
                    let (inner, size) = self.member(m_type, name, depth + 1)?;
                    Some((bit + inner, size))
                } else {
                    None
                }
            })
        }
    }

    /// The bit offset of `ip_summed` in `struct sk_buff`, if it is 2 bits within a byte.
    fn skb_ip_summed_bit(types: &Types<'_>) -> Option<u32> {
        let skb = types.find(KIND_STRUCT, "sk_buff")?;
        match types.member(skb, b"ip_summed", 0)? {
            (bit, 2) if bit % 8 <= 6 => Some(bit),
            _ => None,
        }
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(x)
    }
}

#[cfg(feature = "user")]
pub use prepared::Prepared;

#[cfg(feature = "user")]
mod prepared {
    extern crate std;

    use std::vec::Vec;

    use super::{patch_object, KernelCtx};

    /// The programs' object as the running kernel needs it: markers rewritten
    /// ([`patch_object`]) and the value of [`super::SKB_IP_SUMMED_BIT`] to load with.
    pub struct Prepared {
        /// The object's bytes, in words: ELF parsing wants them 8-aligned.
        words: Vec<u64>,
        len: usize,
        /// What to set [`super::SKB_IP_SUMMED_BIT`] to (0: the helpers are used).
        pub ip_summed_bit: u32,
        /// How many marker calls became kfunc calls (0 without a usable kfunc).
        pub kfunc_calls: usize,
    }

    impl Prepared {
        /// `object` prepared for the running kernel.
        pub fn for_running_kernel(object: &[u8]) -> Self {
            Self::new(object, KernelCtx::of_running_kernel())
        }

        /// `object` prepared for a kernel described by `kctx` (`None`: none usable).
        pub fn new(object: &[u8], kctx: Option<KernelCtx>) -> Self {
            let mut words = std::vec![0u64; object.len().div_ceil(8)];
            let bytes = bytemuck_bytes_mut(&mut words);
            bytes[..object.len()].copy_from_slice(object);
            let patched = patch_object(&mut bytes[..object.len()], kctx);
            let usable = kctx.filter(|_| patched > 0);
            Self {
                words,
                len: object.len(),
                ip_summed_bit: usable.map_or(0, |k| k.ip_summed_bit),
                kfunc_calls: if usable.is_some() { patched } else { 0 },
            }
        }

        /// The object's bytes.
        pub fn bytes(&self) -> &[u8] {
            // SAFETY: `words` holds at least `len` initialised bytes; u8 has no alignment.
            unsafe { core::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
        }
    }

    fn bytemuck_bytes_mut(words: &mut [u64]) -> &mut [u8] {
        // SAFETY: any bytes are valid u64s and u8s; the length covers the same memory.
        unsafe { core::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8) }
    }
}

#[cfg(all(test, feature = "user"))]
mod tests {
    extern crate std;

    use std::vec::Vec;

    use super::*;

    /// A 64-bit little-endian ELF file with two sections of `code` each: the first
    /// flagged executable, the second not.
    fn elf_with(code: &[u8]) -> Vec<u8> {
        let mut f = std::vec![0u8; 64];
        f[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let first = f.len();
        f.extend_from_slice(code);
        let second = f.len();
        f.extend_from_slice(code);
        let shoff = f.len();
        f[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        f[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        f[0x3c..0x3e].copy_from_slice(&2u16.to_le_bytes());
        for (offset, flags) in [(first, 6u64), (second, 2)] {
            let mut h = [0u8; 64];
            h[8..16].copy_from_slice(&flags.to_le_bytes());
            h[24..32].copy_from_slice(&(offset as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
            f.extend_from_slice(&h);
        }
        f
    }

    const MARKER: [u8; 8] = [0x85, 0, 0, 0, 0xfe, 0xca, 0, 0];
    const EXIT: [u8; 8] = [0x95, 0, 0, 0, 0, 0, 0, 0];

    #[test]
    fn markers_in_code_become_the_kfunc_call_or_a_move() {
        let code = [MARKER, EXIT, MARKER].concat();
        let kctx = KernelCtx {
            cast_to_kern_ctx: 0x0102_0304,
            ip_summed_bit: 1029,
        };
        let mut elf = elf_with(&code);
        assert_eq!(patch_object(&mut elf, Some(kctx)), 2);
        let call = [0x85, 0x20, 0, 0, 4, 3, 2, 1];
        assert_eq!(&elf[64..88], [call, EXIT, call].concat().as_slice());
        assert_eq!(&elf[88..112], code.as_slice(), "data sections untouched");

        let mut elf = elf_with(&code);
        assert_eq!(patch_object(&mut elf, None), 2);
        let r0_zero = [0xb7, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(&elf[64..88], [r0_zero, EXIT, r0_zero].concat().as_slice());

        let p = Prepared::new(&elf_with(&code), Some(kctx));
        assert_eq!((p.ip_summed_bit, p.kfunc_calls), (1029, 2));
        let p = Prepared::new(&elf_with(&EXIT), Some(kctx));
        assert_eq!(
            (p.ip_summed_bit, p.kfunc_calls),
            (0, 0),
            "no marker: the helpers"
        );
        let mut not_elf = code.to_vec();
        assert_eq!(patch_object(&mut not_elf, Some(kctx)), 0);
    }

    /// The running kernel's BTF (required under `CI=true`, whose kernels have it).
    #[test]
    fn the_running_kernel_shows_ip_summed_and_the_kfunc() {
        let Ok(btf) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "no /sys/kernel/btf/vmlinux"
            );
            return;
        };
        let k = KernelCtx::from_btf(&btf).expect("kfunc and ip_summed in the BTF");
        assert!(k.cast_to_kern_ctx > 0);
        // Inside `struct sk_buff` (a few hundred bytes), within one byte.
        assert!(k.ip_summed_bit > 0 && k.ip_summed_bit < 2048, "{k:?}");
        assert!(k.ip_summed_bit % 8 <= 6, "{k:?}");
        assert_eq!(KernelCtx::from_btf(&btf[..100]), None, "truncated BTF");
    }
}
