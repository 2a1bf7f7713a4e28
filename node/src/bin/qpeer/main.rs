//! `qpeer`: a qpeer node on the command line.
//!
//! - [`cli`]: the command line.
//! - [`render`]: the console: node events as lines, in order with a command's output.
//! - [`progress`]: stdout and progress bars / lines.
//! - [`commands`]: `ping`, `peers`, `send`, `status`.
//! - [`control`]: the control socket through which commands run inside a running `listen`.
//! - [`demo`]: `qpeer demo`.

mod cli;
mod commands;
mod control;
mod demo;
mod help;
mod logging;
mod netcheck;
mod peer_ref;
mod progress;
mod render;
mod signals;
mod status;
mod transfers;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use qpeer_certs::{resolve_home, Identity};
use qpeer_node::transfer::receive::{AcceptPolicy, ReceiveConfig, Receiver, WatchedAllowlist};
use qpeer_node::{Events, Node, NodeError};
use tokio_util::sync::CancellationToken;

use cli::{Cli, Command, NodeOpts};
use progress::{ProgressMode, Terminal};
use render::{Console, Output};

/// Exit code: this node was replaced by the same NodeId registered elsewhere.
const EXIT_REPLACED: u8 = 3;
/// Exit code of `qpeer status` when no node runs on the home.
const EXIT_NOT_RUNNING: u8 = 4;

#[tokio::main]
async fn main() -> ExitCode {
    control::clear_empty_env();
    logging::init();
    match run(help::parse()).await {
        Ok(code) => code,
        Err(e) => match e.downcast_ref::<signals::Interrupted>() {
            Some(stop) => {
                eprintln!("{stop}");
                stop.signal.exit_code()
            }
            None => {
                eprintln!("error: {}", describe(&e));
                ExitCode::from(peer_ref::exit_code(&e))
            }
        },
    }
}

