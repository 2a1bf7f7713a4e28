//! `qpeer`: a qpeer node on the command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use qpeer_certs::{resolve_home, Identity, NodeId};
use qpeer_node::Node;
use qpeer_tracker::TrackerAddr;

/// qpeer: direct, end-to-end encrypted QUIC connections between machines behind home NATs.
///
/// A node registers with a tracker (`--tracker` / QPEER_TRACKER), which tells it its public
/// address and introduces it to other nodes; both then punch through their NATs and talk
/// directly over mutually authenticated QUIC. A node's id is its Ed25519 public key, kept
/// in its home directory (`--home` / QPEER_HOME, default ~/.local/share/qpeer).
///
/// Exit codes: 0 success, 1 failure (the reason is printed on stderr), 2 bad usage.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct NodeOpts {
    /// Home directory holding the identity key and known_trackers.
    #[arg(long, env = "QPEER_HOME", global = true)]
    home: Option<PathBuf>,
    /// Tracker: ID@HOST:PORT (pinned id, as printed by qpeer-tracker), HOST:PORT with
    /// --tracker-ca, or HOST:PORT alone (trust on first use, saved in HOME/known_trackers).
    #[arg(long, env = "QPEER_TRACKER", global = true)]
    tracker: Option<TrackerAddr>,
    /// Verify a HOST:PORT tracker's certificate against this CA (PEM) instead of its id.
    #[arg(long, value_name = "FILE", global = true)]
    tracker_ca: Option<PathBuf>,
    /// UDP address of the node's single socket.
    #[arg(long, default_value = "0.0.0.0:0", global = true)]
    bind: SocketAddr,
    /// Name shown to other nodes in `qpeer peers`.
    #[arg(long, global = true)]
    name: Option<String>,
    /// Seconds to wait for registration with the tracker.
    #[arg(long, default_value_t = 10, global = true)]
    register_timeout: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Print this node's NodeId (creating the identity on first use); the id is the last line.
    Id {
        #[command(flatten)]
        node: NodeOpts,
    },
    /// Register with the tracker and accept peers until Ctrl-C.
    Listen {
        #[command(flatten)]
        node: NodeOpts,
        /// Directory where received files will be written (file transfer).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Accept transfers from any node.
        #[arg(long, conflicts_with = "accept_from")]
        accept_any: bool,
        /// Accept transfers from this NodeId (repeatable).
        #[arg(long, value_name = "ID")]
        accept_from: Vec<NodeId>,
    },
    /// List the nodes registered with the tracker, one per line, id first.
    Peers {
        #[command(flatten)]
        node: NodeOpts,
    },
    /// Connect to a peer (punching through NATs) and measure round trips.
    Ping {
        #[command(flatten)]
        node: NodeOpts,
        /// The peer's NodeId.
        peer: NodeId,
        /// Number of pings.
        #[arg(long, short = 'c', default_value_t = 4)]
        count: u32,
        /// Seconds between pings.
        #[arg(long, short = 'i', default_value_t = 1.0)]
        interval: f64,
    },
    /// Run the whole thing locally: a tracker and two nodes on 127.0.0.1 with throwaway
    /// identities; the nodes meet through the tracker and talk directly.
    Demo,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn start(opts: &NodeOpts, console: bool) -> Result<Node> {
    let mut builder = Node::builder().bind_addr(opts.bind).console(console);
    if let Some(home) = &opts.home {
        builder = builder.home(home);
    }
    if let Some(tracker) = &opts.tracker {
        builder = builder.tracker(tracker.clone());
    }
    if let Some(ca) = &opts.tracker_ca {
        builder = builder.tracker_ca(ca);
    }
    if let Some(name) = &opts.name {
        builder = builder.name(name);
    }
    let node = builder.bind().await?;
    if let Err(e) = node.registered(Duration::from_secs(opts.register_timeout)).await {
        node.shutdown().await;
        return Err(e).context("cannot register with the tracker");
    }
    Ok(node)
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Id { node } => {
            let home = resolve_home(node.home.as_deref())?;
            let identity = Identity::load_or_create(&home)?;
            println!("{}", identity.node_id());
            Ok(())
        }
        Command::Listen { node, out, accept_any, accept_from } => {
            let node = start(&node, true).await?;
            if let Some(out) = &out {
                println!("[INFO] receiving files into {} is not available in this version", out.display());
            }
            let _ = (accept_any, accept_from);
            println!("[LISTENING] node {} on {}; Ctrl-C to stop", node.id(), node.local_addr());
            let accept = async {
                while let Some(conn) = node.accept().await {
                    tracing::info!(peer = %conn.node_id(), "peer connected");
                }
            };
            tokio::select! {
                _ = shutdown_signal() => {}
                _ = accept => {}
            }
            node.shutdown().await;
            Ok(())
        }
        Command::Peers { node } => {
            let node = start(&node, false).await?;
            let listed = node.list_peers().await;
            node.shutdown().await;
            for peer in listed? {
                let name = peer.name.as_deref().unwrap_or("-");
                println!("{} {name} registered_at={}", peer.node_id, peer.registered_at);
            }
            Ok(())
        }
        Command::Ping { node, peer, count, interval } => {
            let node = start(&node, true).await?;
            let result = ping(&node, peer, count, Duration::from_secs_f64(interval.max(0.0))).await;
            node.shutdown().await;
            result
        }
        Command::Demo => demo().await,
    }
}

