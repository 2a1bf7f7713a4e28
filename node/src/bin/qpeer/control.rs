//! The local control socket: a running node serves `HOME/node.sock` (mode 0600), and
//! `qpeer send`/`ping`/`peers`/`status` run through it instead of starting a second node
//! with the same identity. Frames are the shared length-prefixed bincode codec.
//!
//! A client sends one [`Request`]; the node answers with [`Reply`]s (output lines, progress)
//! and ends with [`Reply::Done`] carrying the exit code.
//!
//! The request carries the node options the client was given ([`NodeSettings`]). The running
//! node runs every command with its own settings, so a request whose options differ from
//! them (another `--tracker`, `--bind`, `--name`, `--relay-only`, …) is refused with a usage
//! error saying so, instead of being run with those options silently ignored.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use qpeer_node::transfer::receive::Receiver;
use qpeer_node::{Events, Node};
use qpeer_wire::control::{Command, NodeSettings, Reply, Request, CONTROL_VERSION};
use qpeer_wire::io::{write_frame, FrameReader, StreamError};
use qpeer_wire::tracker::MAX_FRAME_LEN;
use tokio::net::unix::OwnedReadHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cli::NodeOpts;
use crate::commands;
use crate::peer_ref::{self, EXIT_USAGE};
use crate::progress::{ProgressMode, ProgressView, Terminal};
use crate::render::{Console, Sink};
use crate::transfers::{TransferRow, Transfers};

/// The socket's file name in the home.
pub const SOCKET_FILE: &str = "node.sock";

/// A control-socket failure.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("control socket: {0}")]
    Stream(#[from] StreamError),
    #[error("the running node closed the control connection before the command finished")]
    Closed,
}

/// How long a frame may take to arrive whole once it has begun.
const PARTIAL_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

fn reader(read: OwnedReadHalf) -> FrameReader<OwnedReadHalf> {
    FrameReader::new(read, MAX_FRAME_LEN, PARTIAL_FRAME_TIMEOUT)
}

/// Output that travels back to the client.
struct Remote {
    replies: mpsc::UnboundedSender<Reply>,
}

impl Sink for Remote {
    fn line(&mut self, text: &str) {
        let _ = self.replies.send(Reply::Line(text.to_string()));
    }

    fn progress(&mut self, label: &str, view: &ProgressView) {
        let _ = self.replies.send(Reply::Progress {
            label: label.to_string(),
            done: view.done,
            total: view.total,
            sent_now: view.sent_now,
            elapsed_ms: u64::try_from(view.elapsed.as_millis()).unwrap_or(u64::MAX),
            files_done: view.files_done,
            files: view.files,
            current: view.current.clone(),
        });
    }

    fn finish(&mut self, label: &str) {
        let _ = self.replies.send(Reply::Finished { label: label.to_string() });
    }
}

/// What a command run for a client needs of the listener.
#[derive(Clone)]
pub struct Served {
    pub node: Arc<Node>,
    /// The tracker as given on the command line, for `status`.
    pub tracker: String,
    pub receiver: Arc<Receiver>,
    /// The listener's own node options, which every command runs with.
    pub settings: NodeSettings,
    /// Transfers in flight, both ways (the listener's receives, the clients' sends).
    pub transfers: Arc<Transfers>,
}

impl Served {
    /// The listener running `node` with `opts`, receiving with `receiver` and reporting on
    /// `events`.
    pub fn new(node: Arc<Node>, opts: &NodeOpts, receiver: Arc<Receiver>, events: &Events) -> Self {
        let transfers = Transfers::new();
        transfers.watch(events);
        Self {
            node,
            tracker: opts.tracker.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            receiver,
            settings: settings(opts),
            transfers,
        }
    }

    /// The transfers in flight, with receives the receiver knows of and no progress was seen
    /// for yet.
    fn transfer_rows(&self) -> Vec<TransferRow> {
        let mut rows = self.transfers.rows();
        for active in self.receiver.active() {
            if !rows.iter().any(|r| r.transfer == active.transfer) {
                rows.push(TransferRow::of_receive(&active));
            }
        }
        rows
    }
}

/// The environment variables that stand for options; one set but empty (`QPEER_TRACKER=`)
/// means unset, as a shell user expects (clap would take it as an empty value).
const OPTION_ENV: &[&str] = &["QPEER_TRACKER", "QPEER_HOME"];

/// Removes the option variables that are set but empty (or blank), before the command line
/// is parsed. Runs first in `main`, before any task could read the environment.
pub fn clear_empty_env() {
    for name in OPTION_ENV {
        if std::env::var_os(name).is_some_and(|v| v.to_string_lossy().trim().is_empty()) {
            std::env::remove_var(name);
        }
    }
}

