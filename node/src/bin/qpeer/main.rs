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
mod netcheck;
mod progress;
mod render;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use qpeer_certs::{resolve_home, Identity, NodeId};
use qpeer_node::transfer::receive::{read_allowlist, AcceptPolicy, ReceiveConfig, Receiver};
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
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
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
    if let Err(e) = node.registered(Duration::from_secs(opts.register_timeout)).await {
        node.shutdown().await;
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
    let events = Events::new();
    let console = Console::start(&events, Terminal::new(mode), verbose);
    match builder(opts, &events).bind().await {
        Ok(node) => {
            let registered = register(node, opts).await;
            let result = match registered {
                Ok(node) => {
                    let result = commands::run(&node, command, &*console).await;
                    node.shutdown().await;
                    result
                }
                Err(e) => Err(e),
            };
            // Everything the node said before it stopped is shown before the result.
            console.flush();
            result.map(|()| ExitCode::SUCCESS)
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

/// `qpeer listen`: registered and reachable until Ctrl-C, receiving into `out` if given.
async fn listen(
    opts: NodeOpts,
    out: Option<PathBuf>,
    accept_any: bool,
    accept_from: Vec<NodeId>,
) -> Result<ExitCode> {
    let events = Events::new();
    let console = Console::start(&events, Terminal::new(ProgressMode::Quiet), true);
    let home = resolve_home(opts.home.as_deref())?;
    let policy = if accept_any {
        AcceptPolicy::Any
    } else {
        let allowlist = home.join("allowlist");
        let mut ids = read_allowlist(&allowlist)?;
        ids.extend(accept_from);
        if out.is_some() && ids.is_empty() {
            console.line(&format!(
                "[WARNING] no sender is allowed yet: use --accept-from ID, list ids in {}, or --accept-any",
                allowlist.display()
            ));
        }
        AcceptPolicy::Only(ids)
    };
    if let Some(out) = &out {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    }
    let node = Arc::new(register(builder(&opts, &events).bind().await?, &opts).await?);
    let receiver = Receiver::new(ReceiveConfig { out: out.clone(), policy, events: events.clone() });
    let cancel = CancellationToken::new();
    let served = control::Served {
        node: node.clone(),
        tracker: opts.tracker.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        receiver: receiver.clone(),
    };
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
    let failure = tokio::select! {
        _ = shutdown_signal() => None,
        _ = accept => None,
        failure = node.failed() => Some(failure),
    };
    cancel.cancel();
    let _ = control_server.await;
    node.shutdown().await;
    console.flush();
    match failure {
        Some(e @ NodeError::Replaced { .. }) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(EXIT_REPLACED))
        }
        Some(e) => Err(e.into()),
        None => Ok(ExitCode::SUCCESS),
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
        Command::Peers { node } => one_shot(&node, false, ProgressMode::Quiet, Remote::Peers).await,
        Command::Ping { node, peer, count, interval } => {
            let interval_ms = (interval.max(0.0) * 1000.0) as u64;
            one_shot(&node, true, ProgressMode::Quiet, Remote::Ping { peer, count, interval_ms }).await
        }
        Command::Send { node, peer, paths, quiet } => {
            let mode = ProgressMode::detect(quiet);
            // The running node may have another working directory: send absolute paths.
            let paths = paths
                .iter()
                .map(|p| std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display())))
                .collect::<Result<Vec<_>>>()?;
            one_shot(&node, !quiet, mode, Remote::Send { peer, paths, quiet }).await
        }
        Command::Status { home } => {
            let home = resolve_home(home.as_deref())?;
            match control::call(&home, Remote::Status, ProgressMode::Quiet).await? {
                Some(code) => Ok(ExitCode::from(u8::try_from(code).unwrap_or(1))),
                None => {
                    println!("node:     not running on {}", home.display());
                    Ok(ExitCode::from(EXIT_NOT_RUNNING))
                }
            }
        }
        Command::Netcheck { node, json } => netcheck::run(&node, json).await,
        Command::Demo => demo::run().await.map(|()| ExitCode::SUCCESS),
    }
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
