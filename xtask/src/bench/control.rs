//! Control plane: how long publishing N ports takes and what the publisher holds in
//! memory afterwards, for portfwd (daemon + `portfwd-ctl`, one invocation per port as a
//! user or Docker would do it, and one range when the daemon accepts ranges), iptables
//! rules (one `iptables-nft` invocation per rule as Docker does, and one
//! `iptables-restore` batch), and per-port proxy processes (socat; docker-proxy when
//! installed). Each case runs in its own fresh namespace.

use std::{
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    sys::{self, Netns, Proc},
    topo::{Artifacts, CT_IP},
};

#[derive(Clone, Debug, serde::Serialize)]
pub struct ControlResult {
    pub publisher: String,
    pub method: String,
    pub ports: u32,
    pub seconds: Option<f64>,
    /// Resident memory of the publishing process(es) afterwards, KiB.
    pub rss_kib: Option<u64>,
    pub note: String,
}

const FIRST_PORT: u16 = 20_000;

pub fn run(
    art: &Artifacts,
    prefix: &str,
    sock_dir: &str,
    counts: &[u32],
    per_rule_iptables_max: u32,
    proxy_ports: u32,
) -> Result<Vec<ControlResult>> {
    let mut out = Vec::new();
    let mut n = 0;
    let mut next = |tag: &str| {
        n += 1;
        format!("{prefix}k{n}{tag}")
    };
    if let (Some(daemon), Some(ctl)) = (&art.daemon, &art.ctl) {
        // One `add` per port for each count, then the largest count as one range.
        let range = *counts.iter().max().unwrap_or(&1);
        let cases = counts.iter().map(|&count| (count, false));
        for (count, as_range) in cases.chain([(range, true)]) {
            let ns = namespace(&next("p"))?;
            out.push(portfwd(
                &ns,
                daemon,
                ctl,
                sock_dir,
                &art.log_dir,
                count,
                as_range,
            )?);
        }
    } else {
        out.push(ControlResult {
            publisher: "portfwd".into(),
            method: "portfwd-ctl add".into(),
            ports: 0,
            seconds: None,
            rss_kib: None,
            note: "not available: the daemon is not built yet".into(),
        });
    }
    if sys::have("iptables-nft") {
        for &count in counts {
            if count <= per_rule_iptables_max {
                let ns = namespace(&next("i"))?;
                out.push(iptables_per_rule(&ns, count)?);
            }
            let ns = namespace(&next("i"))?;
            out.push(iptables_restore(&ns, count)?);
        }
    }
    for (tool, ok) in [
        ("socat", sys::have("socat")),
        ("docker-proxy", sys::have("docker-proxy")),
    ] {
        if ok {
            let ns = namespace(&next("s"))?;
            out.push(proxies(&ns, tool, proxy_ports)?);
        } else {
            out.push(ControlResult {
                publisher: tool.into(),
                method: "one process per port".into(),
                ports: 0,
                seconds: None,
                rss_kib: None,
                note: format!("not available: {tool} is not installed"),
            });
        }
    }
    Ok(out)
}

