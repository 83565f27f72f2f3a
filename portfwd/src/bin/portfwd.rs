//! `portfwd`: the daemon. Loads the kernel programs, attaches them to every `--iface`,
//! and serves the control socket that `portfwd-ctl` talks to, until SIGINT or SIGTERM.
//!
//! The programs' links and maps are pinned in `--pin-dir` and the rules saved next to
//! the socket, so forwarding outlives the daemon: on SIGTERM (a restart), a crash or a
//! SIGKILL the hooks keep forwarding from the pinned state, and the next start adopts
//! it (the programs behind the links are swapped in one `BPF_LINK_UPDATE`, no gap).
//! `portfwd --cleanup` stops forwarding for good (removes links, maps and the rules'
//! file); `--no-pin` runs as before pinning: everything is detached when it exits.
//! SIGHUP applies the `--config` file again; readiness goes to `$NOTIFY_SOCKET`
//! (systemd `Type=notify`) once the programs are attached and the socket listens;
//! `--metrics` serves Prometheus.
//!
//! Startup order matters: the socket claim (an exclusive lock) comes before anything is
//! loaded, so a second daemon on the same socket refuses without touching the first
//! one's interfaces; every failure before serving drops what this start attached and
//! pinned (state adopted from an earlier daemon stays pinned, and forwarding).

use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
};

use anyhow::{bail, Context as _};
use clap::{error::ErrorKind, CommandFactory as _, Parser};
use log::{info, warn, LevelFilter};
use portfwd::{
    daemon::{self, Daemon, SocketAccess, SocketClaim, SocketGroup},
    dataplane::{self, Dataplane, IngressMode},
    declfile,
    flows::FlowTables,
    netinfo,
    protocol::{DEFAULT_SOCKET, SOCKET_ENV},
    service,
};

