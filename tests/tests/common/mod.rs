//! Random and mutated frames for the kernel-versus-model property tests of
//! `prog_run.rs` and `prog_run_v6.rs`: addresses and ports drawn mostly from the
//! fixture's own (so rules, host addresses and flows are hit) and sometimes at random;
//! TCP SYNs and ACKs, UDP, other protocols; 802.1Q/802.1ad tags; IPv4 options and
//! fragments; IPv6 extension headers; then truncated or with one byte flipped. Every
//! frame goes through XDP ingress, TC ingress and TC egress, and each run is checked
//! against the model by [`compare`] — the function later fuzzing feeds.

// Each suite uses its part of this module.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use portfwd::dataplane::Dataplane;
use portfwd_common::{
    model::{FlowWrite, Verdict},
    proto, BridgePortKey, Reason, BRIDGE_PORT_PEER,
};
use portfwd_tests::fixture::{compare_in, Env, Frame, Prog, BACKEND_MAC};
use proptest::{prelude::*, test_runner::TestRunner};

/// The fixture's addresses of one family: the ones frames are drawn from, the host's
/// own first (destinations favour them, and the published ports, so that a good share
/// of frames is translated).
pub struct Pool {
    pub addrs: Vec<IpAddr>,
    /// How many of `addrs`, from the start, are host addresses.
    pub hosts: usize,
    pub ipv4: bool,
}

/// Ports of the fixture rules (the published ones first), backends and clients, and a
/// NAT64 one.
const PORTS: [u16; 10] = [9000, 5353, 9001, 7000, 53, 8080, 40000, 40001, 61000, 1];
const PUBLISHED: usize = 3;

/// The raw choices a frame is made from.
#[derive(Clone, Debug)]
pub struct Draw {
    src: (u8, [u8; 16], u8, u16),
    dst: (u8, [u8; 16], u8, u16),
    /// 0-5: the published port's protocol (else TCP for 0-3, UDP for 4-5), 6: TCP,
    /// 7: UDP, 8: ICMP/ICMPv6, 9: GRE.
    l4: u8,
    ack: bool,
    vlan: Option<(u16, bool)>,
    /// IPv4: options length pick, fragment pick. IPv6: extension header pick.
    ip_options: u8,
    frag: u8,
    ext: u8,
    payload: Vec<u8>,
    /// 0-6 none, 7 truncate at `cut`, 8-9 xor the byte at `cut` with `flip`.
    mutation: u8,
    cut: usize,
    flip: u8,
}

fn draw() -> impl Strategy<Value = Draw> {
    let end = (any::<u8>(), any::<[u8; 16]>(), any::<u8>(), any::<u16>());
    (
        (end, end, 0u8..10, any::<bool>()),
        proptest::option::weighted(0.2, (1u16..4095, any::<bool>())),
        (0u8..6, 0u8..20, 0u8..24),
        proptest::collection::vec(any::<u8>(), 0..48),
        (0u8..10, any::<usize>(), 1u8..),
    )
        .prop_map(
            |(
                (src, dst, l4, ack),
                vlan,
                (ip_options, frag, ext),
                payload,
                (mutation, cut, flip),
            )| {
                Draw {
                    src,
                    dst,
                    l4,
                    ack,
                    vlan,
                    ip_options,
                    frag,
                    ext,
                    payload,
                    mutation,
                    cut,
                    flip,
                }
            },
        )
}

impl Pool {
    /// An address (mostly the pool's) and a port (mostly the fixtures'); `published`:
    /// favour the host's addresses and published ports.
    fn end(
        &self,
        (pick, random, port_pick, port): (u8, [u8; 16], u8, u16),
        published: bool,
    ) -> (IpAddr, u16) {
        if published && pick < 160 && port_pick < 160 {
            return (
                self.addrs[usize::from(pick) % self.hosts],
                PORTS[usize::from(port_pick) % PUBLISHED],
            );
        }
        let i = usize::from(pick) % (self.addrs.len() + 1);
        let addr = match self.addrs.get(i) {
            Some(a) => *a,
            None if self.ipv4 => Ipv4Addr::new(random[0], random[1], random[2], random[3]).into(),
            None => Ipv6Addr::from(random).into(),
        };
        let j = usize::from(port_pick) % (PORTS.len() + 2);
        (addr, PORTS.get(j).copied().unwrap_or(port))
    }