/// The node options `opts` gives explicitly (on the command line or in the environment).
pub fn settings(opts: &NodeOpts) -> NodeSettings {
    NodeSettings {
        trackers: opts.tracker.iter().map(ToString::to_string).collect(),
        tracker_ca: opts.tracker_ca.as_ref().map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
        bind: opts.bind.map(|b| b.to_string()),
        name: opts.name.clone(),
        relay_only: opts.relay_only,
        no_relay: opts.no_relay,
        congestion: opts.congestion.map(|c| c.name().to_string()),
    }
}

/// The options in `client` that the node running with `listener` cannot honour, as the
/// user would write them, each with what the running node uses.
pub fn unhonoured(listener: &NodeSettings, client: &NodeSettings) -> Vec<String> {
    fn or_none(text: Option<String>) -> String {
        text.unwrap_or_else(|| "none".to_string())
    }
    let mut refused = Vec::new();
    let sorted = |list: &[String]| {
        let mut list = list.to_vec();
        list.sort();
        list.dedup();
        list
    };
    if !client.trackers.is_empty() && sorted(&client.trackers) != sorted(&listener.trackers) {
        let uses =
            if listener.trackers.is_empty() { "none given".to_string() } else { listener.trackers.join(",") };
        refused.push(format!("--tracker/QPEER_TRACKER {} (it uses {uses})", client.trackers.join(",")));
    }
    if client.tracker_ca.is_some() && client.tracker_ca != listener.tracker_ca {
        refused.push(format!(
            "--tracker-ca {} (it uses {})",
            or_none(client.tracker_ca.as_ref().map(|p| p.display().to_string())),
            or_none(listener.tracker_ca.as_ref().map(|p| p.display().to_string()))
        ));
    }
    if client.bind.is_some() && client.bind != listener.bind {
        refused.push(format!(
            "--bind {} (it uses {})",
            or_none(client.bind.clone()),
            or_none(listener.bind.clone())
        ));
    }
    if client.name.is_some() && client.name != listener.name {
        refused.push(format!(
            "--name {} (it uses {})",
            or_none(client.name.clone()),
            or_none(listener.name.clone())
        ));
    }
    if client.relay_only && !listener.relay_only {
        refused.push("--relay-only (it runs without)".to_string());
    }
    if client.no_relay && !listener.no_relay {
        refused.push("--no-relay (it runs without)".to_string());
    }
    let default = qpeer_node::Congestion::default().name();
    let listener_congestion = listener.congestion.as_deref().unwrap_or(default);
    if let Some(congestion) = client.congestion.as_deref().filter(|c| *c != listener_congestion) {
        refused.push(format!("--congestion {congestion} (it uses {listener_congestion})"));
    }
    refused
}

