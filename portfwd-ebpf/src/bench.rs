//! Benchmark-only programs, loaded by `cargo xtask bench`, never by the daemon.
//!
//! - `bench_gen`: run with BPF_PROG_RUN in `BPF_F_TEST_XDP_LIVE_FRAMES` mode on the
//!   client's interface; writes the whole template frame into every frame (live-frame
//!   pages are recycled without being reset) and transmits it (`XDP_TX`). With
//!   `BENCH_SPREAD` set, each frame gets its own IPv4 source (low 16 bits of the address)
//!   and source port, checksums patched: many flows (a scale run) or random spoofed
//!   sources (a SYN flood).
//! - `bench_sink`: attached at the receiving end; counts and drops UDP frames (IPv4 or
//!   IPv6) whose destination port is the configured one, passes everything else.
//!   `bench_sink_tc` does the same at TC ingress, for frames that skip XDP.
//! - `bench_floor`: the least an XDP forwarder can do, for the bench's ceiling: UDP frames
//!   to the configured port get the container's port and MACs and go out of the
//!   container's bridge port (`XDP_REDIRECT`), with no lookup, parse beyond the fixed
//!   offsets of 64-byte frames, or checksum update (the sink checks none).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_get_prandom_u32, bpf_redirect},
    macros::{classifier, map, xdp},
    maps::{Array, PerCpuArray},
    programs::{TcContext, XdpContext},
};

/// Template frame length; the generator sends frames of exactly this size.
pub const FRAME_LEN: usize = 64;

/// Entry 0: the frame to send.
#[map(name = "BENCH_TEMPLATE")]
static BENCH_TEMPLATE: Array<[u8; FRAME_LEN]> = Array::with_max_entries(1, 0);

/// Entry 0: `[flows, random]`. `flows == 0`: every frame is the template. Otherwise frame
/// `i` of a CPU takes flow `i % flows` (or a random one when `random != 0`); flow `n` has
/// source port `1024 + n % 32768` and adds `n / 32768` to the low 16 bits of the
/// template's source address. IPv4 only, TCP or UDP.
#[map(name = "BENCH_SPREAD")]
static BENCH_SPREAD: Array<[u32; 2]> = Array::with_max_entries(1, 0);

/// Entry 0: the next flow index of this CPU (`BENCH_SPREAD` without `random`).
#[map(name = "BENCH_SPREAD_NEXT")]
static BENCH_SPREAD_NEXT: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Entry 0: UDP destination port (network order) the sink counts.
#[map(name = "BENCH_SINK_PORT")]
static BENCH_SINK_PORT: Array<[u8; 2]> = Array::with_max_entries(1, 0);

/// Entry 0: frames counted by the sink.
#[map(name = "BENCH_SINK_COUNT")]
static BENCH_SINK_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Entry 0, `bench_floor`'s job: bytes 0..4 the bridge port's ifindex (native order),
/// 4..10 the destination MAC, 10..16 the source MAC, 16..18 and 18..20 the IPv4 UDP port
/// matched and written, 20..22 and 22..24 the same for IPv6 (ports in network order).
#[map(name = "BENCH_FLOOR")]
static BENCH_FLOOR: Array<[u8; 24]> = Array::with_max_entries(1, 0);

#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + FRAME_LEN > end {
        return xdp_action::XDP_ABORTED;
    }
    let Some(t) = BENCH_TEMPLATE.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: `data .. data + FRAME_LEN` is inside the frame (checked above).
    unsafe { core::ptr::copy_nonoverlapping(t.as_ptr(), data as *mut u8, FRAME_LEN) };
    if let Some(&[flows, random]) = BENCH_SPREAD.get(0) {
        if flows != 0 {
            // SAFETY: FRAME_LEN bytes are inside the frame (checked above).
            unsafe { spread(data as *mut u8, next_flow(flows, random)) };
        }
    }
    xdp_action::XDP_TX
}

#[inline(always)]
fn next_flow(flows: u32, random: u32) -> u32 {
    if random != 0 {
        // SAFETY: a helper without arguments.
        return unsafe { bpf_get_prandom_u32() };
    }
    let Some(next) = BENCH_SPREAD_NEXT.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot.
    unsafe {
        let n = *next % flows;
        *next = n + 1;
        n
    }
}