/// In-kernel port forwarding for container hosts: the daemon.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Interface where ports are published (repeatable).
    #[arg(
        long = "iface",
        value_name = "IFACE",
        required_unless_present_any = ["check_config", "generate_docs", "cleanup"]
    )]
    ifaces: Vec<String>,
    /// bpffs directory where the maps and links are pinned, so that forwarding goes on
    /// when the daemon stops or dies and the next daemon adopts it (one daemon per
    /// directory).
    #[arg(long, value_name = "DIR", default_value = portfwd::pin::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Pin nothing: everything is detached when the daemon exits, and a crash stops
    /// forwarding.
    #[arg(long, conflicts_with = "cleanup")]
    no_pin: bool,
    /// Stop forwarding for good and exit: remove the links, maps and rules pinned in
    /// `--pin-dir` by a daemon that is no longer running, and its rules' file (next to
    /// `--socket`).
    #[arg(long)]
    cleanup: bool,
    /// Control socket (root only, unless `--socket-group`/`--socket-read-group`).
    #[arg(long, value_name = "PATH", env = SOCKET_ENV, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Group (name or gid) whose members may use the control socket as root does:
    /// publishing a port redirects the host's traffic, so this is root-equivalent.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Group (name or gid) whose members may read (`list`) but change nothing.
    #[arg(long, value_name = "GROUP")]
    socket_read_group: Option<String>,
    /// Where the ingress program runs: `auto` is native XDP on physical NICs whose driver
    /// supports it and TC ingress on virtual interfaces.
    #[arg(long, value_enum, default_value = "auto")]
    ingress: IngressMode,
    /// cgroup v2 whose processes (and their descendants') are served as local clients
    /// at the socket (`curl localhost:PORT`, containers calling the host's address).
    /// Default: the cgroup2 root, on unified and hybrid layouts alike.
    #[arg(long, value_name = "PATH")]
    cgroup: Option<PathBuf>,
    /// Redirect translated packets straight to the backend's bridge port (FIB lookup,
    /// MAC rewrite, redirect) instead of routing them through the host's stack, from TC
    /// and generic XDP ingress; falls back to the stack whenever a lookup cannot
    /// complete.
    #[arg(long)]
    fast_path: bool,
    /// The fast path from native XDP too. Only when every backend's veth peer takes XDP
    /// frames (GRO on, or an XDP program, in the container): otherwise the kernel drops
    /// the redirected frames.
    #[arg(long)]
    fast_path_native_xdp: bool,
    /// From TC, transmit fast-path packets on the host's end of a container's veth
    /// instead of handing them to the container's end (`bpf_redirect_peer`, the
    /// default): slower, but the host end's egress (a bandwidth-limiting qdisc, TC
    /// egress programs) sees them.
    #[arg(long, requires = "fast_path")]
    fast_path_no_peer: bool,
    /// No NAT64: remote IPv6 clients of a rule whose backend has no IPv6 address are
    /// not translated to IPv4 (they are passed, counted as `pass_no_ipv6_backend`), and
    /// no NAT64 entry program goes on the backends' interfaces.
    #[arg(long)]
    no_nat64: bool,
    /// Whose connections the socket hooks rewrite: `all` (every network namespace in
    /// the cgroup: the host's processes and containers calling the host's address) or
    /// `host-netns` (the daemon's namespace only; other namespaces go by packet, through
    /// the ingress hooks, like remote clients: for namespaces that reach the host but
    /// cannot route to the backends, at the cost of containers calling the host).
    #[arg(long, value_enum, default_value_t = LocalScope::All)]
    local_clients: LocalScope,
    /// Flows each flow table holds (IPv4 and IPv6 remote clients' connections), from
    /// 1024 to 16777216; the least recently used are evicted beyond it. About 224 bytes
    /// of kernel memory per flow (both tables), allocated at start: 29 MB by default. A
    /// daemon adopting pinned tables must be given their size (or `--cleanup` first).
    #[arg(long, value_name = "N", default_value_t = dataplane::DEFAULT_MAX_FLOWS,
          value_parser = dataplane::parse_max_flows, allow_negative_numbers = true)]
    max_flows: u32,
    /// Declarations file (TOML) to publish at start, as `portfwd-ctl apply -f FILE`
    /// would. A file with any error stops the daemon before anything is attached.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics on `http://ADDR:PORT/metrics` (off by default; e.g.
    /// `127.0.0.1:9464`).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<std::net::SocketAddr>,
    /// Validate a declarations file (as `--config` and `apply` would) and exit: a summary
    /// on success, one line and a non-zero exit on an error. Touches nothing, needs no root.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
    /// Write shell completions and man pages into DIR and exit (`cargo xtask dist`).
    #[arg(long, value_name = "DIR", hide = true)]
    generate_docs: Option<PathBuf>,
    /// Log level (default: info, or RUST_LOG).
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<LevelFilter>,
}

