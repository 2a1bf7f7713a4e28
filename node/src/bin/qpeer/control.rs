//! The local control socket: a running node serves `HOME/node.sock` (mode 0600), and
//! `qpeer send`/`ping`/`peers`/`status` run through it instead of starting a second node
//! with the same identity. Frames are the shared length-prefixed bincode codec.
//!
//! A client sends one [`Request`]; the node answers with [`Reply`]s (output lines, progress)
//! and ends with [`Reply::Done`] carrying the exit code.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use qpeer_node::transfer::receive::Receiver;
use qpeer_node::{Events, Node};
use qpeer_wire::control::{Command, Reply, Request, CONTROL_VERSION};
use qpeer_wire::io::{write_frame, FrameReader, StreamError};
use qpeer_wire::tracker::MAX_FRAME_LEN;
use tokio::net::unix::OwnedReadHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::commands;
use crate::progress::{ProgressMode, Terminal};
use crate::render::{Console, Sink};

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

    fn progress(&mut self, label: &str, done: u64, total: u64) {
        let _ = self.replies.send(Reply::Progress { label: label.to_string(), done, total });
    }

    /// The client clears its bar when the command is done.
    fn finish(&mut self, _label: &str) {}
}

/// What a command run for a client needs of the listener.
#[derive(Clone)]
pub struct Served {
    pub node: Arc<Node>,
    /// The tracker as given on the command line, for `status`.
    pub tracker: String,
    pub receiver: Arc<Receiver>,
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
    let request = match reader(read).next::<Request>().await {
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
    let (replies, mut queue) = mpsc::unbounded_channel();
    let run = {
        let replies = replies.clone();
        async move {
            // The command's own transfer events go to this client only, not to the
            // listener's console.
            let verbose = !matches!(request.command, Command::Send { quiet: true, .. });
            let console = Console::start(&Events::new(), Remote { replies: replies.clone() }, verbose);
            let result = match request.command {
                Command::Status => {
                    commands::status(&served.node, &served.tracker, &served.receiver.active(), &*console);
                    Ok(())
                }
                command => commands::run(&served.node, command, &*console).await,
            };
            console.flush();
            let done = match result {
                Ok(()) => Reply::Done { code: 0, error: None },
                Err(e) => Reply::Done { code: 1, error: Some(crate::describe(&e)) },
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
    tokio::join!(run, forward);
}

/// Runs `command` on the node serving `home`, printing its output here as if it ran here.
/// Returns the exit code. `Ok(None)`: no node answers on that socket.
pub async fn call(home: &Path, command: Command, mode: ProgressMode) -> Result<Option<i32>, ControlError> {
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
    write_frame(&mut write, &Request { version: CONTROL_VERSION, command }, MAX_FRAME_LEN).await?;
    let mut replies = reader(read);
    let mut terminal = Terminal::new(mode);
    loop {
        let Some(reply) = replies.next::<Reply>().await? else {
            return Err(ControlError::Closed);
        };
        match reply {
            Reply::Line(line) => terminal.line(&line),
            Reply::Progress { label, done, total } => terminal.progress(&label, done, total),
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