/// Gives the frame at `p` (FRAME_LEN bytes, the template's copy) flow `n`'s source.
///
/// # Safety
/// `p .. p + FRAME_LEN` must be writable.
#[inline(always)]
unsafe fn spread(p: *mut u8, n: u32) {
    const IP_CSUM: usize = 24;
    const SRC_LO: usize = 28;
    const SPORT: usize = 34;
    // IPv4 without options only (an IPv6 template is sent as it is).
    let (ethertype, ver_ihl, proto) = unsafe { ([*p.add(12), *p.add(13)], *p.add(14), *p.add(23)) };
    if ethertype != [0x08, 0x00] || ver_ihl != 0x45 {
        return;
    }
    let l4_csum = match proto {
        6 => 50,
        17 => 40,
        _ => return,
    };
    let read = |off: usize| unsafe { u16::from_be_bytes([*p.add(off), *p.add(off + 1)]) };
    let write = |off: usize, v: u16| unsafe { p.add(off).cast::<[u8; 2]>().write(v.to_be_bytes()) };
    let (old_src, old_port) = (read(SRC_LO), read(SPORT));
    let src = old_src.wrapping_add((n / 32_768) as u16);
    let port = 1024 + (n % 32_768) as u16;
    write(SRC_LO, src);
    write(SPORT, port);
    write(IP_CSUM, csum_replace(read(IP_CSUM), old_src, src));
    let l4 = read(l4_csum);
    // A UDP checksum of zero means none.
    if l4_csum == 40 && l4 == 0 {
        return;
    }
    let l4 = csum_replace(csum_replace(l4, old_src, src), old_port, port);
    write(l4_csum, if l4_csum == 40 && l4 == 0 { 0xffff } else { l4 });
}

/// RFC 1624 incremental update: one 16-bit word of the summed data changed.
#[inline(always)]
fn csum_replace(csum: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!csum) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[xdp]
pub fn bench_floor(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    // Ethernet (14) + IPv6 (40) + UDP ports (4): the longer of the two families.
    if data + 58 > end {
        return xdp_action::XDP_PASS;
    }
    let Some(c) = BENCH_FLOOR.get(0) else {
        return xdp_action::XDP_PASS;
    };
    let p = data as *mut u8;
    // SAFETY: 58 bytes are inside the frame (checked above).
    unsafe {
        let dport_at = match [*p.add(12), *p.add(13)] {
            [0x08, 0x00] if *p.add(14) == 0x45 && *p.add(23) == 17 => 36,
            [0x86, 0xdd] if *p.add(20) == 17 => 56,
            _ => return xdp_action::XDP_PASS,
        };
        let ports = if dport_at == 36 { 16 } else { 20 };
        if [*p.add(dport_at), *p.add(dport_at + 1)] != [c[ports], c[ports + 1]] {
            return xdp_action::XDP_PASS;
        }
        *p.add(dport_at) = c[ports + 2];
        *p.add(dport_at + 1) = c[ports + 3];
        core::ptr::copy_nonoverlapping(c.as_ptr().add(4), p, 12);
        let ifindex = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
        bpf_redirect(ifindex, 0) as u32
    }
}

#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    if counted(ctx.data(), ctx.data_end()) {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// The same at TC ingress, for frames that skip the veth's NAPI and so its XDP program
/// (`bpf_redirect_peer` delivers an skb straight into the peer's ingress).
#[classifier]
pub fn bench_sink_tc(ctx: TcContext) -> i32 {
    if counted(ctx.data(), ctx.data_end()) {
        TC_ACT_SHOT as i32
    } else {
        TC_ACT_UNSPEC
    }
}

/// Whether the frame is UDP to the configured port (IPv4 without options, or IPv6
/// without extension headers); counts it if so.
#[inline(always)]
fn counted(data: usize, end: usize) -> bool {
    // Ethernet (14) + IPv4 without options (20) + UDP ports (4).
    if data + 38 > end {
        return false;
    }
    let p = data as *const u8;
    // SAFETY: 38 bytes are inside the frame (checked above).
    let (ethertype, v4_proto, ihl) =
        unsafe { ([*p.add(12), *p.add(13)], *p.add(23), *p.add(14) & 0x0f) };
    let dport = match ethertype {
        // SAFETY: 38 bytes are inside the frame (checked above).
        [0x08, 0x00] if v4_proto == 17 && ihl == 5 => unsafe { [*p.add(36), *p.add(37)] },
        // Ethernet (14) + IPv6 (40) + UDP ports (4).
        [0x86, 0xdd] if data + 58 <= end => {
            // SAFETY: 58 bytes are inside the frame (checked above).
            let (next, dport) = unsafe { (*p.add(20), [*p.add(56), *p.add(57)]) };
            if next != 17 {
                return false;
            }
            dport
        }
        _ => return false,
    };
    match BENCH_SINK_PORT.get(0) {
        Some(port) if *port == dport => {}
        _ => return false,
    }
    if let Some(c) = BENCH_SINK_COUNT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
    true
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