    /// The frame before mutation.
    fn frame(&self, d: &Draw) -> Frame {
        let dst = self.end(d.dst, true);
        // Mostly the protocol the port is published for.
        let l4 = match (d.l4, dst.1) {
            (0..=5, 5353) => proto::UDP,
            (0..=5, 9000 | 9001) => proto::TCP,
            (0..=3, _) | (6, _) => proto::TCP,
            _ => proto::UDP,
        };
        let mut f = Frame::new(l4, self.end(d.src, false), dst);
        f.ack = d.ack.then_some(1);
        f.vlan = d.vlan.map(|(vid, _)| vid);
        f.payload = d.payload.clone();
        if self.ipv4 {
            f.ip_options = [0, 0, 0, 0, 4, 8][usize::from(d.ip_options)];
            f.more_fragments = d.frag == 0;
            f.frag_offset = if d.frag == 1 { 185 } else { 0 };
        }
        f
    }

    /// The bytes: the frame, its protocol, tag type and extension header as drawn, then
    /// the mutation.
    fn bytes(&self, d: &Draw, f: &Frame) -> Vec<u8> {
        const EXT: [u8; 6] = [0, 43, 44, 60, 51, 50];
        let mut b = match EXT.get(usize::from(d.ext)) {
            Some(&nh) if !self.ipv4 => f.with_ext_header(nh),
            _ => f.build(),
        };
        let ip = f.ip_off();
        // Another protocol: the protocol (IPv4) or next-header (IPv6) byte.
        let other = match d.l4 {
            8 if self.ipv4 => Some(1),
            8 => Some(58),
            9 => Some(47),
            _ => None,
        };
        if let Some(p) = other {
            b[ip + if self.ipv4 { 9 } else { 6 }] = p;
        }
        if let Some((_, true)) = d.vlan {
            // 802.1ad (QinQ outer tag) instead of 802.1Q.
            b[12..14].copy_from_slice(&0x88a8u16.to_be_bytes());
        }
        match d.mutation {
            7 => b.truncate(d.cut % (b.len() + 1)),
            8 | 9 => {
                let i = d.cut % b.len();
                b[i] ^= d.flip;
            }
            _ => {}
        }
        b
    }
}

/// Property: on `cases` random and mutated frames of `pool`'s family, the kernel's XDP
/// ingress (native on a NIC and on a virtual device, and generic), TC ingress and TC
/// egress agree with the model; so does
/// the reply of every flow an ingress run records, at TC egress.
pub fn kernel_matches_model(dp: &Dataplane, pool: &Pool, cases: u32) {
    let progs = [
        Prog::XdpIngress,
        Prog::XdpVirtual,
        Prog::XdpGeneric,
        Prog::TcIngress,
        Prog::TcEgress,
    ];
    kernel_matches_model_in(dp, Env::default(), pool, &progs, cases);
}

