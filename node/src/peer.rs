//! Peer connections and the node-to-node stream protocol (ALPN `qpeer/1`).
//!
//! Every stream starts with one byte naming its kind. Ping streams are answered by the node
//! itself; other kinds are handed to the application through [`PeerConnection::accept_stream`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use qpeer_certs::NodeId;
use qpeer_wire::peer::StreamKind;
use tokio::sync::mpsc;

use crate::error::{NodeError, StreamFailure};
use crate::paths::{PathTable, PeerPath};

/// A stream the peer opened for the application: its kind and both halves.
pub type AppStream = (StreamKind, quinn::SendStream, quinn::RecvStream);

/// An established connection to a verified peer.
#[derive(Clone)]
pub struct PeerConnection {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: NodeId,
    connection: quinn::Connection,
    /// Where the session's current path is kept.
    paths: Arc<Mutex<PathTable>>,
    established: Instant,
    app_streams_tx: mpsc::Sender<AppStream>,
    app_streams: tokio::sync::Mutex<mpsc::Receiver<AppStream>>,
}

impl std::fmt::Debug for PeerConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConnection")
            .field("peer", &self.inner.node_id)
            .field("path", &self.path())
            .finish_non_exhaustive()
    }
}

impl PeerConnection {
    pub(crate) fn new(node_id: NodeId, connection: quinn::Connection, paths: Arc<Mutex<PathTable>>) -> Self {
        // As many as the peer may have open: a burst of file streams is queued, not refused.
        let (app_streams_tx, app_streams) = mpsc::channel(crate::transport::MAX_BIDI_STREAMS as usize);
        Self {
            inner: Arc::new(Inner {
                node_id,
                connection,
                paths,
                established: Instant::now(),
                app_streams_tx,
                app_streams: tokio::sync::Mutex::new(app_streams),
            }),
        }
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// The path the session's packets take right now.
    pub fn path(&self) -> PeerPath {
        self.path_since().0
    }

    /// The current path and when the session moved to it.
    pub fn path_since(&self) -> (PeerPath, Instant) {
        self.inner
            .paths
            .lock()
            .path_of(&self.inner.node_id)
            .unwrap_or((PeerPath::Waiting, self.inner.established))
    }

    /// quinn's current RTT estimate.
    pub fn rtt(&self) -> Duration {
        self.inner.connection.rtt()
    }

    pub fn connection(&self) -> &quinn::Connection {
        &self.inner.connection
    }

    /// When this connection was established.
    pub fn established(&self) -> Instant {
        self.inner.established
    }

    pub fn is_open(&self) -> bool {
        self.inner.connection.close_reason().is_none()
    }

    /// Opens a bidirectional stream of `kind` for the application.
    pub async fn open_stream(
        &self,
        kind: StreamKind,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), NodeError> {
        let (mut send, recv) = self.inner.connection.open_bi().await.map_err(|e| self.conn_err(e))?;
        send.write_all(&[kind as u8]).await.map_err(|e| self.stream_err(e))?;
        Ok((send, recv))
    }

    /// The next stream the peer opened for the application (not ping); `None` once closed.
    pub async fn accept_stream(&self) -> Option<AppStream> {
        let mut streams = self.inner.app_streams.lock().await;
        tokio::select! {
            stream = streams.recv() => stream,
            _ = self.inner.connection.closed() => None,
        }
    }

    /// Queues a stream the peer opened for [`accept_stream`](Self::accept_stream); false when
    /// the queue is full (the application is not accepting).
    pub(crate) fn offer_stream(&self, stream: AppStream) -> bool {
        self.inner.app_streams_tx.try_send(stream).is_ok()
    }

    /// One round trip on a fresh ping stream.
    pub async fn ping(&self, seq: u64) -> Result<Duration, NodeError> {
        let (mut send, mut recv) = self.open_stream(StreamKind::Ping).await?;
        // Ahead of bulk data: a ping measures the path, not our own send queue.
        let _ = send.set_priority(PING_PRIORITY);
        let start = Instant::now();
        send.write_all(&seq.to_be_bytes()).await.map_err(|e| self.stream_err(e))?;
        let mut echo = [0u8; 8];
        recv.read_exact(&mut echo).await.map_err(|e| self.stream_err(e))?;
        let rtt = start.elapsed();
        let _ = send.finish();
        if u64::from_be_bytes(echo) != seq {
            return Err(self.stream_err(StreamFailure::PingMismatch));
        }
        Ok(rtt)
    }

    /// Closes the connection with a reason.
    pub fn close(&self, code: u32, reason: &str) {
        self.inner.connection.close(code.into(), reason.as_bytes());
    }

    fn conn_err(&self, source: quinn::ConnectionError) -> NodeError {
        NodeError::Connection { peer: self.inner.node_id, source }
    }

    fn stream_err(&self, source: impl Into<StreamFailure>) -> NodeError {
        NodeError::Stream { peer: self.inner.node_id, source: source.into() }
    }
}

/// Ping streams are sent before any stream of a transfer (which keep quinn's default, 0),
/// both ways: an echo queued behind megabytes of file data would look like a dead peer.
const PING_PRIORITY: i32 = 100;

/// Answers pings on one stream until the peer finishes it.
pub(crate) async fn answer_pings(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let _ = send.set_priority(PING_PRIORITY);
    let mut probe = [0u8; 8];
    while recv.read_exact(&mut probe).await.is_ok() {
        if send.write_all(&probe).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}
