//! `qpeer`: a qpeer node on the command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use qpeer_certs::{resolve_home, Identity, NodeId};
use std::sync::Arc;

use qpeer_node::commands::{self, Stdout};
use qpeer_node::control;
use qpeer_node::progress::{mib, Progress, ProgressMode};
use qpeer_node::transfer::receive::{read_allowlist, AcceptPolicy, ReceiveConfig, Receiver};
use qpeer_node::transfer::scan::scan;
use qpeer_node::transfer::send::send;
use qpeer_node::{Node, NodeError};
use qpeer_tracker::TrackerAddr;
use tokio_util::sync::CancellationToken;

/// qpeer: direct, end-to-end encrypted QUIC connections between machines behind home NATs.
///
/// A node registers with a tracker (`--tracker` / QPEER_TRACKER), which tells it its public
/// address and introduces it to other nodes; both then probe each other through their NATs
/// and talk over mutually authenticated QUIC. A connection starts at once, through the
/// tracker's relay if no direct path answers yet, and moves to a direct path as soon as a
/// signed probe gets through; it stays up while NATs rebind or networks change
/// (`[PATH]` lines say when its path changes). A node's id is its Ed25519 public key, kept
/// in its home directory (`--home` / QPEER_HOME, default ~/.local/share/qpeer).
///
/// One node runs per home (it holds HOME/node.lock). While `qpeer listen` runs, `qpeer send`,
/// `ping`, `peers` and `status` on the same home run inside it through its control socket
/// (HOME/node.sock), so the identity never registers twice.
///
/// Exit codes: 0 success, 1 failure (the reason is printed on stderr), 2 bad usage,
/// 3 `listen` stopped because the same NodeId registered from another process,
/// 4 `status` found no node running.
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
    #[arg(long, global = true, conflicts_with = "no_relay")]
    relay_only: bool,
    /// Never use the tracker's relay: reach peers directly or not at all (a peer behind a
    /// symmetric NAT may then be unreachable).
    #[arg(long, global = true)]
    no_relay: bool,
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
    /// Connect to a peer and measure round trips; each reply says which path it took.
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
    /// Show whether a node runs on this home: its NodeId, tracker, observed address, peers
    /// with path and RTT, and transfers in progress. Exits 4 when no node runs.
    Status {
        /// Home directory (default: $QPEER_HOME, else ~/.local/share/qpeer).
        #[arg(long, env = "QPEER_HOME")]
        home: Option<PathBuf>,
    },
    /// Run the whole thing locally: a tracker and two nodes on 127.0.0.1 with throwaway
    /// identities; alice sends bob a generated 64 MiB file, which bob verifies by BLAKE3.
    Demo,
}

/// Exit code: this node was replaced by the same NodeId registered elsewhere.
const EXIT_REPLACED: u8 = 3;
/// Exit code of `qpeer status` when no node runs on the home.
const EXIT_NOT_RUNNING: u8 = 4;

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
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn builder(opts: &NodeOpts, console: bool) -> qpeer_node::NodeBuilder {
    let mut builder = Node::builder()
        .bind_addr(opts.bind)
        .console(console)
        .relay_only(opts.relay_only)
        .no_relay(opts.no_relay);
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
    builder
}

async fn register(node: Node, opts: &NodeOpts) -> Result<Node> {
    if let Err(e) = node.registered(Duration::from_secs(opts.register_timeout)).await {
        node.shutdown().await;
        return Err(e).context("cannot register with the tracker");
    }
    Ok(node)
}