/// As [`kernel_matches_model`], for `progs` run in `env` (NAT64's namespace); the
/// backend's answer to every NAT64 flow recorded is checked too, at TC ingress and at
/// NAT64's entry.
pub fn kernel_matches_model_in(
    dp: &Dataplane,
    env: Env<'_>,
    pool: &Pool,
    progs: &[Prog],
    cases: u32,
) {
    // PROPTEST_CASES overrides the suite's count: the same check, fuzzing-sized.
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases);
    let mut runner = TestRunner::new(ProptestConfig::with_cases(cases));
    runner
        .run(&draw(), |d| {
            let f = pool.frame(&d);
            let input = pool.bytes(&d, &f);
            for &prog in progs {
                let Some(c) = compare_in(dp, env, prog, &input) else {
                    continue;
                };
                if prog == Prog::TcEgress {
                    continue;
                }
                if let Some((k, flow)) = c.nat64.and_then(|o| o.flow) {
                    // The backend's answer to the NAT64 flow just recorded.
                    let answer = Frame {
                        ack: (k.proto() == proto::TCP).then_some(1),
                        payload: f.payload.clone(),
                        ..Frame::new(
                            k.proto(),
                            (
                                Ipv4Addr::from(flow.backend_addr),
                                u16::from_be_bytes(flow.backend_port),
                            ),
                            (
                                Ipv4Addr::from(flow.snat_addr),
                                u16::from_be_bytes(flow.snat_port),
                            ),
                        )
                    };
                    for prog in [Prog::TcIngress, Prog::Nat64Entry] {
                        compare_in(dp, env, prog, &answer.build()).expect("a whole answer runs");
                    }
                }
                // The backend's reply on the flow just recorded.
                let (backend, client) = match c.outcome.flow {
                    Some(FlowWrite::V4(k, _)) => {
                        let ((b, bp), (c, cp)) = (k.backend(), k.client());
                        ((IpAddr::from(b), bp), (IpAddr::from(c), cp))
                    }
                    Some(FlowWrite::V6(k, _)) => {
                        let ((b, bp), (c, cp)) = (k.backend(), k.client());
                        ((IpAddr::from(b), bp), (IpAddr::from(c), cp))
                    }
                    None => continue,
                };
                let reply = Frame {
                    ip_options: 0,
                    more_fragments: false,
                    frag_offset: 0,
                    ..f.with_src(backend).with_dst(client)
                };
                compare_in(dp, env, Prog::TcEgress, &reply.build()).expect("a whole reply runs");
            }
            Ok(())
        })
        .expect("kernel and model agree");
}

/// The fast path to a bridge port (`port`, the backend's on `env`'s FIB interface) whose
/// veth peer is in another namespace: TC hands `syn` to the peer, XDP (which cannot)
/// sends it out of the port. Leaves that port as the only one.
pub fn peer_hand_over(dp: &mut Dataplane, env: Env<'_>, syn: &Frame, port: u32) {
    let ifindex = env.fib.expect("a fast-path FIB").ifindex;
    let peer = [(
        BridgePortKey::new(ifindex, BACKEND_MAC),
        port | BRIDGE_PORT_PEER,
    )]
    .into_iter()
    .collect();
    dp.sync_bridge_ports(&peer).expect("bridge ports");
    for (prog, want) in [
        (Prog::XdpIngress, Verdict::Redirect(port)),
        (Prog::XdpVirtual, Verdict::Redirect(port)),
        (Prog::XdpGeneric, Verdict::Redirect(port)),
        (Prog::TcIngress, Verdict::RedirectPeer(port)),
    ] {
        let c = compare_in(dp, env, prog, &syn.build()).expect("runs");
        assert_eq!(c.outcome.verdict, want, "{prog:?}");
    }
}

/// No bridge port known: the fast path falls back and the kernel routes `syn`, translated
/// to `routed`. Leaves no bridge port.
pub fn unknown_bridge_port_falls_back(
    dp: &mut Dataplane,
    env: Env<'_>,
    syn: &Frame,
    routed: &Frame,
) {
    dp.sync_bridge_ports(&Default::default())
        .expect("no bridge ports");
    for prog in [Prog::XdpIngress, Prog::TcIngress] {
        let c = compare_in(dp, env, prog, &syn.build()).expect("runs");
        assert_eq!(c.output, routed.build(), "{prog:?}");
        assert!(
            c.counted.contains(&(Reason::FastPathFallback, 1)),
            "{prog:?}"
        );
    }
}