/// Serves the control socket in `home` until `cancel`. Only the owner can connect (0600 in a
/// 0700 home). A leftover socket file is replaced: we hold the home lock, so no node is
/// serving it.
pub async fn serve(served: Served, cancel: CancellationToken) -> Result<(), ControlError> {
    let path = served.node.home().join(SOCKET_FILE);
    let io = |source| ControlError::Io { path: path.clone(), source };
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::info!("removed a stale control socket {}", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(&path).map_err(io)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(io)?;
    let clients = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else { continue };
        let served = served.clone();
        let cancel = cancel.clone();
        clients.spawn(async move {
            tokio::select! {
                _ = serve_client(stream, &served) => {}
                _ = cancel.cancelled() => {}
            }
        });
    }
    clients.close();
    let _ = tokio::time::timeout(Duration::from_secs(3), clients.wait()).await;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn serve_client(stream: UnixStream, served: &Served) {
    let (read, mut stream) = stream.into_split();
    let mut frames = reader(read);
    let request = match frames.next::<Request>().await {
        Ok(Some(request)) => request,
        _ => return,
    };
    if request.version != CONTROL_VERSION {
        let error = format!(
            "the running node speaks control protocol {CONTROL_VERSION}, this qpeer {}; use the same qpeer version",
            request.version
        );
        let _ = write_frame(&mut stream, &Reply::Done { code: 1, error: Some(error) }, MAX_FRAME_LEN).await;
        return;
    }
    let refused = unhonoured(&served.settings, &request.settings);
    if !refused.is_empty() {
        let error = format!(
            "a `qpeer listen` (pid {}) runs on {} and runs this command with its own settings, so it cannot \
             apply {}; leave {} out to use the listener's settings, or stop the listener to run a node of \
             your own with them",
            std::process::id(),
            served.node.home().display(),
            refused.join(", "),
            if refused.len() == 1 { "it" } else { "them" }
        );
        let done = Reply::Done { code: i32::from(EXIT_USAGE), error: Some(error) };
        let _ = write_frame(&mut stream, &done, MAX_FRAME_LEN).await;
        return;
    }
    let (replies, mut queue) = mpsc::unbounded_channel();
    let run = {
        let replies = replies.clone();
        async move {
            // The command's own transfer events go to this client only, not to the
            // listener's console.
            let verbose = !matches!(
                request.command,
                Command::Send { quiet: true, .. }
                    | Command::Send { json: true, .. }
                    | Command::Ping { json: true, .. }
            );
            // Sends run here show in `qpeer status` too.
            let events = Events::new();
            served.transfers.watch(&events);
            let console = Console::start(&events, Remote { replies: replies.clone() }, verbose);
            let result = match request.command {
                Command::Status { json } => {
                    crate::status::listener(
                        &served.node,
                        &served.tracker,
                        &served.transfer_rows(),
                        json,
                        &*console,
                    );
                    Ok(())
                }
                command => commands::run(&served.node, command, &*console).await,
            };
            console.flush();
            let done = match result {
                Ok(()) => Reply::Done { code: 0, error: None },
                Err(e) => {
                    Reply::Done { code: i32::from(peer_ref::exit_code(&e)), error: Some(crate::describe(&e)) }
                }
            };
            let _ = replies.send(done);
        }
    };
    drop(replies);
    let forward = async {
        while let Some(reply) = queue.recv().await {
            if write_frame(&mut stream, &reply, MAX_FRAME_LEN).await.is_err() {
                return;
            }
        }
    };
    // The client sends nothing after its request: its end of the socket closing means it
    // stopped (Ctrl-C), and its command stops with it (a send leaves the receiver's `.part`).
    let client_gone = async {
        let _ = frames.next::<Request>().await;
    };
    tokio::select! {
        _ = async { tokio::join!(run, forward) } => {}
        _ = client_gone => tracing::info!("a control client left; its command stopped"),
    }
}

/// Runs `command` on the node serving `home`, printing its output here as if it ran here.
/// Returns the exit code. `Ok(None)`: no node answers on that socket.
pub async fn call(home: &Path, command: Command, mode: ProgressMode) -> Result<Option<i32>, ControlError> {
    call_with(home, NodeSettings::default(), command, mode).await
}

/// [`call`] for a command given the node options `settings` (refused by the running node if
/// it cannot honour them).
pub async fn call_with(
    home: &Path,
    settings: NodeSettings,
    command: Command,
    mode: ProgressMode,
) -> Result<Option<i32>, ControlError> {
    let path = home.join(SOCKET_FILE);
    let stream = match UnixStream::connect(&path).await {
        Ok(stream) => stream,
        Err(e)
            if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) =>
        {
            return Ok(None)
        }
        Err(source) => return Err(ControlError::Io { path, source }),
    };
    let (read, mut write) = stream.into_split();
    write_frame(&mut write, &Request { version: CONTROL_VERSION, command, settings }, MAX_FRAME_LEN).await?;
    let mut replies = reader(read);
    let mut terminal = Terminal::new(mode);
    loop {
        let Some(reply) = replies.next::<Reply>().await? else {
            return Err(ControlError::Closed);
        };
        match reply {
            Reply::Line(line) => terminal.line(&line),
            Reply::Finished { label } => terminal.finish(&label),
            Reply::Progress { label, done, total, sent_now, elapsed_ms, files_done, files, current } => {
                let view = ProgressView {
                    done,
                    total,
                    sent_now,
                    elapsed: Duration::from_millis(elapsed_ms),
                    files_done,
                    files,
                    current,
                };
                terminal.progress(&label, &view);
            }
            Reply::Done { code, error } => {
                drop(terminal);
                if let Some(error) = error {
                    eprintln!("error: {error}");
                }
                return Ok(Some(code));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_the_listener_cannot_honour_are_named_and_its_own_pass() {
        let listener = NodeSettings {
            trackers: vec!["a@127.0.0.1:1".into(), "b@127.0.0.1:2".into()],
            bind: Some("127.0.0.1:0".into()),
            ..NodeSettings::default()
        };
        assert!(unhonoured(&listener, &NodeSettings::default()).is_empty(), "nothing given");
        let same = NodeSettings {
            trackers: vec!["b@127.0.0.1:2".into(), "a@127.0.0.1:1".into()],
            bind: Some("127.0.0.1:0".into()),
            ..NodeSettings::default()
        };
        assert!(unhonoured(&listener, &same).is_empty(), "the listener's own settings, in any order");
        let other = NodeSettings {
            trackers: vec!["c@127.0.0.1:3".into()],
            bind: Some("127.0.0.1:9".into()),
            name: Some("x".into()),
            relay_only: true,
            congestion: Some("cubic".into()),
            ..NodeSettings::default()
        };
        let refused = unhonoured(&listener, &other);
        assert_eq!(refused.len(), 5, "{refused:?}");
        assert!(refused[4].contains("--congestion cubic (it uses rate)"), "{refused:?}");
        let default_named = NodeSettings { congestion: Some("rate".into()), ..listener.clone() };
        assert!(unhonoured(&listener, &default_named).is_empty(), "the default, named");
        assert!(refused[0].starts_with("--tracker") && refused[0].contains("it uses a@127.0.0.1:1"));
    }
}
