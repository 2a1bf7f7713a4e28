//! What the tracker reports as it runs ([`ServerEvent`]), for whoever embeds it: the
//! `qpeer-tracker` binary prints each one as a console line (its `Display` form). The library
//! itself prints nothing.

use std::fmt;
use std::net::SocketAddr;

use qpeer_certs::NodeId;
use qpeer_wire::io::describe_close;
use tokio::sync::mpsc;

/// One thing the tracker did that its operator sees. `Display` gives the console line(s),
/// in the words tests and users read.
#[derive(Debug, Clone)]
pub enum ServerEvent {
    /// `[STARTING]`: binding begins.
    Starting,
    /// `[LISTENING]`: the UDP socket is bound.
    Listening { addr: SocketAddr },
    /// `[TRACKER]`: what nodes pass as `--tracker`.
    Reachable { tracker: String },
    /// `[HINT]`: bound to the unspecified address, so the printed address is not one nodes
    /// can use.
    ListeningEverywhere { node_id: NodeId, port: u16 },
    /// `[NEW CONNECTION]` and `[ACTIVE CONNECTIONS]`: a node registered.
    Connected { remote: SocketAddr, node: NodeId, active: usize },
    /// `[DISCONNECTED]`, then `[ACTIVE CONNECTIONS]` when `active` is set: a registered
    /// node's connection ended. `active` is `None` when a newer connection of the same node
    /// had already replaced it (the node stays registered).
    Disconnected {
        remote: SocketAddr,
        node: NodeId,
        close: Option<quinn::ConnectionError>,
        active: Option<usize>,
    },
    /// `[RELAY] … opened`: `requester` asked last, so the link between it and `peer` opened.
    RelayOpened { requester: NodeId, peer: NodeId, link: u32 },
    /// `[RELAY] … closed`: an end of the link left.
    RelayClosed { a: NodeId, b: NodeId, link: u32, bytes_ab: u64, bytes_ba: u64 },
    /// `[MIGRATED]`: a node's connection now arrives from another address.
    Migrated { node: NodeId, now: SocketAddr, was: SocketAddr },
}

impl fmt::Display for ServerEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Starting => write!(f, "[STARTING] tracker server is starting..."),
            Self::Listening { addr } => write!(f, "[LISTENING] Server is listening on {addr}"),
            Self::Reachable { tracker } => write!(f, "[TRACKER] {tracker}"),
            Self::ListeningEverywhere { node_id, port } => write!(
                f,
                "[HINT] listening on every address: nodes use {node_id}@<this machine's public IP>:{port}"
            ),
            Self::Connected { remote, node, active } => write!(
                f,
                "[NEW CONNECTION] {remote} connected. node {}\n[ACTIVE CONNECTIONS] {active}",
                node.short()
            ),
            Self::Disconnected { remote, node, close, active } => {
                let reason = close.as_ref().map_or_else(|| "closed".into(), describe_close);
                write!(f, "[DISCONNECTED] {remote} node {} ({reason})", node.short())?;
                match active {
                    Some(active) => write!(f, "\n[ACTIVE CONNECTIONS] {active}"),
                    None => Ok(()),
                }
            }
            Self::RelayOpened { requester, peer, link } => {
                write!(f, "[RELAY] {} <-> {} opened (link {link})", requester.short(), peer.short())
            }
            Self::RelayClosed { a, b, link, bytes_ab, bytes_ba } => write!(
                f,
                "[RELAY] {} <-> {} closed (link {link}, {bytes_ab} + {bytes_ba} bytes relayed)",
                a.short(),
                b.short()
            ),
            Self::Migrated { node, now, was } => {
                write!(f, "[MIGRATED] node {} now at {now} (was {was})", node.short())
            }
        }
    }
}

/// The tracker's events in the order they happened (see [`crate::Tracker::events`]).
pub type ServerEvents = mpsc::UnboundedReceiver<ServerEvent>;

/// Where the tracker's parts send their events: nowhere, unless someone asked for them.
/// Unbounded, so that no part of the tracker ever waits for the reader, and none is lost.
#[derive(Debug, Clone, Default)]
pub(crate) struct EventSink(Option<mpsc::UnboundedSender<ServerEvent>>);

impl EventSink {
    /// A sink and the receiver of everything sent to it.
    pub(crate) fn channel() -> (Self, ServerEvents) {
        let (sender, receiver) = mpsc::unbounded_channel();
        (Self(Some(sender)), receiver)
    }

    pub(crate) fn emit(&self, event: ServerEvent) {
        if let Some(sender) = &self.0 {
            // The receiver went away: nobody is reading, which is allowed.
            let _ = sender.send(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_lines_read_as_before() {
        let node = NodeId::from_bytes([0xab; 32]);
        let remote: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        let short = node.short();
        assert_eq!(
            ServerEvent::Connected { remote, node, active: 3 }.to_string(),
            format!("[NEW CONNECTION] 127.0.0.1:5000 connected. node {short}\n[ACTIVE CONNECTIONS] 3")
        );
        assert_eq!(
            ServerEvent::Disconnected { remote, node, close: None, active: Some(2) }.to_string(),
            format!("[DISCONNECTED] 127.0.0.1:5000 node {short} (closed)\n[ACTIVE CONNECTIONS] 2")
        );
        assert_eq!(
            ServerEvent::Disconnected {
                remote,
                node,
                close: Some(quinn::ConnectionError::TimedOut),
                active: None
            }
            .to_string(),
            format!("[DISCONNECTED] 127.0.0.1:5000 node {short} (timed out)")
        );
        assert_eq!(
            ServerEvent::RelayClosed { a: node, b: node, link: 9, bytes_ab: 1, bytes_ba: 2 }.to_string(),
            format!("[RELAY] {short} <-> {short} closed (link 9, 1 + 2 bytes relayed)")
        );
    }

    #[test]
    fn a_sink_without_a_reader_drops_quietly_and_one_with_keeps_order() {
        EventSink::default().emit(ServerEvent::Starting);
        let (sink, mut events) = EventSink::channel();
        sink.emit(ServerEvent::Starting);
        sink.emit(ServerEvent::Reachable { tracker: "x".into() });
        assert!(matches!(events.try_recv(), Ok(ServerEvent::Starting)));
        assert!(matches!(events.try_recv(), Ok(ServerEvent::Reachable { .. })));
        drop(events);
        sink.emit(ServerEvent::Starting);
    }
}
