//! `portfwd`: the daemon. Loads the kernel programs, attaches them to every `--iface`,
//! and serves the control socket that `portfwd-ctl` talks to, until SIGINT or SIGTERM;
//! then it detaches everything it attached and removes its socket.
//!
//! Startup order matters: the socket claim (an exclusive lock) comes before anything is
//! loaded, so a second daemon on the same socket refuses without touching the first
//! one's interfaces; every failure before serving drops what was attached.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
};

use anyhow::{bail, Context as _};
use clap::Parser;
use log::{info, warn, LevelFilter};
use portfwd::{
    daemon::{self, Daemon, SocketClaim},
    dataplane::{Dataplane, IngressMode},
    declfile, netinfo,
    protocol::{DEFAULT_SOCKET, SOCKET_ENV},
};

/// In-kernel port forwarding for container hosts: the daemon.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Interface where ports are published (repeatable).
    #[arg(long = "iface", value_name = "IFACE", required = true)]
    ifaces: Vec<String>,
    /// Control socket (root only).
    #[arg(long, value_name = "PATH", env = SOCKET_ENV, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
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
    /// Declarations file (TOML) to publish at start, as `portfwd-ctl apply -f FILE`
    /// would. A file with any error stops the daemon before anything is attached.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
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
    let args = Args::parse();
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

/// Runs the daemon until SIGINT or SIGTERM.
fn run(args: Args) -> anyhow::Result<()> {
    let mut seen = BTreeSet::new();
    if let Some(dup) = args.ifaces.iter().find(|i| !seen.insert(i.as_str())) {
        bail!("interface `{dup}` given twice");
    }
    // The file is read and checked before anything is claimed or attached.
    let config = match &args.config {
        Some(path) => Some((path.display().to_string(), declfile::load(path)?)),
        None => None,
    };
    let claim = SocketClaim::acquire(&args.socket)?;

    // Dropping the dataplane detaches everything attached so far: every `?` below
    // leaves the interfaces as they were.
    let mut dp = Dataplane::load()?;
    for iface in &args.ifaces {
        let a = dp.attach(iface, args.ingress)?;
        info!(
            "attached {}: ingress={}, egress={}",
            a.iface, a.ingress, a.egress
        );
    }
    if args.fast_path || args.fast_path_native_xdp {
        dp.set_fast_path(args.fast_path, args.fast_path_native_xdp)?;
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
    let mut state = Daemon::new(dp);
    state.refresh_host_addrs();
    if let Some((file, decls)) = &config {
        // An error here returns, and dropping the state detaches everything.
        let r = state.apply(file, decls, false)?;
        info!("loaded {file}: {} rules published", r.added.len());
    }
    let listener = claim.bind()?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let state = Arc::new(Mutex::new(state));
    let served = rt.block_on(async {
        let listener = tokio::net::UnixListener::from_std(listener)
            .context("cannot use the control socket")?;
        let shutdown = shutdown_signal()?;
        info!("serving {}", claim.path().display());
        daemon::serve(listener, state.clone(), shutdown).await;
        anyhow::Ok(())
    });
    // Dropping the runtime drops every connection task and its handle on the state, so
    // the dataplane below is the last one and is dropped (detached) here.
    drop(rt);
    drop(claim);
    match Arc::try_unwrap(state) {
        Ok(state) => {
            drop(state);
            info!("detached from every interface");
        }
        Err(_) => warn!("the dataplane is still referenced at exit"),
    }
    served
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
