//! `qpeer`: a qpeer node on the command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use qpeer_certs::{resolve_home, Identity, NodeId};
use std::sync::Arc;

use qpeer_node::progress::{mib, Progress, ProgressMode};
use qpeer_node::transfer::receive::{read_allowlist, AcceptPolicy, ReceiveConfig, Receiver};
use qpeer_node::transfer::scan::scan;
use qpeer_node::transfer::send::send;
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
    /// Never connect directly: always go through the tracker's relay (end-to-end encrypted
    /// all the same). For networks that block direct UDP between peers, and for testing.
    #[arg(long, global = true)]
    relay_only: bool,
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
    /// Register with the tracker, answer pings and receive files until Ctrl-C.
    ///
    /// Files arrive as DIR/<name>, directories as DIR/<name>/... . Each file is written to
    /// <name>.part, checked against the sender's BLAKE3 hash, and moved into place; an existing
    /// file is never overwritten (the sender is told). Only senders named with --accept-from or
    /// in HOME/allowlist (one NodeId per line) may send, unless --accept-any.
    Listen {
        #[command(flatten)]
        node: NodeOpts,
        /// Directory where received files are written (created if missing). Without it, file
        /// offers are refused.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Accept files from any node.
        #[arg(long, conflicts_with = "accept_from")]
        accept_any: bool,
        /// Accept files from this NodeId (repeatable).
        #[arg(long, value_name = "ID")]
        accept_from: Vec<NodeId>,
    },
    /// Send files and directories to a peer; exits 0 only when the peer verified every file.
    ///
    /// Run the same command again after an interruption to resume: each file continues from
    /// what the receiver already holds.
    Send {
        #[command(flatten)]
        node: NodeOpts,
        /// The receiving peer's NodeId.
        peer: NodeId,
        /// Files and directories to send.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Print only the result.
        #[arg(long, short = 'q')]
        quiet: bool,
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
    /// identities; alice sends bob a generated 64 MiB file, which bob verifies by BLAKE3.
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
    let mut builder = Node::builder().bind_addr(opts.bind).console(console).relay_only(opts.relay_only);
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
            let home = resolve_home(node.home.as_deref())?;
            let policy = if accept_any {
                AcceptPolicy::Any
            } else {
                let allowlist = home.join("allowlist");
                let mut ids = read_allowlist(&allowlist).map_err(anyhow::Error::msg)?;
                ids.extend(accept_from);
                if out.is_some() && ids.is_empty() {
                    println!(
                        "[WARNING] no sender is allowed yet: use --accept-from ID, list ids in {}, or --accept-any",
                        allowlist.display()
                    );
                }
                AcceptPolicy::Only(ids)
            };
            if let Some(out) = &out {
                std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
            }
            let node = start(&node, true).await?;
            let receiver = Receiver::new(ReceiveConfig { out: out.clone(), policy, console: true });
            match &out {
                Some(out) => println!(
                    "[LISTENING] node {} on {}; receiving into {}; Ctrl-C to stop",
                    node.id(),
                    node.local_addr(),
                    out.display()
                ),
                None => println!("[LISTENING] node {} on {}; Ctrl-C to stop", node.id(), node.local_addr()),
            }
            let accept = async {
                let mut serving = tokio::task::JoinSet::new();
                while let Some(conn) = node.accept().await {
                    serving.spawn(receiver.clone().serve(conn));
                    while serving.try_join_next().is_some() {}
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
                let name = peer
                    .name
                    .as_deref()
                    .map(|n| qpeer_tracker::proto::printable(n, 64))
                    .unwrap_or("-".into());
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
        Command::Send { node, peer, paths, quiet } => {
            let mode = ProgressMode::detect(quiet);
            let plan = tokio::task::spawn_blocking(move || scan(&paths)).await??;
            for (path, reason) in &plan.skipped {
                if mode != ProgressMode::Quiet {
                    println!("[SKIPPED] {}: {reason}", path.display());
                }
            }
            let node = start(&node, mode != ProgressMode::Quiet).await?;
            let result = send_plan(&node, peer, plan, mode).await;
            node.shutdown().await;
            let report = result?;
            if report.sent_bytes < report.total_bytes {
                println!(
                    "[RESUMED] {} bytes were already at the receiver; {} bytes sent now",
                    report.total_bytes - report.sent_bytes,
                    report.sent_bytes
                );
            }
            println!(
                "[SENT] {} files, {} bytes, {:.1} MiB/s",
                report.files,
                report.total_bytes,
                mib(report.sent_bytes) / report.elapsed.as_secs_f64().max(1e-9)
            );
            Ok(())
        }
        Command::Demo => demo().await,
    }
}

const DEMO_FILE_MIB: u64 = 64;

/// Writes `mib` MiB of pseudo-random bytes (xorshift; fast, incompressible enough).
fn write_demo_file(path: &std::path::Path, mib: u64) -> Result<u64> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        out.write_all(&block)?;
    }
    out.flush()?;
    Ok(mib << 20)
}

