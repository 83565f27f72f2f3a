//! Results: raw samples (CSV and JSON), the Markdown summary (medians, min–max, ratios to
//! direct and to iptables, the issue's targets marked met or missed) and SVG charts.
//! A difference is only claimed when the min–max ranges do not overlap.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::Path,
};

use anyhow::Result;

use super::{
    control::ControlResult, micro::MicroResult, restart::RestartResult, scale::ScaleResult,
};

#[derive(Clone, Debug, serde::Serialize)]
pub struct Sample {
    pub round: u32,
    pub variant: String,
    pub workload: String,
    pub metric: String,
    pub value: f64,
    /// Busy CPU seconds during the run (both cores; UDP: the forwarding core).
    pub cpu_s: f64,
    pub units: f64,
    pub cpu_per_unit: Option<f64>,
    pub cpu_unit: String,
    /// Machine load (0..1) just before the case: other processes' noise.
    pub bg_load: f64,
    pub syn_retrans: Option<u64>,
    pub note: String,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Failure {
    pub round: u32,
    pub variant: String,
    pub workload: String,
    pub error: String,
}

#[derive(Default, serde::Serialize)]
pub struct Results {
    pub meta: BTreeMap<String, String>,
    pub variants: Vec<String>,
    pub unavailable: Vec<(String, String)>,
    pub samples: Vec<Sample>,
    pub failures: Vec<Failure>,
    pub micro: Vec<MicroResult>,
    pub control: Vec<ControlResult>,
    pub restart: Vec<RestartResult>,
    pub scale: Vec<ScaleResult>,
    pub local_unavailable: Vec<(String, String)>,
    /// Extra rounds run where verdicts were open.
    pub extra_rounds: u32,
}

#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

fn stat(mut v: Vec<f64>) -> Option<Stat> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stat {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

fn overlap(a: &Stat, b: &Stat) -> bool {
    a.min <= b.max && b.min <= a.max
}

/// What portfwd must not be behind (issue #13): the ways Docker publishes ports.
pub const COMPARATORS: [&str; 2] = ["iptables", "docker-proxy"];

/// The headline metric of each workload: (workload, metric, label, unit, higher is better).
pub const HEADLINES: &[(&str, &str, &str, &str, bool)] = &[
    ("tcp1", "gbit_s", "TCP, 1 stream", "Gbit/s", true),
    (
        "tcp1-tso",
        "gbit_s",
        "TCP, 1 stream, client offloads on",
        "Gbit/s",
        true,
    ),
    ("tcp4", "gbit_s", "TCP, 4 streams", "Gbit/s", true),
    ("crr", "req_s", "new connection per request", "req/s", true),
    ("keepalive", "req_s", "HTTP keep-alive", "req/s", true),
    (
        "latency",
        "p50_us",
        "request/response p50 (64 B)",
        "µs",
        false,
    ),
    (
        "latency",
        "p99_us",
        "request/response p99 (64 B)",
        "µs",
        false,
    ),
    ("udp64", "mpps", "64-byte UDP", "Mpps", true),
    ("v6-udp64", "mpps", "64-byte UDP over IPv6", "Mpps", true),
    (
        "local-crr",
        "req_s",
        "localhost:PORT, new connection per request",
        "req/s",
        true,
    ),
    (
        "local-tcp1",
        "gbit_s",
        "localhost:PORT, TCP 1 stream",
        "Gbit/s",
        true,
    ),
    (
        "v6-tcp1",
        "gbit_s",
        "IPv6 client, IPv4-only container, TCP 1 stream",
        "Gbit/s",
        true,
    ),
    (
        "v6-tcp1-tso",
        "gbit_s",
        "IPv6 client, IPv4-only container, TCP 1 stream, client offloads on",
        "Gbit/s",
        true,
    ),
    (
        "v6-crr",
        "req_s",
        "IPv6 client, IPv4-only container, new connection per request",
        "req/s",
        true,
    ),
];

impl Results {
    pub fn stat(&self, variant: &str, workload: &str, metric: &str) -> Option<Stat> {
        stat(
            self.samples
                .iter()
                .filter(|s| s.variant == variant && s.workload == workload && s.metric == metric)
                .map(|s| s.value)
                .collect(),
        )
    }

    fn cpu_stat(&self, variant: &str, workload: &str, metric: &str) -> Option<(Stat, String)> {
        let v: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.variant == variant && s.workload == workload && s.metric == metric)
            .filter(|s| s.cpu_per_unit.is_some())
            .collect();
        let unit = v.first()?.cpu_unit.clone();
        Some((
            stat(v.iter().filter_map(|s| s.cpu_per_unit).collect())?,
            unit,
        ))
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::write(
            dir.join("results.json"),
            serde_json::to_string_pretty(self)?,
        )?;
        let mut csv = String::from(
            "round,variant,workload,metric,value,cpu_s,units,cpu_per_unit,cpu_unit,bg_load,syn_retrans,note\n",
        );
        for s in &self.samples {
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{:.4},{},{},{},{:.3},{},\"{}\"",
                s.round,
                s.variant,
                s.workload,
                s.metric,
                s.value,
                s.cpu_s,
                s.units,
                s.cpu_per_unit
                    .map(|c| format!("{c:.3}"))
                    .unwrap_or_default(),
                s.cpu_unit,
                s.bg_load,
                s.syn_retrans.map(|c| c.to_string()).unwrap_or_default(),
                s.note.replace('"', "'")
            );
        }
        std::fs::write(dir.join("samples.csv"), csv)?;
        let mut micro = String::from(
            "program,case,ns_median,ns_min,ns_max,over_floor,over_floor_calm,retval\n",
        );
        for m in &self.micro {
            let _ = writeln!(
                micro,
                "{},{},{},{},{},{},{},{}",
                m.program, m.case, m.ns, m.min, m.max, m.over_floor, m.calm_over_floor, m.retval
            );
        }
        std::fs::write(dir.join("micro.csv"), micro)?;
        let mut ctl = String::from("publisher,method,ports,seconds,rss_kib,note\n");
        for c in &self.control {
            let _ = writeln!(
                ctl,
                "{},{},{},{},{},\"{}\"",
                c.publisher,
                c.method,
                c.ports,
                c.seconds.map(|s| format!("{s:.4}")).unwrap_or_default(),
                c.rss_kib.map(|s| s.to_string()).unwrap_or_default(),
                c.note.replace('"', "'")
            );
        }
        std::fs::write(dir.join("control.csv"), ctl)?;
        std::fs::write(dir.join("summary.md"), self.summary())?;
        std::fs::write(dir.join("ratios.svg"), self.ratio_chart())?;
        for &(w, m, label, unit, _) in HEADLINES {
            let bars: Vec<Bar> = self
                .variants
                .iter()
                .filter_map(|v| {
                    self.stat(v, w, m).map(|s| Bar {
                        label: v.clone(),
                        value: s.median,
                        lo: s.min,
                        hi: s.max,
                    })
                })
                .collect();
            if !bars.is_empty() {
                let svg = bar_chart(
                    &format!("{label} ({unit}): median, whiskers min–max"),
                    &[(String::new(), bars)],
                    None,
                );
                std::fs::write(dir.join(format!("{w}-{m}.svg")), svg)?;
            }
        }
        Ok(())
    }

