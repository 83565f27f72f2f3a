//! Benchmark-only programs, loaded by `cargo xtask bench`, never by the daemon.
//!
//! - `bench_gen`: run with BPF_PROG_RUN in `BPF_F_TEST_XDP_LIVE_FRAMES` mode on the
//!   client's interface; writes the whole template frame into every frame (live-frame
//!   pages are recycled without being reset) and transmits it (`XDP_TX`).
//! - `bench_sink`: attached at the receiving end; counts and drops UDP frames whose
//!   destination port is the configured one, passes everything else.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};

/// Template frame length; the generator sends frames of exactly this size.
pub const FRAME_LEN: usize = 64;

/// Entry 0: the frame to send.
#[map(name = "BENCH_TEMPLATE")]
static BENCH_TEMPLATE: Array<[u8; FRAME_LEN]> = Array::with_max_entries(1, 0);

/// Entry 0: UDP destination port (network order) the sink counts.
#[map(name = "BENCH_SINK_PORT")]
static BENCH_SINK_PORT: Array<[u8; 2]> = Array::with_max_entries(1, 0);

/// Entry 0: frames counted by the sink.
#[map(name = "BENCH_SINK_COUNT")]
static BENCH_SINK_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

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
    xdp_action::XDP_TX
}

#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    // Ethernet (14) + IPv4 without options (20) + UDP ports (4).
    if data + 38 > end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: 38 bytes are inside the frame (checked above).
    let (ethertype, proto, ihl, dport) = unsafe {
        let p = data as *const u8;
        (
            [*p.add(12), *p.add(13)],
            *p.add(23),
            *p.add(14) & 0x0f,
            [*p.add(36), *p.add(37)],
        )
    };
    if ethertype != [0x08, 0x00] || proto != 17 || ihl != 5 {
        return xdp_action::XDP_PASS;
    }
    match BENCH_SINK_PORT.get(0) {
        Some(port) if *port == dport => {}
        _ => return xdp_action::XDP_PASS,
    }
    if let Some(c) = BENCH_SINK_COUNT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
    xdp_action::XDP_DROP
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