/// A tracker and two nodes in this process, on loopback, with temporary homes.
async fn demo() -> Result<()> {
    use std::net::Ipv4Addr;

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

    // Bob receives into inbox/, from alice only.
    let inbox = scratch.path().join("inbox");
    let receiver = Receiver::new(ReceiveConfig {
        out: Some(inbox.clone()),
        policy: AcceptPolicy::Only([alice.id()].into_iter().collect()),
        console: true,
    });
    let serving = async {
        let mut serving = tokio::task::JoinSet::new();
        while let Some(conn) = bob.accept().await {
            serving.spawn(receiver.clone().serve(conn));
        }
    };

    // Alice sends a generated file.
    let source = scratch.path().join("demo-payload.bin");
    let size = write_demo_file(&source, DEMO_FILE_MIB)?;
    println!("[DEMO] alice sends {} ({} MiB) to bob", source.display(), DEMO_FILE_MIB);
    let sending = async {
        let result = async {
            let conn = alice.connect(bob.id()).await?;
            println!("[DEMO] ping: {:.2} ms", conn.ping(1).await?.as_secs_f64() * 1000.0);
            let paths = vec![source.clone()];
            let plan = tokio::task::spawn_blocking(move || scan(&paths)).await??;
            let progress = Arc::new(Progress::new(ProgressMode::detect(false), "to bob", plan.total_bytes));
            let report = send(&conn, plan, progress.clone()).await;
            progress.finish();
            anyhow::Ok(report?)
        };
        result.await
    };
    let result = tokio::select! {
        result = sending => result,
        _ = serving => Err(anyhow::anyhow!("bob stopped accepting")),
    };
    for node in &nodes {
        node.shutdown().await;
    }
    let _ = stop_tracker.send(());
    let _ = tracker_task.await;
    let report = result?;
    println!(
        "[SENT] {} files, {} bytes, {:.1} MiB/s",
        report.files,
        report.total_bytes,
        mib(report.sent_bytes) / report.elapsed.as_secs_f64().max(1e-9)
    );
    let received = inbox.join("demo-payload.bin");
    let (sent_hash, got_hash) =
        (qpeer_node::transfer::scan::hash_file(&source)?, qpeer_node::transfer::scan::hash_file(&received)?);
    anyhow::ensure!(sent_hash == got_hash, "the received file differs from the one sent");
    anyhow::ensure!(std::fs::metadata(&received)?.len() == size, "the received file has the wrong size");
    println!(
        "[DEMO] verified: {} is byte-identical to what alice sent (blake3 {})",
        received.display(),
        sent_hash.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    Ok(())
}

/// Connects to `peer` and sends `plan` with progress shown per `mode`.
async fn send_plan(
    node: &Node,
    peer: NodeId,
    plan: qpeer_node::transfer::scan::Plan,
    mode: ProgressMode,
) -> Result<qpeer_node::transfer::send::SendReport> {
    let conn = node.connect(peer).await?;
    let progress = Arc::new(Progress::new(mode, format!("to {}", peer.short()), plan.total_bytes));
    let result = send(&conn, plan, progress.clone()).await;
    progress.finish();
    conn.close(qpeer_node::peer::close_code::NORMAL, "transfer done");
    Ok(result?)
}

async fn ping(node: &Node, peer: NodeId, count: u32, interval: Duration) -> Result<()> {
    let conn = node.connect(peer).await?;
    println!("PING {peer}: {}", conn.path());
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