    fn cell(&self, v: &str, w: &str, m: &str) -> String {
        match self.stat(v, w, m) {
            Some(s) if s.n > 1 => format!("{} ({}–{})", num(s.median), num(s.min), num(s.max)),
            Some(s) => num(s.median),
            None => "–".into(),
        }
    }

    /// "1.23×" of `v` over `base`, with "≈" when their ranges overlap.
    fn ratio(&self, v: &str, base: &str, w: &str, m: &str) -> Option<(f64, bool)> {
        let a = self.stat(v, w, m)?;
        let b = self.stat(base, w, m)?;
        if b.median == 0.0 {
            return None;
        }
        Some((a.median / b.median, overlap(&a, &b)))
    }

    fn ratio_cell(&self, v: &str, base: &str, w: &str, m: &str) -> String {
        match self.ratio(v, base, w, m) {
            Some((r, ov)) => format!("{r:.2}×{}", if ov && v != base { " ≈" } else { "" }),
            None => "–".into(),
        }
    }

    pub fn summary(&self) -> String {
        let mut s = String::from("# portfwd benchmark summary\n\n");
        for (k, v) in &self.meta {
            let _ = writeln!(s, "- {k}: {v}");
        }
        for (v, why) in &self.unavailable {
            let _ = writeln!(s, "- variant `{v}` not measured: {why}");
        }
        for (v, why) in &self.local_unavailable {
            let _ = writeln!(s, "- `localhost:PORT` through `{v}`: {why}");
        }
        s += "\nMedians over the rounds, (min–max) across rounds. Ratios are of medians; `≈` marks \
              ratios whose min–max ranges overlap the baseline's: no difference is claimed there.\n\n";

        s += "## Results\n\n| workload |";
        for v in &self.variants {
            let _ = write!(s, " {v} |");
        }
        s += "\n|---|";
        s += &"---|".repeat(self.variants.len());
        s.push('\n');
        for &(w, m, label, unit, _) in HEADLINES {
            let _ = write!(s, "| {label} ({unit}) |");
            for v in &self.variants {
                let _ = write!(s, " {} |", self.cell(v, w, m));
            }
            s.push('\n');
        }

        for base in ["direct", "iptables"] {
            if !self.variants.iter().any(|v| v == base) {
                continue;
            }
            let _ = write!(s, "\n## Ratio to {base}\n\n| workload |");
            for v in &self.variants {
                let _ = write!(s, " {v} |");
            }
            s += "\n|---|";
            s += &"---|".repeat(self.variants.len());
            s.push('\n');
            for &(w, m, label, _, better_high) in HEADLINES {
                let _ = write!(
                    s,
                    "| {label}{} |",
                    if better_high {
                        ""
                    } else {
                        " (lower is better)"
                    }
                );
                for v in &self.variants {
                    let _ = write!(s, " {} |", self.ratio_cell(v, base, w, m));
                }
                s.push('\n');
            }
        }

        s += "\n## CPU per unit of work (busy time of both cores over the run; 64-byte UDP: the \
              forwarding core)\n\n| workload |";
        for v in &self.variants {
            let _ = write!(s, " {v} |");
        }
        s += "\n|---|";
        s += &"---|".repeat(self.variants.len());
        s.push('\n');
        for &(w, m, label, _, _) in HEADLINES {
            if m.ends_with("_us") {
                continue;
            }
            let unit = self
                .variants
                .iter()
                .find_map(|v| self.cpu_stat(v, w, m).map(|(_, u)| u))
                .unwrap_or_default();
            let _ = write!(s, "| {label} ({unit}) |");
            for v in &self.variants {
                match self.cpu_stat(v, w, m) {
                    Some((st, _)) if st.n > 1 => {
                        let _ =
                            write!(s, " {} ({}–{}) |", num(st.median), num(st.min), num(st.max));
                    }
                    Some((st, _)) => {
                        let _ = write!(s, " {} |", num(st.median));
                    }
                    None => s += " – |",
                }
            }
            s.push('\n');
        }

        // A retransmitted SYN in a connection-rate run is a trap of the rig (TIME_WAIT,
        // BENCH-NOTES.md) or of the forwarder: 0 wherever the client talks IPv4. Through
        // NAT64 (`v6-crr`), whose 4,536 ports wrk's churn outruns, a port is sometimes
        // taken over from a connection the backend still holds in TIME_WAIT, which
        // refuses the first SYN (README: NAT64).
        s += "\n## SYN retransmissions during connection-rate runs\n\n\
              | variant | IPv4 clients (must be 0) | `v6-crr`, through NAT64 (port takeovers the backend's TIME_WAIT refuses) |\n|---|---|---|\n";
        for v in &self.variants {
            let total = |nat64: bool| -> u64 {
                self.samples
                    .iter()
                    .filter(|x| &x.variant == v && x.workload.ends_with("crr"))
                    .filter(|x| (x.workload == "v6-crr") == nat64)
                    .filter_map(|x| x.syn_retrans)
                    .sum()
            };
            let _ = writeln!(s, "| {v} | {} | {} |", total(false), total(true));
        }

        s += &self.targets();
        s += &self.targets13();

        if !self.micro.is_empty() {
            s += "\n## Program cost (BPF_PROG_RUN, repeat; kernel-timed ns per packet)\n\n\
                  Over the empty program: each run of a program follows a run of the empty \
                  program on the same frame, in rounds over every case; the median of the \
                  differences, and their mean over the 5 % of pairs whose program ran \
                  fastest (the calmest moments: the cost on a core left alone, what the \
                  targets judge).\n\n\
                  | program | case | ns (median, min–max) | over the empty program (median of pairs) | (calmest 5 %) | verdict |\n|---|---|---|---|---|---|\n";
            for m in &self.micro {
                let over = |x: f64| {
                    if m.case == "floor" {
                        "–".to_string()
                    } else {
                        format!("{x:+.1}")
                    }
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.1} ({:.1}–{:.1}) | {} | {} | {} |",
                    m.program,
                    m.case,
                    m.ns,
                    m.min,
                    m.max,
                    over(m.over_floor),
                    over(m.calm_over_floor),
                    m.retval as i32
                );
            }
        }
        if !self.control.is_empty() {
            s += "\n## Control plane: publishing ports\n\n| publisher | method | ports | time | resident memory after | note |\n|---|---|---|---|---|---|\n";
            for c in &self.control {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} |",
                    c.publisher,
                    c.method,
                    c.ports,
                    c.seconds
                        .map(|x| format!("{x:.3} s"))
                        .unwrap_or_else(|| "–".into()),
                    c.rss_kib
                        .map(|k| format!("{:.1} MB", k as f64 / 1024.0))
                        .unwrap_or_else(|| "–".into()),
                    c.note
                );
            }
        }
        let (flood, restart): (Vec<&RestartResult>, Vec<&RestartResult>) =
            self.restart.iter().partition(|r| r.event == "syn-flood");
        if !restart.is_empty() {
            s += "\n## Restart, upgrade, crash: established connections\n\nEach connection ping-pongs 64 bytes once a millisecond through a published port while the daemon goes away and a new one adopts the pinned state. Target: 0 lost, a longest gap close to the baseline (the longest wait between answers before the event).\n\n| event | connections | lost | longest gap | baseline gap | control socket away | note |\n|---|---|---|---|---|---|---|\n";
            let ms = |x: Option<f64>| x.map_or_else(|| "–".into(), |v| format!("{v:.1} ms"));
            for r in &restart {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    r.event,
                    r.connections,
                    r.lost.map_or_else(|| "–".into(), |n| n.to_string()),
                    ms(r.longest_gap_ms),
                    ms(r.baseline_gap_ms),
                    ms(r.control_away_ms),
                    r.note
                );
            }
        }
        if !flood.is_empty() {
            s += "\n## SYN flood: established connections\n\nThe same connections while `bench_gen` (BPF_PROG_RUN live frames from the client's veth) floods the published port with SYNs from random spoofed sources, as fast as the machine goes; SYNs only fill the embryonic table. Target: 0 lost at the flood rate reached (offered by the generator; seen: translated by portfwd).\n\n| connections | lost | flood offered | flood seen by portfwd | longest gap | baseline gap | note |\n|---|---|---|---|---|---|---|\n";
            let ms = |x: Option<f64>| x.map_or_else(|| "–".into(), |v| format!("{v:.1} ms"));
            let pps = |x: Option<f64>| x.map_or_else(|| "–".into(), |v| format!("{:.0} /s", v));
            for r in &flood {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    r.connections,
                    r.lost.map_or_else(|| "–".into(), |n| n.to_string()),
                    pps(r.flood_offered_pps),
                    pps(r.flood_seen_pps),
                    ms(r.longest_gap_ms),
                    ms(r.baseline_gap_ms),
                    r.note
                );
            }
        }
        if !self.scale.is_empty() {
            s += &self.scale_table();
        }
        if !self.failures.is_empty() {
            s += "\n## Failed cases\n\n";
            for f in &self.failures {
                let _ = writeln!(
                    s,
                    "- round {} {} {}: {}",
                    f.round,
                    f.variant,
                    f.workload,
                    f.error.lines().next().unwrap_or("")
                );
            }
        }
        // XDP forced onto the rig's veth: shown, not judged (see `judged_variant`).
        let forced: Vec<String> = self
            .gaps(|v| !judged_variant(v))
            .into_iter()
            .chain(self.failed_where_compared_by(|v| !judged_variant(v)))
            .collect();
        if !forced.is_empty() {
            s += "\n## XDP forced onto a veth (shown, not judged)\n\n\
                  On a veth, `--ingress auto` attaches TC: the kernel turns GSO off on the peer \
                  of a veth with a native XDP program, and generic XDP copies every skb into one \
                  linear buffer. These variants measure that trap; where they trail:\n\n";
            for f in &forced {
                let _ = writeln!(s, "- {f}");
            }
        }
        // Last, so nobody has to hunt for it.
        let behind = self.behind();
        s += "\n## portfwd behind iptables or docker-proxy\n\n";
        if !self.judged() {
            s += "portfwd behind iptables or docker-proxy with non-overlapping ranges: not judged \
                  (no workload has two samples of portfwd and of iptables or docker-proxy: \
                  one sample is not a range)\n";
        } else if behind.is_empty() {
            s += "portfwd behind iptables or docker-proxy with non-overlapping ranges: none\n";
        } else {
            s += "portfwd behind iptables or docker-proxy with non-overlapping ranges:\n\n";
            for b in &behind {
                let _ = writeln!(s, "- {b}");
            }
        }
        let failed = self.failed_where_compared();
        if !failed.is_empty() {
            s += "\nportfwd failed where iptables or docker-proxy was measured (see Failed cases):\n\n";
            for f in &failed {
                let _ = writeln!(s, "- {f}");
            }
        }
        s
    }

    /// Workloads where a judged portfwd variant has failures and no result while a
    /// comparator has one: as bad as behind, and not hidden by a missing median.
    fn failed_where_compared(&self) -> Vec<String> {
        self.failed_where_compared_by(judged_variant)
    }

    /// As [`Self::failed_where_compared`], for the portfwd variants `which` selects.
    fn failed_where_compared_by(&self, which: impl Fn(&str) -> bool) -> Vec<String> {
        let mut out = Vec::new();
        for &(w, m, label, _, _) in HEADLINES {
            for v in self.portfwd_variants().filter(|v| which(v)) {
                let failed = self
                    .failures
                    .iter()
                    .any(|f| &f.variant == v && f.workload == w);
                if !failed || self.stat(v, w, m).is_some() {
                    continue;
                }
                let bases: Vec<&str> = COMPARATORS
                    .into_iter()
                    .filter(|b| self.stat(b, w, m).is_some())
                    .collect();
                if !bases.is_empty() {
                    // The client's offload hands a veth's native XDP partial checksums.
                    let trap = if w.ends_with("-tso") && native_xdp(v) {
                        " (native XDP on a veth sees the client's partial checksums, which no wire carries)"
                    } else {
                        ""
                    };
                    out.push(format!(
                        "{label}: `{v}` failed, {} measured{trap}",
                        bases.join(" and ")
                    ));
                }
            }
        }
        out
    }

    fn portfwd_variants(&self) -> impl Iterator<Item = &String> {
        self.variants.iter().filter(|v| v.starts_with("portfwd"))
    }

    /// The portfwd variants whose verdict counts (see [`judged_variant`]).
    fn judged_variants(&self) -> impl Iterator<Item = &String> {
        self.portfwd_variants().filter(|v| judged_variant(v))
    }

    /// (variant, workload) pairs whose verdict is open: on a headline metric, a portfwd
    /// variant's min–max range overlaps iptables' or docker-proxy's, or lies behind it
    /// (a "behind" claim gets the same extra rounds before it is reported). Both sides
    /// are listed; a clear lead over both closes the case.
    pub fn open_verdicts(&self) -> BTreeSet<(String, String)> {
        let mut open = BTreeSet::new();
        for &(w, m, _, _, higher) in HEADLINES {
            for v in self.judged_variants() {
                let Some(a) = self.stat(v, w, m) else {
                    continue;
                };
                for base in COMPARATORS {
                    let Some(b) = self.stat(base, w, m) else {
                        continue;
                    };
                    let ahead = if higher { a.min > b.max } else { a.max < b.min };
                    if !ahead {
                        open.insert((v.clone(), w.to_string()));
                        open.insert((base.to_string(), w.to_string()));
                    }
                }
            }
        }
        open
    }

    /// Whether any headline has at least two samples of a portfwd variant and of a
    /// comparator (one sample makes no range: `--quick`).
    fn judged(&self) -> bool {
        HEADLINES.iter().any(|&(w, m, ..)| {
            self.judged_variants().any(|v| {
                COMPARATORS.iter().any(|b| {
                    let n = |x: &str| self.stat(x, w, m).map_or(0, |s| s.n);
                    n(v) >= 2 && n(b) >= 2
                })
            })
        })
    }

    /// Every headline where a judged portfwd variant is behind iptables or docker-proxy
    /// with min–max ranges apart (two samples each at least: one sample is not a range).
    pub fn behind(&self) -> Vec<String> {
        self.gaps(judged_variant)
    }

    /// As [`Self::behind`], for the portfwd variants `which` selects.
    fn gaps(&self, which: impl Fn(&str) -> bool) -> Vec<String> {
        let mut out = Vec::new();
        for &(w, m, label, unit, higher) in HEADLINES {
            for v in self.portfwd_variants().filter(|v| which(v)) {
                let Some(a) = self.stat(v, w, m) else {
                    continue;
                };
                for base in COMPARATORS {
                    let Some(b) = self.stat(base, w, m) else {
                        continue;
                    };
                    let worse = if higher {
                        a.median < b.median
                    } else {
                        a.median > b.median
                    };
                    if worse && !overlap(&a, &b) && a.n >= 2 && b.n >= 2 {
                        out.push(format!(
                            "{label}: `{v}` {} ({}–{}) vs `{base}` {} ({}–{}) {unit}, {:.2}×",
                            num(a.median),
                            num(a.min),
                            num(a.max),
                            num(b.median),
                            num(b.min),
                            num(b.max),
                            a.median / b.median
                        ));
                    }
                }
            }
        }
        out
    }

    /// Issue #13's targets, each met, missed or not measured.
    fn targets13(&self) -> String {
        let mut s = String::from(
            "\n## Targets (issue 13)\n\n| target | where | measured | status |\n|---|---|---|---|\n",
        );
        let mut row = |t: &str, v: &str, measured: String, status: &str| {
            let _ = writeln!(s, "| {t} | {v} | {measured} | {status} |");
        };
        let micro = |prog: &str, case: &str| {
            self.micro
                .iter()
                .find(|m| m.program == prog && m.case == case)
        };
        let limit = |x: Option<&MicroResult>, max: f64| match x {
            Some(m) => (
                format!("{:+.1} ns (median {:+.1})", m.calm_over_floor, m.over_floor),
                if m.calm_over_floor <= max {
                    "met"
                } else {
                    "missed"
                },
            ),
            None => ("–".into(), "not measured"),
        };
        const XDP: &str = "portfwd_xdp_ingress";
        const TC: &str = "portfwd_tc_ingress";
        for (t, prog, case, max) in [
            ("exact-rule hit ≤ +30 ns", XDP, "hit (exact rule)", 30.0),
            (
                "exact-rule hit ≤ +30 ns",
                "portfwd_xdp_virtual",
                "hit (exact rule)",
                30.0,
            ),
            ("exact-rule hit ≤ +45 ns", TC, "hit (exact rule)", 45.0),
            ("miss ≤ +10 ns", XDP, "miss (no rule)", 10.0),
            ("miss ≤ +10 ns", TC, "miss (no rule)", 10.0),
            (
                "reply ≤ +45 ns",
                "portfwd_tc_egress",
                "reply hit (tracked flow)",
                45.0,
            ),
        ] {
            let (measured, status) = limit(micro(prog, case), max);
            row(t, prog, measured, status);
        }
        for prog in [XDP, TC] {
            // The same cost: within the 5 ns a case's calm cost moves between runs of one
            // object (the XDP exact hit: +23.8 to +28.0 ns in four runs).
            let (measured, status) = match (
                micro(prog, "hit (wildcard rule)"),
                micro(prog, "hit (exact rule)"),
            ) {
                (Some(w), Some(e)) => (
                    format!(
                        "{:+.1} ns vs {:+.1} ns exact",
                        w.calm_over_floor, e.calm_over_floor
                    ),
                    if w.calm_over_floor <= e.calm_over_floor + 5.0 {
                        "met"
                    } else {
                        "missed"
                    },
                ),
                _ => ("–".into(), "not measured"),
            };
            row(
                "wildcard hit costs what an exact hit costs",
                prog,
                measured,
                status,
            );
        }
        // 65,535 ports: every port there is (0 is no port).
        let ports: Vec<&ScaleResult> = self
            .scale
            .iter()
            .filter(|r| r.measure == "ports" && r.scale >= 65_535)
            .collect();
        let (measured, status) = if ports.is_empty() {
            ("–".into(), "not measured in this run")
        } else if ports.iter().any(|r| r.median.is_none()) {
            ("failed (see the scale table)".into(), "missed")
        } else {
            let values: Vec<String> = ports
                .iter()
                .map(|r| format!("{} {}", num(r.median.unwrap_or(0.0)), r.unit))
                .collect();
            (
                format!("{} ports: {}", ports[0].scale, values.join(", ")),
                "met (measured)",
            )
        };
        row(
            "publishing and memory with 65,536 ports",
            "portfwd",
            measured,
            status,
        );
        for fast in ["portfwd-tc-fast", "portfwd-xdp-fast"] {
            for w in ["udp64", "v6-udp64"] {
                let (measured, status) = self.fast_path_udp(fast, w);
                row(
                    &format!("64-byte UDP ≥ 2.5× direct through the fast path (`{w}`)"),
                    fast,
                    measured,
                    &status,
                );
            }
        }
        let ran = |v: &str, w: &str| {
            self.samples
                .iter()
                .any(|x| x.variant == v && x.workload == w)
        };
        let any_ran = !self.samples.is_empty();
        row(
            "GRO on the host's receiving interface, every variant",
            "topology",
            "checked when each topology is built".into(),
            if any_ran { "met" } else { "not measured" },
        );
        let both: Vec<&String> = self
            .variants
            .iter()
            .filter(|v| ran(v, "tcp1") && ran(v, "tcp1-tso"))
            .collect();
        row(
            "bulk TCP with the client's offloads off and on",
            "`tcp1`, `tcp1-tso`",
            format!("{} variants measured both", both.len()),
            if both.is_empty() {
                "not measured"
            } else {
                "met"
            },
        );
        let dp = self.samples.iter().any(|x| x.variant == "docker-proxy");
        row(
            "docker-proxy compared in every run",
            "docker-proxy",
            if dp { "measured" } else { "–" }.into(),
            if dp { "met" } else { "missed" },
        );
        let extra = self.meta.get("extra rounds (ranges overlapped)");
        row(
            "more rounds where ranges overlap",
            "portfwd, iptables, docker-proxy",
            extra.map_or_else(
                || "–".into(),
                |_| format!("{} extra rounds (listed above)", self.extra_rounds),
            ),
            if extra.is_some() {
                "met"
            } else {
                "not run (--quick or --extra-rounds 0)"
            },
        );
        let behind = self.behind().len() + self.failed_where_compared().len();
        let compared = self.judged_variants().any(|v| {
            COMPARATORS.iter().any(|b| {
                HEADLINES
                    .iter()
                    .any(|h| self.stat(v, h.0, h.1).is_some() && self.stat(b, h.0, h.1).is_some())
            })
        });
        row(
            "no workload where portfwd is behind iptables or docker-proxy (ranges apart)",
            "portfwd as `--ingress auto` runs it on a veth (TC, with and without the fast path)",
            format!("{behind} behind or failed (listed at the end)"),
            if !compared || !self.judged() {
                "not measured"
            } else if behind == 0 {
                "met"
            } else {
                "missed"
            },
        );
        let scale_ok = |measure: &str| {
            [1_000u64, 100_000, 1_000_000].iter().all(|n| {
                self.scale
                    .iter()
                    .any(|r| r.measure == measure && r.scale == *n && r.median.is_some())
            })
        };
        let (cost, rate) = (scale_ok("hit cost"), scale_ok("forwarding"));
        row(
            "hit cost and forwarding rate with 1,000, 100,000 and 1,000,000 live flows",
            "portfwd",
            format!(
                "hit cost {}, forwarding {} (scale table)",
                if cost { "measured" } else { "–" },
                if rate { "measured" } else { "–" }
            ),
            if cost && rate {
                "met (measured)"
            } else if self.scale.is_empty() {
                "not measured (--no-scale)"
            } else {
                "missed: a case failed or was not run"
            },
        );
        s
    }

    /// Scale: hit cost and forwarding rate by live flows, publishing many ports.
    fn scale_table(&self) -> String {
        let mut s = String::from(
            "\n## Scale: live flows and published ports (issue 13)\n\nHit cost: BPF_PROG_RUN once per frame (`repeat` 1), each frame a randomly drawn live flow of a table filled from userspace, so lookups miss the cache as in production; median of the passes' means (min–max), and over an empty program run the same way. Forwarding: 64-byte UDP from one source per flow through the daemon at TC with `--max-flows` above the count, every flow live and established (a first run records flows and the value the programs write, then all are filled into the established table through the daemon's map). Ports: one range, one to one onto the container.\n\n| measurement | case | flows or ports | value (median, min–max) | over the empty program | note |\n|---|---|---|---|---|---|\n",
        );
        for r in &self.scale {
            let value = match (r.median, r.min, r.max) {
                (Some(m), Some(lo), Some(hi)) => {
                    format!("{} ({}–{}) {}", num(m), num(lo), num(hi), r.unit)
                }
                (Some(m), ..) => format!("{} {}", num(m), r.unit),
                _ => "–".into(),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {value} | {} | {} |",
                r.measure,
                r.case,
                r.scale,
                r.over_floor
                    .map_or_else(|| "–".into(), |x| format!("{x:+.1} ns")),
                r.note
            );
        }
        s
    }

    /// The issue's targets, each marked met, missed, not shown (ranges overlap) or not
    /// measured, for every portfwd variant that ran.
    fn targets(&self) -> String {
        let mut s = String::from("\n## Targets (issue 5)\n\n| target | variant | measured | status |\n|---|---|---|---|\n");
        let pf: Vec<&String> = self
            .variants
            .iter()
            .filter(|v| v.starts_with("portfwd"))
            .collect();
        if pf.is_empty() {
            s += "| every target | portfwd | – | not measured: the daemon is not available |\n";
        }
        let mut row = |t: &str, v: &str, measured: String, status: String| {
            let _ = writeln!(s, "| {t} | {v} | {measured} | {status} |");
        };
        for v in &pf {
            let checks: [(&str, &str, &str, &str, f64, bool); 9] = [
                (
                    "new connections/s ≥ 1.2× iptables",
                    "crr",
                    "req_s",
                    "iptables",
                    1.2,
                    true,
                ),
                (
                    "new connections/s ≥ 0.97× direct",
                    "crr",
                    "req_s",
                    "direct",
                    0.97,
                    true,
                ),
                (
                    "TCP 1 stream ≥ 0.97× direct",
                    "tcp1",
                    "gbit_s",
                    "direct",
                    0.97,
                    true,
                ),
                (
                    "TCP 4 streams ≥ 0.97× direct",
                    "tcp4",
                    "gbit_s",
                    "direct",
                    0.97,
                    true,
                ),
                (
                    "keep-alive requests/s ≥ 0.97× direct",
                    "keepalive",
                    "req_s",
                    "direct",
                    0.97,
                    true,
                ),
                (
                    "p99 latency ≤ 1.03× direct",
                    "latency",
                    "p99_us",
                    "direct",
                    1.03,
                    false,
                ),
                (
                    "64-byte UDP ≥ 1.5× iptables (kernel path)",
                    "udp64",
                    "mpps",
                    "iptables",
                    1.5,
                    true,
                ),
                (
                    "localhost new connections/s ≥ 0.97× host → container",
                    "local-crr",
                    "req_s",
                    "direct",
                    0.97,
                    true,
                ),
                (
                    "localhost TCP ≥ 0.97× host → container",
                    "local-tcp1",
                    "gbit_s",
                    "direct",
                    0.97,
                    true,
                ),
            ];
            for (t, w, m, base, x, higher) in checks {
                let (measured, status) = self.check(v, base, w, m, x, higher);
                row(t, v, measured, status);
            }
            let (measured, status) = self.check(v, "docker-proxy", "local-crr", "req_s", 1.8, true);
            row(
                "localhost new connections/s ≥ 1.8× docker-proxy",
                v,
                measured,
                status,
            );
            for (what, w, m) in [
                ("localhost new connections/s", "local-crr", "req_s"),
                (
                    "IPv6 client → IPv4-only container, TCP",
                    "v6-tcp1",
                    "gbit_s",
                ),
                (
                    "IPv6 client → IPv4-only container, new connections/s",
                    "v6-crr",
                    "req_s",
                ),
            ] {
                let (measured, _) = self.check(v, "socat", w, m, 1.0, true);
                if measured != "–" {
                    row(
                        &format!("(for reference, no target) {what} vs socat"),
                        v,
                        measured,
                        "–".into(),
                    );
                }
            }
            // CPU per unit below iptables on every workload.
            let mut worse = Vec::new();
            let mut compared = 0;
            for &(w, m, label, _, _) in HEADLINES {
                if let (Some((a, _)), Some((b, _))) =
                    (self.cpu_stat(v, w, m), self.cpu_stat("iptables", w, m))
                {
                    compared += 1;
                    if a.median >= b.median {
                        worse.push(format!(
                            "{label} {:.2}×{}",
                            a.median / b.median,
                            if overlap(&a, &b) { " ≈" } else { "" }
                        ));
                    }
                }
            }
            row(
                "CPU per packet/request below iptables on every workload",
                v,
                format!("{compared} workloads compared"),
                if compared == 0 {
                    "not measured".into()
                } else if worse.is_empty() {
                    "met".into()
                } else {
                    format!("missed: {}", worse.join(", "))
                },
            );
        }
        for fast in ["portfwd-tc-fast", "portfwd-xdp-fast"] {
            for (w, what) in [
                ("udp64", "64-byte UDP"),
                ("v6-udp64", "64-byte UDP over IPv6"),
            ] {
                let (measured, status) = self.fast_path_udp(fast, w);
                row(
                    &format!("{what} ≥ 2.5× direct with the fast path"),
                    fast,
                    measured,
                    status,
                );
            }
        }
        for (prog, case, limit) in [
            ("portfwd_xdp_ingress", "hit (exact rule)", 35.0),
            ("portfwd_tc_ingress", "hit (exact rule)", 35.0),
            ("portfwd_tc_egress", "reply hit (tracked flow)", 100.0),
        ] {
            match self
                .micro
                .iter()
                .find(|m| m.program == prog && m.case == case)
            {
                Some(m) => row(
                    &format!("program cost {case} ≤ +{limit:.0} ns over empty"),
                    prog,
                    format!("{:+.1} ns", m.calm_over_floor),
                    if m.calm_over_floor <= limit {
                        "met"
                    } else {
                        "missed"
                    }
                    .into(),
                ),
                None => row(
                    &format!("program cost {case} ≤ +{limit:.0} ns"),
                    prog,
                    "–".into(),
                    "not measured".into(),
                ),
            }
        }
        let best = self
            .control
            .iter()
            .filter(|c| c.publisher == "portfwd" && c.ports >= 10_000 && c.seconds.is_some())
            .min_by(|a, b| {
                a.seconds
                    .unwrap_or(f64::MAX)
                    .total_cmp(&b.seconds.unwrap_or(f64::MAX))
            });
        match best {
            Some(c) => {
                let secs = c.seconds.unwrap_or(f64::MAX);
                row(
                    "publishing 10,000 ports < 1 s",
                    "portfwd",
                    format!("{secs:.2} s ({})", c.method),
                    if secs < 1.0 { "met" } else { "missed" }.into(),
                );
                let mb = c.rss_kib.unwrap_or(0) as f64 / 1024.0;
                row(
                    "daemon memory with 10,000 ports < 50 MB",
                    "portfwd",
                    format!("{mb:.1} MB"),
                    if mb < 50.0 { "met" } else { "missed" }.into(),
                );
            }
            None => row(
                "publishing 10,000 ports < 1 s, memory < 50 MB",
                "portfwd",
                "–".into(),
                "not measured (run without --quick, with the daemon built)".into(),
            ),
        }
        s
    }

    /// The fast path's 64-byte UDP target (2.5× direct), with the rig's ceiling beside
    /// it when `xdp-floor` ran: its ratio to direct, and the fast path's share of it.
    fn fast_path_udp(&self, fast: &str, w: &str) -> (String, String) {
        if !self.variants.iter().any(|v| v == fast) {
            return ("–".into(), "not measured: variant not run".into());
        }
        let (mut measured, status) = self.check(fast, "direct", w, "mpps", 2.5, true);
        let stat = |v: &str| self.stat(v, w, "mpps");
        if let (Some(floor), Some(direct), Some(a)) =
            (stat("xdp-floor"), stat("direct"), stat(fast))
        {
            let _ = write!(
                measured,
                "; `xdp-floor` (redirect, no lookup) {:.2}× direct: {:.0} % of it",
                floor.median / direct.median,
                100.0 * a.median / floor.median
            );
        }
        (measured, status)
    }

    fn check(
        &self,
        v: &str,
        base: &str,
        w: &str,
        m: &str,
        x: f64,
        higher: bool,
    ) -> (String, String) {
        let (Some(a), Some(b)) = (self.stat(v, w, m), self.stat(base, w, m)) else {
            let why = if self.stat(base, w, m).is_none() {
                format!("not measured: no {base} result")
            } else {
                format!("not measured: no {v} result")
            };
            return ("–".into(), why);
        };
        let r = a.median / b.median;
        let ov = overlap(&a, &b);
        let measured = format!(
            "{r:.2}× {base}{}",
            if ov { " (ranges overlap)" } else { "" }
        );
        let pass = if higher { r >= x } else { r <= x };
        // A target that asks for a real gain over the baseline (×>1 of a rate, ×<1 of a
        // latency) is only met when the ranges are apart.
        let needs_gap = if higher { x > 1.0 } else { x < 1.0 };
        let status = if !pass {
            "missed"
        } else if needs_gap && ov {
            "not shown (ranges overlap)"
        } else {
            "met"
        };
        (measured, status.into())
    }

    fn ratio_chart(&self) -> String {
        let groups: Vec<(String, Vec<Bar>)> = HEADLINES
            .iter()
            .filter_map(|&(w, m, label, _, higher)| {
                let base = self.stat("direct", w, m)?;
                let bars: Vec<Bar> = self
                    .variants
                    .iter()
                    .filter_map(|v| {
                        let s = self.stat(v, w, m)?;
                        Some(Bar {
                            label: v.clone(),
                            value: s.median / base.median,
                            lo: s.min / base.median,
                            hi: s.max / base.median,
                        })
                    })
                    .collect();
                let label = if higher {
                    label.to_string()
                } else {
                    format!("{label} (lower is better)")
                };
                Some((label, bars))
            })
            .collect();
        bar_chart(
            "Ratio to direct (median; whiskers: min–max of the variant over direct's median)",
            &groups,
            Some(1.0),
        )
    }
}