/// A tracker and two nodes in this process, on loopback, with temporary homes.
async fn demo() -> Result<()> {
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    let scratch = tempfile::tempdir().context("cannot create a temporary directory")?;
    let tracker_identity = Arc::new(Identity::load_or_create(&scratch.path().join("tracker"))?);
    let mut config = qpeer_tracker::TrackerConfig::new((Ipv4Addr::LOCALHOST, 0).into(), tracker_identity);
    config.console = true;
    let tracker = qpeer_tracker::Tracker::bind(config)?;
    let tracker_addr: TrackerAddr = tracker.tracker_string().parse()?;
    let (stop_tracker, tracker_stopped) = tokio::sync::oneshot::channel::<()>();
    let tracker_task = tokio::spawn(tracker.run(async {
        let _ = tracker_stopped.await;
    }));

    let mut nodes = Vec::new();
    for name in ["alice", "bob"] {
        let node = Node::builder()
            .home(scratch.path().join(name))
            .bind_addr((Ipv4Addr::LOCALHOST, 0).into())
            .tracker(tracker_addr.clone())
            .name(name)
            .console(true)
            .bind()
            .await?;
        node.registered(Duration::from_secs(10)).await?;
        nodes.push(node);
    }
    let (alice, bob) = (&nodes[0], &nodes[1]);
    let result = ping(alice, bob.id(), 3, Duration::from_millis(200)).await;
    for node in &nodes {
        node.shutdown().await;
    }
    let _ = stop_tracker.send(());
    let _ = tracker_task.await;
    result?;
    println!("[DEMO] done: two nodes met through the tracker and talked directly");
    Ok(())
}

async fn ping(node: &Node, peer: NodeId, count: u32, interval: Duration) -> Result<()> {
    let conn = node.connect(peer).await?;
    println!("PING {peer} via {}", conn.path());
    let mut rtts = Vec::new();
    for seq in 1..=u64::from(count) {
        if seq > 1 {
            tokio::time::sleep(interval).await;
        }
        match tokio::time::timeout(Duration::from_secs(5), conn.ping(seq)).await {
            Ok(Ok(rtt)) => {
                println!("reply from {} seq={seq} path={} rtt={:.2} ms", peer.short(), conn.path(), ms(rtt));
                rtts.push(rtt);
            }
            Ok(Err(e)) => println!("seq={seq} failed: {e}"),
            Err(_) => println!("seq={seq} timed out"),
        }
    }
    let received = rtts.len();
    print!("--- {peer}: {count} sent, {received} received");
    if let (Some(min), Some(max)) = (rtts.iter().min(), rtts.iter().max()) {
        let avg = rtts.iter().sum::<Duration>() / received as u32;
        print!(", rtt min/avg/max = {:.2}/{:.2}/{:.2} ms", ms(*min), ms(avg), ms(*max));
    }
    println!();
    conn.close(qpeer_node::peer::close_code::NORMAL, "ping done");
    anyhow::ensure!(received > 0, "no ping reply from {peer}");
    Ok(())
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