/// An error with its causes, leaving out a cause the text already says (the library's
/// errors include their source in their message).
pub fn describe(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

pub fn builder(opts: &NodeOpts, events: &Events) -> qpeer_node::NodeBuilder {
    let mut builder =
        Node::builder().events(events.clone()).relay_only(opts.relay_only).no_relay(opts.no_relay);
    if let Some(bind) = opts.bind {
        builder = builder.bind_addr(bind);
    }
    if let Some(congestion) = opts.congestion {
        builder = builder.congestion(congestion);
    }
    if let Some(home) = &opts.home {
        builder = builder.home(home);
    }
    builder = builder.trackers(opts.tracker.iter().cloned());
    if let Some(ca) = &opts.tracker_ca {
        builder = builder.tracker_ca(ca);
    }
    if let Some(name) = &opts.name {
        builder = builder.name(name);
    }
    builder
}

async fn register(node: Node, opts: &NodeOpts) -> Result<Node> {
    let registered = signals::until_stopped(async {
        Ok(node.registered(Duration::from_secs(opts.register_timeout)).await?)
    });
    if let Err(e) = registered.await {
        // A node still trying a silent tracker would wait out its connect attempt (seconds
        // past the timeout): the answer is known, so the goodbye is bounded.
        let _ = tokio::time::timeout(Duration::from_millis(300), node.shutdown()).await;
        return Err(e).context("cannot register with the tracker");
    }
    Ok(node)
}

/// Runs a command in a node of its own, or, when a node already runs on this home, inside
/// that node through its control socket (one identity, one running node). `verbose`: show
/// the node's event lines.
async fn one_shot(
    opts: &NodeOpts,
    verbose: bool,
    mode: ProgressMode,
    command: qpeer_wire::control::Command,
) -> Result<ExitCode> {
    signals::install()?;
    let events = Events::new();
    let console = Console::start(&events, Terminal::new(mode), verbose);
    match builder(opts, &events).bind().await {
        Ok(node) => {
            let registered = register(node, opts).await;
            let result = match registered {
                Ok(node) => {
                    let result = signals::until_stopped(commands::run_own(&node, command, &*console)).await;
                    node.shutdown().await;
                    result
                }
                Err(e) => Err(e),
            };
            // Everything the node said before it stopped is shown before the result.
            console.flush();
            result.map(|()| ExitCode::SUCCESS)
        }
        Err(NodeError::HomeInUse { home }) => match signals::until_stopped(async {
            Ok(control::call_with(&home, control::settings(opts), command, mode).await?)
        })
        .await?
        {
            Some(code) => Ok(ExitCode::from(u8::try_from(code).unwrap_or(1))),
            None => bail!("{}", status::busy(&home)),
        },
        Err(e) => Err(e.into()),
    }
}

/// `qpeer listen`: registered and reachable until Ctrl-C, receiving into `out` if given.
async fn listen(
    opts: NodeOpts,
    out: Option<PathBuf>,
    accept_any: bool,
    accept_from: Vec<String>,
) -> Result<ExitCode> {
    signals::install()?;
    let events = Events::new();
    let console = Console::start(&events, Terminal::new(ProgressMode::detect(false)), true);
    let home = resolve_home(opts.home.as_deref())?;
    let policy = if accept_any {
        AcceptPolicy::Any
    } else {
        // Read again whenever it changes: editing the allowlist needs no restart.
        let allowlist = WatchedAllowlist::new(home.join("allowlist"))?;
        if out.is_some() && allowlist.current().is_empty() && accept_from.is_empty() {
            console.line(&format!(
                "[WARNING] no sender is allowed yet: use --accept-from ID, list ids in {} (read again when it changes), or --accept-any",
                allowlist.path().display()
            ));
        }
        AcceptPolicy::Watched(Arc::new(allowlist))
    };
    let mut config = ReceiveConfig { out: out.clone(), policy, events: events.clone() };
    // `--out` must be a directory (made if missing) before the node starts.
    config.prepare()?;
    let node = Arc::new(register(builder(&opts, &events).bind().await?, &opts).await?);
    config.policy = peer_ref::with_accept_from(config.policy, &node, &accept_from).await?;
    let receiver = Receiver::new(config);
    let cancel = CancellationToken::new();
    let served = control::Served::new(node.clone(), &opts, receiver.clone(), &events);
    let control_server = tokio::spawn(control::serve(served, cancel.clone()));
    match &out {
        Some(out) => console.line(&format!(
            "[LISTENING] node {} on {}; receiving into {}; Ctrl-C to stop",
            node.id(),
            node.local_addr(),
            out.display()
        )),
        None => {
            console.line(&format!("[LISTENING] node {} on {}; Ctrl-C to stop", node.id(), node.local_addr()))
        }
    }
    let accept = async {
        let mut serving = tokio::task::JoinSet::new();
        while let Some(conn) = node.accept().await {
            serving.spawn(receiver.clone().serve(conn));
            while serving.try_join_next().is_some() {}
        }
    };
    let mut stopped_by = None;
    let failure = tokio::select! {
        stop = signals::stopped() => {
            stopped_by = Some(stop);
            None
        }
        _ = accept => None,
        failure = node.failed() => Some(failure),
    };
    cancel.cancel();
    let _ = control_server.await;
    node.shutdown().await;
    console.flush();
    match failure {
        Some(NodeError::Replaced { .. }) => {
            // The [REPLACED] line above says it all; this only marks the exit.
            eprintln!("error: this NodeId was registered again by another process; stopped");
            Ok(ExitCode::from(EXIT_REPLACED))
        }
        Some(e) => Err(e.into()),
        None => match stopped_by {
            Some(stop) => {
                console.line(&format!("[STOPPED] node stopped by {}", stop.name()));
                Ok(stop.exit_code())
            }
            None => Ok(ExitCode::SUCCESS),
        },
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    use qpeer_wire::control::Command as Remote;
    match cli.command {
        Command::Id { node } => {
            let home = resolve_home(node.home.as_deref())?;
            let identity = Identity::load_or_create(&home)?;
            println!("{}", identity.node_id());
            Ok(ExitCode::SUCCESS)
        }
        Command::Listen { node, out, accept_any, accept_from } => {
            listen(node, out, accept_any, accept_from).await
        }
        Command::Peers { node, json } => {
            one_shot(&node, false, ProgressMode::Quiet, Remote::Peers { json }).await
        }
        Command::Ping { node, peer, count, interval, json } => {
            let interval_ms = (interval.max(0.0) * 1000.0) as u64;
            one_shot(&node, !json, ProgressMode::Quiet, Remote::Ping { peer, count, interval_ms, json }).await
        }
        Command::Alias { home, name, id, remove, force } => {
            let home = resolve_home(home.as_deref())?;
            peer_ref::alias_command(&home, name, id, remove, force).map(|()| ExitCode::SUCCESS)
        }
        Command::Send { node, peer, paths, quiet, json } => {
            let mode = ProgressMode::detect(quiet || json);
            // The running node may have another working directory: send absolute paths.
            let paths = paths
                .iter()
                .map(|p| std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display())))
                .collect::<Result<Vec<_>>>()?;
            let command = Remote::Send { peer, paths, quiet, json };
            one_shot(&node, !quiet && !json, mode, command).await.map_err(|e| {
                signals::with_hint(e, || {
                    format!(
                        "the receiver keeps what arrived; run the same command again to resume: {}",
                        signals::command_line()
                    )
                })
            })
        }
        Command::Status { home, json } => {
            let home = resolve_home(home.as_deref())?;
            match control::call(&home, Remote::Status { json }, ProgressMode::Quiet).await? {
                Some(code) => Ok(ExitCode::from(u8::try_from(code).unwrap_or(1))),
                None => Ok(status::not_listening(&home, json, EXIT_NOT_RUNNING)),
            }
        }
        Command::Netcheck { node, json } => netcheck::run(&node, json).await,
        Command::Demo => demo::run().await.map(|()| ExitCode::SUCCESS),
        Command::Completions { shell } => help::completions(shell).map(|()| ExitCode::SUCCESS),
        Command::Man { dir } => help::man(dir.as_deref()).map(|()| ExitCode::SUCCESS),
    }
}