/// A portfwd variant with native XDP on the host's veth (the traps of docs/benchmarks.md).
/// Whether a portfwd variant's verdict against iptables and docker-proxy counts: the
/// hooks portfwd itself picks on the rig's veth (`--ingress auto` attaches TC there,
/// with or without `--fast-path`). XDP forced onto a veth is measured and shown apart:
/// a veth's native XDP turns its peer's GSO off and generic XDP linearises every skb
/// (kernel behaviour, BENCH-NOTES.md), costs no NIC has.
fn judged_variant(v: &str) -> bool {
    v.starts_with("portfwd") && !v.contains("xdp")
}

fn native_xdp(v: &str) -> bool {
    v.contains("xdp") && !v.contains("generic")
}

fn num(x: f64) -> String {
    if x >= 1000.0 {
        format!("{x:.0}")
    } else if x >= 100.0 {
        format!("{x:.1}")
    } else if x >= 10.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

pub struct Bar {
    pub label: String,
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

const PALETTE: [&str; 9] = [
    "#4e79a7", "#e15759", "#f28e2b", "#b07aa1", "#59a14f", "#76b7b2", "#edc948", "#9c755f",
    "#ff9da7",
];

fn color(label: &str) -> &'static str {
    let order = [
        "direct",
        "iptables",
        "socat",
        "docker-proxy",
        "portfwd-tc",
        "portfwd-xdp-generic",
        "portfwd-xdp-native",
        "portfwd-tc-fast",
    ];
    let i = order.iter().position(|o| *o == label).unwrap_or(8);
    PALETTE[i % PALETTE.len()]
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A horizontal bar chart: groups of bars (one per variant), whiskers for min–max, and an
/// optional reference line (1.0 for ratios).
pub fn bar_chart(title: &str, groups: &[(String, Vec<Bar>)], reference: Option<f64>) -> String {
    let (left, right, bar_h, gap, top) = (200.0, 760.0, 16.0, 14.0, 40.0);
    let max = groups
        .iter()
        .flat_map(|(_, b)| b.iter().map(|x| x.hi.max(x.value)))
        .chain(reference)
        .fold(0.0f64, f64::max)
        * 1.08;
    let max = if max > 0.0 { max } else { 1.0 };
    let x = |v: f64| left + (right - left) * (v / max);
    let mut y = top;
    let mut body = String::new();
    for (g, bars) in groups {
        if !g.is_empty() {
            y += 6.0;
            let _ = writeln!(
                body,
                r#"<text x="8" y="{:.1}" font-weight="bold">{}</text>"#,
                y + 8.0,
                esc(g)
            );
            y += 14.0;
        }
        for b in bars {
            let _ = writeln!(
                body,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><rect x="{left}" y="{y:.1}" width="{:.1}" height="{bar_h}" fill="{}"/><line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                left - 6.0,
                y + 12.0,
                esc(&b.label),
                (x(b.value) - left).max(0.5),
                color(&b.label),
                x(b.lo),
                x(b.hi),
                y + bar_h / 2.0,
                y + bar_h / 2.0,
                x(b.hi.max(b.value)) + 4.0,
                y + 12.0,
                num(b.value)
            );
            y += bar_h + 3.0;
        }
        y += gap;
    }
    if let Some(r) = reference {
        let _ = writeln!(
            body,
            r##"<line x1="{:.1}" x2="{:.1}" y1="{top}" y2="{y:.1}" stroke="#444" stroke-dasharray="4 3"/>"##,
            x(r),
            x(r)
        );
    }
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="860" height="{:.0}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="8" y="22" font-size="14" font-weight="bold">{}</text>
{body}</svg>
"#,
        y + 10.0,
        esc(title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results(samples: &[(&str, &str, &[f64])]) -> Results {
        let mut r = Results::default();
        for &(variant, workload, values) in samples {
            if !r.variants.iter().any(|v| v == variant) {
                r.variants.push(variant.into());
            }
            for (round, &value) in values.iter().enumerate() {
                r.samples.push(Sample {
                    round: round as u32,
                    variant: variant.into(),
                    workload: workload.into(),
                    metric: "req_s".into(),
                    value,
                    cpu_s: 0.0,
                    units: 0.0,
                    cpu_per_unit: None,
                    cpu_unit: String::new(),
                    bg_load: 0.0,
                    syn_retrans: None,
                    note: String::new(),
                });
            }
        }
        r
    }

    fn pair(v: &str, w: &str) -> (String, String) {
        (v.into(), w.into())
    }

    #[test]
    fn clear_lead_closes_overlap_and_behind_stay_open() {
        let r = results(&[
            ("iptables", "crr", &[100.0, 110.0]),
            ("docker-proxy", "crr", &[50.0, 60.0]),
            ("portfwd-tc", "crr", &[120.0, 130.0]),
            ("iptables", "keepalive", &[100.0, 110.0]),
            ("portfwd-tc", "keepalive", &[105.0, 120.0]),
            ("iptables", "local-crr", &[100.0, 110.0]),
            ("portfwd-tc", "local-crr", &[80.0, 90.0]),
        ]);
        let open = r.open_verdicts();
        assert!(!open.contains(&pair("portfwd-tc", "crr")), "{open:?}");
        assert!(open.contains(&pair("portfwd-tc", "keepalive")));
        assert!(open.contains(&pair("iptables", "keepalive")));
        // Behind with ranges apart: confirmed by extra rounds before it is reported.
        assert!(open.contains(&pair("portfwd-tc", "local-crr")));
        assert!(!open.iter().any(|(v, _)| v == "docker-proxy"));
        let behind = r.behind();
        assert_eq!(behind.len(), 1, "{behind:?}");
        assert!(behind[0].contains("`portfwd-tc` 85.00") && behind[0].contains("`iptables`"));
        assert!(r.summary().contains(
            "portfwd behind iptables or docker-proxy with non-overlapping ranges:\n\n- "
        ));
    }

    #[test]
    fn xdp_forced_onto_a_veth_is_shown_not_judged() {
        let r = results(&[
            ("iptables", "keepalive", &[10.0, 11.0]),
            ("portfwd-tc", "keepalive", &[10.5, 11.5]),
            ("portfwd-xdp-native", "keepalive", &[5.0, 6.0]),
        ]);
        assert!(r.behind().is_empty(), "{:?}", r.behind());
        assert!(!r
            .open_verdicts()
            .iter()
            .any(|(v, _)| v == "portfwd-xdp-native"));
        let s = r.summary();
        assert!(
            s.contains("## XDP forced onto a veth (shown, not judged)"),
            "{s}"
        );
        assert!(s.contains("`portfwd-xdp-native` 5.50"), "{s}");
        assert!(s.ends_with("with non-overlapping ranges: none\n"), "{s}");
    }

    #[test]
    fn one_sample_is_not_a_range() {
        let r = results(&[
            ("iptables", "crr", &[100.0]),
            ("portfwd-tc", "crr", &[50.0]),
        ]);
        assert!(r.behind().is_empty());
        assert!(r
            .summary()
            .contains("with non-overlapping ranges: not judged"));
    }

    #[test]
    fn summary_ends_with_none_when_nothing_is_behind() {
        let mut r = results(&[
            ("iptables", "crr", &[100.0, 110.0]),
            ("docker-proxy", "crr", &[50.0, 60.0]),
            ("portfwd-tc", "crr", &[105.0, 130.0]),
        ]);
        assert!(r.behind().is_empty());
        assert!(r.summary().ends_with(
            "portfwd behind iptables or docker-proxy with non-overlapping ranges: none\n"
        ));
        // A portfwd failure where a comparator has a result is listed, not hidden.
        r.failures.push(Failure {
            round: 0,
            variant: "portfwd-tc".into(),
            workload: "keepalive".into(),
            error: "boom".into(),
        });
        r.samples.retain(|s| s.workload == "crr");
        let mut with_ipt = results(&[("iptables", "keepalive", &[90.0])]);
        r.samples.append(&mut with_ipt.samples);
        let failed = r.failed_where_compared();
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(failed[0].contains("`portfwd-tc` failed, iptables measured"));
    }
}