fn namespace(name: &str) -> Result<Netns> {
    let ns = Netns::create(name)?;
    ns.sh("ip link add pf0 type veth peer name pf1
         ip addr add 198.18.9.1/24 dev pf0
         ip link set pf0 up; ip link set pf1 up")?;
    Ok(ns)
}

fn portfwd(
    ns: &Netns,
    daemon: &std::path::Path,
    ctl: &std::path::Path,
    sock_dir: &str,
    art_log_dir: &std::path::Path,
    count: u32,
    range: bool,
) -> Result<ControlResult> {
    let sock = format!("{sock_dir}/{}.sock", ns.name());
    let log = std::fs::File::create(art_log_dir.join(format!("{}.log", ns.name())))?;
    let mut cmd = sys::daemon_cmd(ns, daemon);
    let cgroup = sys::Cgroup::new(ns.name())?;
    cmd.args(["--iface", "pf0", "--ingress", "tc", "--socket", &sock]);
    super::variants::no_pin(&mut cmd, daemon);
    if super::variants::daemon_has_cgroup_flag(daemon) {
        cmd.arg("--cgroup").arg(&cgroup.daemon_path);
    }
    cmd.stdout(log.try_clone()?).stderr(log);
    let mut d = Proc::spawn("portfwd", &mut cmd)?;
    sys::wait_for("the portfwd socket", Duration::from_secs(10), || {
        std::path::Path::new(&sock).exists()
    })?;
    let rss_before = sys::rss_kib(d.pid());
    let start = Instant::now();
    let (method, note) = if range {
        let last = FIRST_PORT as u32 + count - 1;
        let st = Command::new(ctl)
            .args(["--socket", &sock, "add"])
            .arg(format!("{FIRST_PORT}-{last}/tcp"))
            .arg(format!("{CT_IP}:{FIRST_PORT}-{last}"))
            .output()?;
        if !st.status.success() {
            return Ok(ControlResult {
                publisher: "portfwd".into(),
                method: "one range (portfwd-ctl add A-B)".into(),
                ports: count,
                seconds: None,
                rss_kib: None,
                note: format!(
                    "not available: {}",
                    String::from_utf8_lossy(&st.stderr).trim()
                ),
            });
        }
        ("one range (portfwd-ctl add A-B)", String::new())
    } else {
        for i in 0..count {
            let port = FIRST_PORT as u32 + i;
            sys::run(Command::new(ctl).args([
                "--socket",
                &sock,
                "add",
                &format!("{port}/tcp"),
                &format!("{CT_IP}:8080"),
            ]))?;
        }
        ("portfwd-ctl add, one invocation per port", String::new())
    };
    let secs = start.elapsed().as_secs_f64();
    d.check_alive()?;
    // Every port is in the daemon's table.
    let list = sys::run(Command::new(ctl).args(["--socket", &sock, "list", "--json"]))?;
    let listed = String::from_utf8_lossy(&list.stdout)
        .matches(&CT_IP.to_string())
        .count();
    let rss = sys::rss_kib(d.pid());
    d.stop();
    drop(cgroup);
    Ok(ControlResult {
        publisher: "portfwd".into(),
        method: method.into(),
        ports: count,
        seconds: Some(secs),
        rss_kib: rss,
        note: format!(
            "{note}rss_before={} KiB; backends listed={listed}",
            rss_before.unwrap_or(0)
        ),
    })
}

fn dnat_rule(port: u32) -> String {
    format!("-A PFB -p tcp -m tcp --dport {port} -j DNAT --to-destination {CT_IP}:8080")
}

fn iptables_per_rule(ns: &Netns, count: u32) -> Result<ControlResult> {
    ns.sh("iptables-nft -t nat -N PFB; iptables-nft -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j PFB")?;
    let start = Instant::now();
    for i in 0..count {
        let rule = dnat_rule(FIRST_PORT as u32 + i);
        sys::run(
            ns.command("iptables-nft")
                .args(["-t", "nat"])
                .args(rule.split(' ')),
        )?;
    }
    let secs = start.elapsed().as_secs_f64();
    check_rules(ns, count)?;
    Ok(ControlResult {
        publisher: "iptables".into(),
        method: "iptables-nft -A, one invocation per rule (as Docker)".into(),
        ports: count,
        seconds: Some(secs),
        rss_kib: None,
        note: "no resident process: rules live in the kernel".into(),
    })
}

fn iptables_restore(ns: &Netns, count: u32) -> Result<ControlResult> {
    let mut rules =
        String::from("*nat\n:PFB - [0:0]\n-A PREROUTING -m addrtype --dst-type LOCAL -j PFB\n");
    for i in 0..count {
        rules += &dnat_rule(FIRST_PORT as u32 + i);
        rules.push('\n');
    }
    rules += "COMMIT\n";
    let start = Instant::now();
    let mut child = ns
        .command("iptables-nft-restore")
        .arg("--noflush")
        .stdin(Stdio::piped())
        .spawn()
        .context("iptables-nft-restore")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(rules.as_bytes())?;
    if !child.wait()?.success() {
        bail!("iptables-nft-restore failed");
    }
    let secs = start.elapsed().as_secs_f64();
    check_rules(ns, count)?;
    Ok(ControlResult {
        publisher: "iptables".into(),
        method: "iptables-nft-restore, one batch".into(),
        ports: count,
        seconds: Some(secs),
        rss_kib: None,
        note: "no resident process: rules live in the kernel".into(),
    })
}

fn check_rules(ns: &Netns, count: u32) -> Result<()> {
    let n = ns
        .sh("iptables-nft -t nat -S PFB | grep -c DNAT || true")?
        .trim()
        .parse::<u32>()
        .unwrap_or(0);
    if n != count {
        bail!("expected {count} DNAT rules, found {n}");
    }
    Ok(())
}

/// One listening proxy process per port; their total resident memory.
fn proxies(ns: &Netns, tool: &str, count: u32) -> Result<ControlResult> {
    let mut procs = Vec::new();
    let start = Instant::now();
    for i in 0..count {
        let port = FIRST_PORT as u32 + i;
        let mut cmd = if tool == "socat" {
            let mut c = ns.command("socat");
            c.arg(format!("TCP-LISTEN:{port},fork,reuseaddr"))
                .arg(format!("TCP:{CT_IP}:8080"));
            c
        } else {
            let mut c = ns.command("sh");
            c.arg("-c").arg(format!(
                "exec 3</dev/null; exec docker-proxy -proto tcp -host-ip 0.0.0.0 -host-port {port} -container-ip {CT_IP} -container-port 8080"
            ));
            c
        };
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        procs.push(Proc::spawn(tool, &mut cmd)?);
    }
    let last = FIRST_PORT as u32 + count - 1;
    sys::wait_for("every proxy listening", Duration::from_secs(20), || {
        ns.sh(&format!("ss -Hltn 'sport = :{last}'"))
            .map(|o| !o.trim().is_empty())
            .unwrap_or(false)
    })?;
    let secs = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(200));
    let rss: u64 = procs.iter().filter_map(|p| sys::rss_kib(p.pid())).sum();
    Ok(ControlResult {
        publisher: tool.into(),
        method: "one process per port".into(),
        ports: count,
        seconds: Some(secs),
        rss_kib: Some(rss),
        note: format!("{:.0} KiB per port", rss as f64 / count as f64),
    })
}
