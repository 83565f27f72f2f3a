//! `cargo xtask demo`: Docker's `-p 9000:8080` story, played in network namespaces and
//! narrated step by step. Two "containers" serve `Hello from container 1/2` on 8080, the
//! daemon runs in a "host" namespace, `portfwd-ctl` publishes them on 9000 and 9001, a
//! "client" namespace makes requests (IPv4, then IPv6 to the IPv4-only container through
//! NAT64), then the duplicate-port error, the counters, and a
//! teardown that happens whatever went wrong (namespaces named `pfdemo-<pid>-*`; stale
//! ones of dead demos are swept at start). Nothing touches the root namespace's
//! interfaces or sysctls.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use portfwd_common::host::cgroup2_root;

use crate::setup::{self, cargo, describe, workspace_root};

const PREFIX: &str = "pfdemo-";
const HOST_IP: &str = "198.18.0.1";
const CLIENT_IP: &str = "198.18.0.2";
const BRIDGE_IP: &str = "198.18.1.1";
const CONTAINERS: [&str; 2] = ["198.18.1.2", "198.18.1.3"];
/// IPv6 on the client's link only (2001:2::/48, RFC 5180): the containers stay IPv4-only.
const HOST_IP6: &str = "2001:2::1";
const CLIENT_IP6: &str = "2001:2::2";

pub fn run() -> Result<()> {
    setup::ensure()?;
    chapter("Build portfwd, portfwd-ctl and the demo's tiny HTTP server");
    let mut build = Command::new(cargo());
    build
        .args(["build", "--workspace", "--bins"])
        .current_dir(workspace_root());
    println!("$ {}", describe(&build));
    if !build.status().context("cannot run cargo build")?.success() {
        bail!("the build failed");
    }
    let bin_dir = target_dir()?.join("debug");
    sweep_stale();
    let mut demo = Demo::new(bin_dir);
    let result = demo.play();
    chapter("Teardown");
    drop(demo);
    println!("Every namespace, process and file of the demo is gone.");
    result
}

/// Everything the demo made; dropping it tears all of it down.
struct Demo {
    bins: PathBuf,
    tag: String,
    dir: PathBuf,
    namespaces: Vec<String>,
    children: Vec<(String, Child)>,
    /// The demo's own cgroup: the daemon serves local clients of it only, never the
    /// machine's root cgroup (which holds every process on the machine).
    cgroup: Option<PathBuf>,
}

impl Demo {
    fn new(bins: PathBuf) -> Self {
        let tag = format!("{PREFIX}{}", std::process::id());
        Self {
            bins,
            dir: std::env::temp_dir().join(&tag),
            tag,
            namespaces: Vec::new(),
            children: Vec::new(),
            cgroup: None,
        }
    }

    fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.tag)
    }

    fn play(&mut self) -> Result<()> {
        let (client, host) = (self.ns("client"), self.ns("host"));
        let cs = [self.ns("c1"), self.ns("c2")];

        chapter("1. A small network in namespaces");
        say("A client, a host, and two containers, each in its own network namespace:");
        say(&format!("  client {CLIENT_IP} --veth-- {HOST_IP} host (runs portfwd) {BRIDGE_IP} --bridge-- containers {} and {}", CONTAINERS[0], CONTAINERS[1]));
        for ns in [&client, &host, &cs[0], &cs[1]] {
            sh(Command::new("ip").args(["netns", "add", ns]))?;
            self.namespaces.push(ns.clone());
            ip(ns, "link set lo up")?;
        }
        say("The host forwards between its interfaces (in its own namespace only):");
        sh(self
            .in_ns(&host, "sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"]))?;
        say("The client's cable to the host: a veth pair, cli0 on the host side.");
        ip(
            &host,
            &format!("link add cli0 type veth peer name eth0 netns {client}"),
        )?;
        ip(&host, &format!("addr add {HOST_IP}/24 dev cli0"))?;
        ip(&host, "link set cli0 up")?;
        ip(&client, &format!("addr add {CLIENT_IP}/24 dev eth0"))?;
        ip(&client, "link set eth0 up")?;
        ip(&client, &format!("route add default via {HOST_IP}"))?;
        say("IPv6 on that link too (nodad: usable at once); the containers stay IPv4-only:");
        ip(&host, &format!("-6 addr add {HOST_IP6}/64 dev cli0 nodad"))?;
        ip(
            &client,
            &format!("-6 addr add {CLIENT_IP6}/64 dev eth0 nodad"),
        )?;
        say("Full checksums from the client, as from a real NIC:");
        sh(self
            .in_ns(&client, "ethtool")
            .args(["-K", "eth0", "tx", "off"]))
        .map(|_| ())
        .or_else(|e| {
            say(&format!("(ethtool failed: {e}; continuing)"));
            Ok::<(), anyhow::Error>(())
        })?;
        say("A bridge on the host, like docker0, with one veth per container:");
        ip(&host, "link add br0 type bridge")?;
        ip(&host, &format!("addr add {BRIDGE_IP}/24 dev br0"))?;
        ip(&host, "link set br0 up")?;
        for (i, c) in cs.iter().enumerate() {
            let port = format!("vc{}", i + 1);
            ip(
                &host,
                &format!("link add {port} type veth peer name eth0 netns {c}"),
            )?;
            ip(&host, &format!("link set {port} master br0 up"))?;
            ip(c, &format!("addr add {}/24 dev eth0", CONTAINERS[i]))?;
            ip(c, "link set eth0 up")?;
            ip(c, &format!("route add default via {BRIDGE_IP}"))?;
        }

        chapter("2. Two containers serving HTTP on port 8080");
        let srv = self.bins.join("portfwd-testsrv");
        for (i, c) in cs.iter().enumerate() {
            let body = format!("Hello from container {}", i + 1);
            let mut cmd = self.in_ns(c, &srv);
            cmd.args(["--http", "0.0.0.0:8080", "--body", &body]);
            println!("$ {} &", describe(&cmd));
            let mut child = cmd
                .stdout(Stdio::piped())
                .stdin(Stdio::null())
                .spawn()
                .context("cannot start the test server")?;
            let stdout = child.stdout.take().context("server stdout")?;
            self.children.push((format!("container {}", i + 1), child));
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line)?;
            if line.trim() != "ready" {
                bail!("container {} did not start: {line:?}", i + 1);
            }
        }

        chapter("3. Start the portfwd daemon on the host's client-facing interface");
        std::fs::create_dir_all(&self.dir)?;
        let socket = self.dir.join("portfwd.sock");
        let log = self.dir.join("portfwd.log");
        let logf = std::fs::File::create(&log)?;
        let cgroup = cgroup2_root().context("no cgroup2 mount")?.join(&self.tag);
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("cannot create cgroup {}", cgroup.display()))?;
        self.cgroup = Some(cgroup.clone());
        let mut cmd = self.in_ns(&host, self.bins.join("portfwd"));
        // The demo's daemon leaves nothing pinned: its namespaces go when it ends.
        cmd.args(["--iface", "cli0", "--no-pin", "--socket"])
            .arg(&socket)
            .arg("--cgroup")
            .arg(&cgroup);
        say("nsenter (not `ip netns exec`) keeps the cgroup2 mount visible to the daemon.");
        say("--cgroup: local clients are served for the demo's own cgroup only (the default,");
        say("the cgroup2 root, is every process on a real host).");
        println!("$ {} &", describe(&cmd));
        let child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("cannot start portfwd")?;
        self.children.push(("portfwd".into(), child));
        self.wait_for_daemon(&socket, &log)?;
        say("The daemon says:");
        for line in std::fs::read_to_string(&log)?.lines() {
            println!("  | {line}");
        }

        chapter("4. Publish the containers, as `docker run -p 9000:8080` would");
        let ctl = |args: &[&str]| {
            let mut c = Command::new(self.bins.join("portfwd-ctl"));
            c.arg("--socket").arg(&socket).args(args);
            c
        };
        sh(&mut ctl(&[
            "add",
            "9000",
            &format!("{}:8080", CONTAINERS[0]),
        ]))?;
        sh(&mut ctl(&[
            "add",
            "9001",
            &format!("{}:8080", CONTAINERS[1]),
        ]))?;

        chapter("5. The client asks the host");
        for port in [9000, 9001] {
            let out = sh(&mut self.curl(&client, &format!("http://{HOST_IP}:{port}/")))?;
            if !out.contains("Hello from container") {
                bail!("unexpected answer on port {port}: {out:?}");
            }
        }
        say("Each published port reached its own container; the kernel rewrote the packets,");
        say("no proxy process copied the bytes, and each container saw the client's real");
        say(&format!(
            "address (the X-Peer header is the peer the server saw: {CLIENT_IP}, not the host)."
        ));

        chapter("6. And from the host itself: curl localhost:9000");
        say("Local processes never pass the ingress program: cgroup socket programs send the");
        say("connection straight to the container (no proxy, no NAT). The shell joins the");
        say("demo's cgroup first.");
        let out = sh(&mut self.local_curl(&host, &cgroup, "http://localhost:9000/"))?;
        if !out.contains("Hello from container 1") {
            bail!("unexpected answer from localhost:9000: {out:?}");
        }

        chapter("7. The same rule over IPv6, to an IPv4-only container");
        say("`9000` (no host address) publishes on both families, as Docker's -p does. The");
        say("container has no IPv6 address: Docker would run a userland proxy here; portfwd");
        say("translates in the kernel (NAT64 at TC: the container sees the host's address).");
        let out = sh(&mut self.curl(&client, &format!("http://[{HOST_IP6}]:9000/")))?;
        if !out.contains("Hello from container 1") {
            bail!("unexpected answer over IPv6: {out:?}");
        }
        say("And [::1]:9000 on the host: a dual-stack socket connects to the container's");
        say("address as ::ffff:198.18.1.2, at the socket again.");
        let out = sh(&mut self.local_curl(&host, &cgroup, "http://[::1]:9000/"))?;
        if !out.contains("Hello from container 1") {
            bail!("unexpected answer from [::1]:9000: {out:?}");
        }

        chapter("8. Publishing a port twice fails, as in Docker");
        let mut dup = ctl(&["add", "9000", &format!("{}:8080", CONTAINERS[1])]);
        println!("$ {}", describe(&dup));
        let out = dup.output()?;
        print_indented(&String::from_utf8_lossy(&out.stdout));
        print_indented(&String::from_utf8_lossy(&out.stderr));
        println!("  (exit code {})", out.status.code().unwrap_or(-1));
        if out.status.success() {
            bail!("the duplicate add succeeded");
        }

        chapter("9. What is published, with per-rule counters");
        sh(&mut ctl(&["list"]))?;
        Ok(())
    }

    fn wait_for_daemon(&mut self, socket: &Path, log: &Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((_, child)) = self.children.last_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "portfwd exited ({status}):\n{}",
                        std::fs::read_to_string(log).unwrap_or_default()
                    );
                }
            }
            let ok = Command::new(self.bins.join("portfwd-ctl"))
                .arg("--socket")
                .arg(socket)
                .arg("list")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("portfwd did not answer on {} within 60 s", socket.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `curl -i URL` in `ns` (headers shown: the server's X-Peer says who it saw).
    fn curl(&self, ns: &str, url: &str) -> Command {
        let mut c = self.in_ns(ns, "curl");
        c.args(["-sS", "-i", "--max-time", "10", "-g", url]);
        c
    }

    /// `curl URL` from a shell in `ns` that joins `cgroup` first (the daemon serves
    /// local clients of that cgroup only).
    fn local_curl(&self, ns: &str, cgroup: &Path, url: &str) -> Command {
        let mut c = self.in_ns(ns, "sh");
        c.args([
            "-c",
            &format!(
                "echo $$ > {}/cgroup.procs && exec curl -sS --max-time 10 -g {url}",
                cgroup.display()
            ),
        ]);
        c
    }

    fn in_ns(&self, ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(program);
        c
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        // The daemon first (it detaches its programs on SIGTERM), then the servers.
        for (name, child) in self.children.iter_mut().rev() {
            println!("$ kill -TERM {}   # {name}", child.id());
            portfwd_netkit::process::terminate(child, Duration::from_secs(10));
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.namespaces.iter().rev() {
            println!("$ ip netns del {ns}");
            portfwd_netkit::netns::delete(ns);
        }
        if let Some(cg) = &self.cgroup {
            println!("$ rmdir {}", cg.display());
            let _ = std::fs::remove_dir(cg);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Deletes namespaces and cgroups of earlier demos whose process is gone (killed before
/// teardown).
fn sweep_stale() {
    for (name, _) in portfwd_netkit::netns::sweep_stale(PREFIX) {
        println!("removed namespace {name} left by an earlier demo");
    }
    portfwd_netkit::cgroup::sweep_stale(PREFIX);
}

/// Where cargo puts the binaries (honours CARGO_TARGET_DIR and config).
pub fn target_dir() -> Result<PathBuf> {
    let out = Command::new(cargo())
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(workspace_root())
        .output()
        .context("cannot run cargo metadata")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let key = "\"target_directory\":\"";
    let start = text
        .find(key)
        .context("cargo metadata has no target_directory")?
        + key.len();
    let end = text[start..]
        .find('"')
        .context("malformed cargo metadata")?
        + start;
    Ok(PathBuf::from(&text[start..end]))
}

fn chapter(title: &str) {
    println!();
    println!("── {title}");
}

fn say(text: &str) {
    println!("   {text}");
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("  {line}");
    }
}

fn ip(ns: &str, args: &str) -> Result<String> {
    sh(Command::new("ip")
        .args(["-n", ns])
        .args(args.split_whitespace()))
}

/// Runs and echoes a command and its output; fails on a non-zero exit.
fn sh(cmd: &mut Command) -> Result<String> {
    println!("$ {}", describe(cmd));
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{}`", describe(cmd)))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    print_indented(&stdout);
    print_indented(&String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("`{}` failed ({})", describe(cmd), out.status);
    }
    Ok(stdout)
}
