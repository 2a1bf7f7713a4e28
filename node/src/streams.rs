//! What arrives at the endpoint: handshakes, handed to the session of their virtual address,
//! and the streams of a connection, by kind.

use std::sync::Arc;

use qpeer_wire::close_code;
use qpeer_wire::peer::StreamKind;
use tokio::sync::mpsc;

use crate::peer::{answer_pings, PeerConnection};
use crate::session::Command;
use crate::shared::Shared;

/// Hands each handshake to the session of its virtual address; refuses any other.
pub(crate) async fn accept_handshakes(shared: Arc<Shared>) {
    loop {
        let incoming = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            incoming = shared.endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { return };
        let peer = shared.table.lock().peer_at(incoming.remote_address());
        let Some(handle) = peer.and_then(|peer| shared.sessions.get(&peer)) else {
            tracing::debug!(remote = %incoming.remote_address(), "refusing a handshake from outside any session");
            incoming.refuse();
            continue;
        };
        // Only a peer with a session gets this far (the path layer hides strangers from
        // quinn); a session that is not keeping up refuses.
        if let Err(mpsc::error::TrySendError::Full(Command::Incoming(incoming))) =
            handle.inbox.try_send(Command::Incoming(Box::new(incoming)))
        {
            incoming.refuse();
        }
    }
}

/// Serves the peer's streams until the connection closes; the reason it closed. The node
/// answers pings itself and offers transfer streams to the application. Each stream's kind
/// is read in a task of its own: a stream whose first packet was lost must not hold up the
/// streams behind it (a tree of small files opens hundreds at once).
pub(crate) async fn serve_streams(shared: Arc<Shared>, conn: PeerConnection) -> quinn::ConnectionError {
    let connection = conn.connection().clone();
    loop {
        let (send, recv) = match connection.accept_bi().await {
            Ok(streams) => streams,
            Err(e) => return e,
        };
        let (cancel, conn) = (shared.cancel.clone(), conn.clone());
        shared.tasks.spawn(async move {
            tokio::select! {
                _ = dispatch(conn, send, recv) => {}
                _ = cancel.cancelled() => {}
            }
        });
    }
}

/// Reads a stream's kind and hands it to whoever serves that kind.
async fn dispatch(conn: PeerConnection, send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let mut kind = [0u8; 1];
    if recv.read_exact(&mut kind).await.is_err() {
        return;
    }
    match StreamKind::from_byte(kind[0]) {
        // A peer may hold a ping stream open: the select in `serve_streams` ends it at
        // shutdown.
        Some(StreamKind::Ping) => answer_pings(send, recv).await,
        Some(kind @ (StreamKind::Transfer | StreamKind::FileData)) => {
            if !conn.offer_stream((kind, send, recv)) {
                tracing::debug!(peer = %conn.node_id().short(), "no one accepts application streams");
            }
        }
        _ => {
            conn.connection().close(close_code::PEER_PROTOCOL_VIOLATION.into(), b"unknown stream kind");
        }
    }
}