/// `--local-clients`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LocalScope {
    All,
    HostNetns,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        // A bad value is one line, as every other refusal.
        Err(e) if e.kind() == ErrorKind::InvalidValue || e.kind() == ErrorKind::ValueValidation => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!(
                "portfwd: {}",
                first.strip_prefix("error: ").unwrap_or(first)
            );
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    if let Some(code) = one_shot(&args) {
        return code;
    }
    let mut logger = env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or(LevelFilter::Info.as_str()),
    );
    if let Some(level) = args.log_level {
        logger.filter_level(level);
    }
    logger.init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The error and its causes, on one line.
            eprintln!("portfwd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--check-config` and `--generate-docs`: they do their one thing and exit.
fn one_shot(args: &Args) -> Option<ExitCode> {
    if let Some(file) = &args.check_config {
        return Some(match service::check_config(file) {
            Ok(r) => {
                println!("{}: OK, {} rules", file.display(), r.added.len());
                for rule in &r.added {
                    println!("  {rule}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "portfwd: {}",
                    portfwd::protocol::one_line(&format!("{e:#}"))
                );
                ExitCode::FAILURE
            }
        });
    }
    if let Some(dir) = &args.generate_docs {
        return Some(match service::write_docs(Args::command(), dir) {
            Ok(files) => {
                for f in files {
                    println!("{}", f.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("portfwd: cannot write into {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        });
    }
    None
}

/// `--cleanup`: removes the pinned state and the saved rules.
fn cleanup(args: &Args) -> anyhow::Result<()> {
    let pins = portfwd::pin::cleanup(&args.pin_dir)?;
    let state = portfwd::state::remove(&portfwd::state::path_for(&args.socket))?;
    match (pins, state) {
        (false, false) => info!("nothing pinned in {}", args.pin_dir.display()),
        _ => info!(
            "removed the pinned state in {} (forwarding stopped) and the saved rules",
            args.pin_dir.display()
        ),
    }
    Ok(())
}

/// Runs the daemon until SIGINT or SIGTERM.
fn run(args: Args) -> anyhow::Result<()> {
    if args.cleanup {
        return cleanup(&args);
    }
    let mut seen = BTreeSet::new();
    if let Some(dup) = args.ifaces.iter().find(|i| !seen.insert(i.as_str())) {
        bail!("interface `{dup}` given twice");
    }
    // The file is read and checked before anything is claimed or attached.
    let config = match &args.config {
        Some(path) => Some((path.display().to_string(), declfile::load(path)?)),
        None => None,
    };
    let access = SocketAccess {
        full: args
            .socket_group
            .as_deref()
            .map(SocketGroup::resolve)
            .transpose()?,
        read: args
            .socket_read_group
            .as_deref()
            .map(SocketGroup::resolve)
            .transpose()?,
    };
    let claim = SocketClaim::acquire(&args.socket)?;
    let metrics = match args.metrics {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot serve metrics on {addr}"))?,
        ),
        None => None,
    };

    // Unpinned, dropping the dataplane detaches everything attached so far: every `?`
    // below leaves the interfaces as they were. Pinned, the hooks an earlier daemon left
    // keep running its programs until this one's replace them.
    let mut dp = if args.no_pin {
        // Programs pinned by an earlier daemon would run next to this one's.
        let links = args.pin_dir.join("links");
        if std::fs::read_dir(&links).is_ok_and(|mut d| d.next().is_some()) {
            bail!(
                "an earlier daemon's programs still run from {} (--no-pin would run a second \
                 copy): start without --no-pin to adopt them, or run `portfwd --cleanup` first",
                args.pin_dir.display()
            );
        }
        check_memory(args.max_flows)?;
        Dataplane::load_sized(args.max_flows)?
    } else {
        let pins = portfwd::pin::PinDir::open(&args.pin_dir)?;
        // Pinned tables are allocated already: only new ones need the memory.
        if !pins.maps_dir().join(dataplane::FLOW_TABLE_MAPS[0]).exists() {
            check_memory(args.max_flows)?;
        }
        let dp = Dataplane::load_pinned(pins, args.max_flows)?;
        info!("maps and links pinned in {}", args.pin_dir.display());
        dp
    };
    for iface in &args.ifaces {
        let a = dp.attach(iface, args.ingress)?;
        info!(
            "attached {}: ingress={}, egress={}",
            a.iface, a.ingress, a.egress
        );
    }
    if args.fast_path || args.fast_path_native_xdp {
        dp.set_fast_path(args.fast_path, args.fast_path_native_xdp)?;
        dp.set_fast_path_peer(!args.fast_path_no_peer)?;
        info!(
            "fast path on ({}): translated packets go straight to the backend's bridge port",
            match (args.fast_path, args.fast_path_native_xdp) {
                (true, true) => "TC, generic and native XDP",
                (true, false) => "TC and generic XDP",
                _ => "native XDP",
            }
        );
    }
    if args.local_clients == LocalScope::HostNetns {
        dp.set_sock_host_netns_only(true)?;
        info!("local clients: the host's network namespace only");
    }
    if args.no_nat64 {
        dp.set_nat64(false)?;
        info!("NAT64 off: remote IPv6 clients of IPv4-only backends are not served");
    }
    match args.cgroup.clone().or_else(netinfo::cgroup2_root) {
        Some(cgroup) => {
            dp.attach_local(&cgroup)?;
            info!("serving local clients of cgroup {}", cgroup.display());
        }
        None => warn!(
            "no cgroup2 mount: local clients (localhost and the host's own addresses) \
             are not served"
        ),
    }
    if netinfo::ipv4_forwarding_disabled() == Some(true) {
        warn!(
            "IPv4 forwarding is off in this network namespace (net.ipv4.ip_forward = 0): \
             packets to backends behind other interfaces will be dropped"
        );
    }
    let gone = dp.drop_stale_links()?;
    if !gone.is_empty() {
        info!("detached stale links: {}", gone.join(", "));
    }
    let mut state = Daemon::new(dp);
    state.refresh_host_addrs();
    if !args.no_pin {
        let file = portfwd::state::path_for(&args.socket);
        let saved = portfwd::state::load(&file)?.unwrap_or_default();
        let n = saved.len();
        let fixed = state.adopt(saved)?;
        if fixed > 0 {
            warn!(
                "the pinned rule maps differed from {} in {fixed} entries: made them match",
                file.display()
            );
        }
        if n > 0 {
            info!("adopted {n} rules from {}", file.display());
        }
        state.persist_to(file);
    }
    if let Some((file, decls)) = &config {
        // An error here returns, and dropping the state detaches everything.
        let r = state.apply(file, decls, false)?;
        info!("loaded {file}: {} rules published", r.added.len());
    }
    let listener = claim.bind()?;
    access.apply_to(claim.path())?;
    match daemon::raise_fd_limit() {
        Ok(n) if n < daemon::MAX_CONNECTIONS as u64 + 256 => warn!(
            "the open-file limit is {n}: fewer than {} control connections fit",
            daemon::MAX_CONNECTIONS
        ),
        Ok(_) => {}
        Err(e) => warn!("cannot raise the open-file limit: {e}"),
    }
    state.kernel_mut().keep_pins();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let flow_tables = FlowTables::new(state.kernel())?;
    info!("flow tables: {} flows each", args.max_flows);
    let state = Arc::new(Mutex::new(state));
    let served = rt.block_on(async {
        let listener = tokio::net::UnixListener::from_std(listener)
            .context("cannot use the control socket")?;
        let shutdown = shutdown_signal()?;
        if let Some(l) = metrics {
            l.set_nonblocking(true).context("cannot serve metrics")?;
            let l = tokio::net::TcpListener::from_std(l).context("cannot serve metrics")?;
            info!("metrics on http://{}/metrics", l.local_addr()?);
            tokio::spawn(portfwd::metrics::serve(l, state.clone(), flow_tables));
        }
        tokio::spawn(service::reload_on_sighup(
            args.config.clone(),
            state.clone(),
        ));
        info!(
            "serving {} (admits {})",
            claim.path().display(),
            access.admitted()
        );
        // Attached, and the socket listens: requests queue until `serve` takes them.
        if let Err(e) = service::notify_ready() {
            warn!("cannot notify the service manager: {e}");
        }
        daemon::serve(listener, state.clone(), access, shutdown).await;
        anyhow::Ok(())
    });
    // Dropping the runtime drops every connection task and its handle on the state, so
    // the dataplane below is the last one and is dropped (detached) here.
    drop(rt);
    drop(claim);
    match Arc::try_unwrap(state) {
        Ok(state) => {
            drop(state);
            if args.no_pin {
                info!("detached from every interface");
            } else {
                info!(
                    "forwarding goes on from the state pinned in {} (the next start adopts it; `portfwd --cleanup` removes it)",
                    args.pin_dir.display()
                );
            }
        }
        Err(_) => warn!("the dataplane is still referenced at exit"),
    }
    served
}

/// Refuses flow tables of `max_flows` entries that would not fit in the memory available
/// now (the kernel allocates them whole, and a failure deep in a map's creation says less).
fn check_memory(max_flows: u32) -> anyhow::Result<()> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let available_kib = meminfo.lines().find_map(|l| {
        l.strip_prefix("MemAvailable:")?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse::<u64>()
            .ok()
    });
    match available_kib {
        Some(kib) => dataplane::check_max_flows(max_flows, kib * 1024).map_err(anyhow::Error::msg),
        None => Ok(()),
    }
}

/// Completes on the first SIGINT or SIGTERM.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("cannot handle signals")?;
    let mut term = signal(SignalKind::terminate()).context("cannot handle signals")?;
    Ok(async move {
        let name = tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        };
        info!("{name}: shutting down");
    })
}