/// Runs a command in a node of its own, or, when a node already runs on this home, inside
/// that node through its control socket (one identity, one running node).
async fn one_shot(
    opts: &NodeOpts,
    console: bool,
    mode: ProgressMode,
    command: qpeer_wire::control::Command,
) -> Result<ExitCode> {
    match builder(opts, console).bind().await {
        Ok(node) => {
            let node = register(node, opts).await?;
            let out = Stdout { mode };
            let result = match command {
                qpeer_wire::control::Command::Ping { peer, count, interval_ms } => {
                    commands::ping(&node, peer, count, Duration::from_millis(interval_ms), &out).await
                }
                qpeer_wire::control::Command::Peers => commands::peers(&node, &out).await,
                qpeer_wire::control::Command::Send { peer, paths, quiet } => {
                    commands::send_files(&node, peer, paths, quiet, &out).await
                }
                qpeer_wire::control::Command::Status => Ok(()),
            };
            node.shutdown().await;
            result.map_err(anyhow::Error::msg)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(NodeError::HomeInUse { home }) => match control::call(&home, command, mode).await? {
            Some(code) => Ok(ExitCode::from(u8::try_from(code).unwrap_or(1))),
            None => bail!(
                "a qpeer command is already running on {} and it does not serve a control socket \
                 (only `qpeer listen` does); wait for it to finish",
                home.display()
            ),
        },
        Err(e) => Err(e.into()),
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Id { node } => {
            let home = resolve_home(node.home.as_deref())?;
            let identity = Identity::load_or_create(&home)?;
            println!("{}", identity.node_id());
            Ok(ExitCode::SUCCESS)
        }
        Command::Listen { node: opts, out, accept_any, accept_from } => {
            let home = resolve_home(opts.home.as_deref())?;
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
            let node = Arc::new(register(builder(&opts, true).bind().await?, &opts).await?);
            let receiver = Receiver::new(ReceiveConfig { out: out.clone(), policy, console: true });
            let cancel = CancellationToken::new();
            let tracker = opts.tracker.as_ref().map(ToString::to_string).unwrap_or_default();
            let transfers: control::TransferList = {
                let receiver = receiver.clone();
                Arc::new(move || receiver.active())
            };
            let control_server =
                tokio::spawn(control::serve(node.clone(), tracker, transfers, cancel.clone()));
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
            let failure = tokio::select! {
                _ = shutdown_signal() => None,
                _ = accept => None,
                failure = node.failed() => Some(failure),
            };
            cancel.cancel();
            let _ = control_server.await;
            node.shutdown().await;
            match failure {
                Some(e @ NodeError::Replaced { .. }) => {
                    eprintln!("error: {e}");
                    Ok(ExitCode::from(EXIT_REPLACED))
                }
                Some(e) => Err(e.into()),
                None => Ok(ExitCode::SUCCESS),
            }
        }
        Command::Peers { node } => {
            one_shot(&node, false, ProgressMode::Quiet, qpeer_wire::control::Command::Peers).await
        }
        Command::Ping { node, peer, count, interval } => {
            let interval_ms = (interval.max(0.0) * 1000.0) as u64;
            one_shot(
                &node,
                true,
                ProgressMode::Quiet,
                qpeer_wire::control::Command::Ping { peer, count, interval_ms },
            )
            .await
        }
        Command::Send { node, peer, paths, quiet } => {
            let mode = ProgressMode::detect(quiet);
            // The running node may have another working directory: send absolute paths.
            let paths = paths
                .iter()
                .map(|p| std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display())))
                .collect::<Result<Vec<_>>>()?;
            one_shot(
                &node,
                mode != ProgressMode::Quiet,
                mode,
                qpeer_wire::control::Command::Send { peer, paths, quiet },
            )
            .await
        }
        Command::Status { home } => {
            let home = resolve_home(home.as_deref())?;
            match control::call(&home, qpeer_wire::control::Command::Status, ProgressMode::Quiet).await? {
                Some(code) => Ok(ExitCode::from(u8::try_from(code).unwrap_or(1))),
                None => {
                    println!("node:     not running on {}", home.display());
                    Ok(ExitCode::from(EXIT_NOT_RUNNING))
                }
            }
        }
        Command::Demo => demo().await.map(|()| ExitCode::SUCCESS),
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
