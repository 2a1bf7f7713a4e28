//! The local control socket: a running node serves `HOME/node.sock` (mode 0600), and
//! `qpeer send`/`ping`/`peers`/`status` run through it instead of starting a second node
//! with the same identity. Frames are the shared length-prefixed bincode codec.
//!
//! A client sends one [`Request`]; the node answers with [`Reply`]s (output lines, progress)
//! and ends with [`Reply::Done`] carrying the exit code.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qpeer_wire::control::{Command, Reply, Request, CONTROL_VERSION};
use qpeer_wire::io::{write_frame, FrameReader, StreamError};
use qpeer_wire::tracker::MAX_FRAME_LEN;
use tokio::net::unix::OwnedReadHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::commands::{self, Output};
use crate::progress::{Progress, ProgressMode};
use crate::Node;

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
    events: mpsc::UnboundedSender<Reply>,
}

impl Output for Remote {
    fn line(&self, text: &str) {
        let _ = self.events.send(Reply::Line(text.to_string()));
    }

    fn progress(&self, label: &str, total: u64) -> Arc<Progress> {
        let events = self.events.clone();
        let label_owned = label.to_string();
        Arc::new(Progress::observed(
            label,
            total,
            Box::new(move |done, total| {
                let _ = events.send(Reply::Progress { label: label_owned.clone(), done, total });
            }),
        ))
    }
}

/// Transfers this node is serving, for `status` (filled by the listener).
pub type TransferList = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// Serves the control socket in `home` until `cancel`. Only the owner can connect (0600 in a
/// 0700 home). A leftover socket file is replaced: we hold the home lock, so no node is
/// serving it.
pub async fn serve(
    node: Arc<Node>,
    tracker: String,
    transfers: TransferList,
    cancel: CancellationToken,
) -> Result<(), ControlError> {
    let path = node.home().join(SOCKET_FILE);
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
        let node = node.clone();
        let tracker = tracker.clone();
        let transfers = transfers.clone();
        let cancel = cancel.clone();
        clients.spawn(async move {
            tokio::select! {
                _ = serve_client(stream, &node, &tracker, &transfers) => {}
                _ = cancel.cancelled() => {}
            }
        });
    }
    clients.close();
    let _ = tokio::time::timeout(Duration::from_secs(3), clients.wait()).await;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn serve_client(stream: UnixStream, node: &Node, tracker: &str, transfers: &TransferList) {
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
    let (events, mut queue) = mpsc::unbounded_channel();
    let out = Remote { events };
    let run = async {
        let result = match request.command {
            Command::Ping { peer, count, interval_ms } => {
                commands::ping(node, peer, count, Duration::from_millis(interval_ms), &out).await
            }
            Command::Peers => commands::peers(node, &out).await,
            Command::Send { peer, paths, quiet } => {
                commands::send_files(node, peer, paths, quiet, &out).await
            }
            Command::Status => {
                commands::status(node, tracker, &transfers(), &out);
                Ok(())
            }
        };
        let done = match result {
            Ok(()) => Reply::Done { code: 0, error: None },
            Err(error) => Reply::Done { code: 1, error: Some(error) },
        };
        let _ = out.events.send(done);
        drop(out);
    };
    let forward = async {
        while let Some(event) = queue.recv().await {
            if write_frame(&mut stream, &event, MAX_FRAME_LEN).await.is_err() {
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
    let progress: Mutex<Option<Arc<Progress>>> = Mutex::new(None);
    loop {
        let Some(event) = replies.next::<Reply>().await? else {
            return Err(ControlError::Closed);
        };
        match event {
            Reply::Line(line) => {
                let bar = progress.lock().ok().and_then(|p| p.clone());
                match bar {
                    Some(bar) => bar.say(&line),
                    None => crate::progress::out_line(&line),
                }
            }
            Reply::Progress { label, done, total } => {
                let mut slot = progress.lock().unwrap_or_else(|p| p.into_inner());
                let bar = slot.get_or_insert_with(|| Arc::new(Progress::new(mode, label, total)));
                bar.set_done(done);
            }
            Reply::Done { code, error } => {
                if let Some(bar) = progress.lock().ok().and_then(|p| p.clone()) {
                    bar.finish();
                }
                if let Some(error) = error {
                    eprintln!("error: {error}");
                }
                return Ok(Some(code));
            }
        }
    }
}
