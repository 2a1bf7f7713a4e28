//! What the tracker reports as it runs ([`ServerEvent`]), for whoever embeds it: the
//! `qpeer-tracker` binary prints each one as a console line (its `Display` form). The library
//! itself prints nothing.

use std::fmt;
use std::net::{SocketAddr, SocketAddrV4};

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
    /// `[NEW CONNECTION]` and `[ACTIVE CONNECTIONS]`: a node registered. A `visitor` (its
    /// home is another tracker) is marked `(visitor)` on the line.
    Connected { remote: SocketAddr, node: NodeId, active: usize, visitor: bool },
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
    /// `[DHT] listening on ADDR (bootstrap: A, B | none | public)`: the DHT node started.
    DhtListening { addr: SocketAddrV4, bootstrap: Vec<SocketAddrV4>, public: bool },
    /// `[PUBLISHED] <node> seq N on K DHT nodes`: a node's home record is in the DHT;
    /// `stored_on` DHT nodes acknowledged storing it.
    Published { node: NodeId, seq: i64, stored_on: u32 },
    /// `[PUBLISH REFUSED] <node>: <reason>`: a record was refused, or the DHT did not take it.
    PublishRefused { node: NodeId, reason: String },
    /// `[RESOLVED] <node> → tracker <tracker> seq N`, or `[RESOLVED] <node>: no record`.
    Resolved { node: NodeId, found: Option<ResolvedRecord> },
}

/// What a resolved record said, for the console line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedRecord {
    pub seq: i64,
    /// The home tracker it names; `None` when its value does not decode (the asker, which
    /// verifies records, drops it).
    pub tracker: Option<NodeId>,
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
            Self::Connected { remote, node, active, visitor } => write!(
                f,
                "[NEW CONNECTION] {remote} connected. node {}{}\n[ACTIVE CONNECTIONS] {active}",
                node.short(),
                if *visitor { " (visitor)" } else { "" }
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
            Self::DhtListening { addr, bootstrap, public } => {
                let nodes: Vec<String> = bootstrap.iter().map(ToString::to_string).collect();
                let via = match (public, nodes.is_empty()) {
                    (true, true) => "public".to_string(),
                    (true, false) => format!("public, {}", nodes.join(", ")),
                    (false, true) => "none".to_string(),
                    (false, false) => nodes.join(", "),
                };
                write!(f, "[DHT] listening on {addr} (bootstrap: {via})")
            }
            Self::Published { node, seq, stored_on } => {
                write!(f, "[PUBLISHED] {} seq {seq} on {stored_on} DHT nodes", node.short())
            }
            Self::PublishRefused { node, reason } => {
                write!(f, "[PUBLISH REFUSED] {}: {reason}", node.short())
            }
            Self::Resolved { node, found: None } => write!(f, "[RESOLVED] {}: no record", node.short()),
            Self::Resolved { node, found: Some(ResolvedRecord { seq, tracker: Some(tracker) }) } => {
                write!(f, "[RESOLVED] {} \u{2192} tracker {} seq {seq}", node.short(), tracker.short())
            }
            Self::Resolved { node, found: Some(ResolvedRecord { seq, tracker: None }) } => {
                write!(f, "[RESOLVED] {}: seq {seq}, a record that does not decode", node.short())
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
            ServerEvent::Connected { remote, node, active: 3, visitor: false }.to_string(),
            format!("[NEW CONNECTION] 127.0.0.1:5000 connected. node {short}\n[ACTIVE CONNECTIONS] 3")
        );
        assert_eq!(
            ServerEvent::Connected { remote, node, active: 3, visitor: true }.to_string(),
            format!(
                "[NEW CONNECTION] 127.0.0.1:5000 connected. node {short} (visitor)\n[ACTIVE CONNECTIONS] 3"
            )
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
    fn dht_lines() {
        let node = NodeId::from_bytes([0xab; 32]);
        let tracker = NodeId::from_bytes([0xcd; 32]);
        let (n, t) = (node.short(), tracker.short());
        let addr: SocketAddrV4 = "127.0.0.1:6881".parse().expect("addr");
        let other: SocketAddrV4 = "127.0.0.1:6882".parse().expect("addr");
        let listening =
            |bootstrap: Vec<SocketAddrV4>, public| ServerEvent::DhtListening { addr, bootstrap, public };
        assert_eq!(
            listening(vec![other, other], false).to_string(),
            "[DHT] listening on 127.0.0.1:6881 (bootstrap: 127.0.0.1:6882, 127.0.0.1:6882)"
        );
        assert_eq!(
            listening(vec![], false).to_string(),
            "[DHT] listening on 127.0.0.1:6881 (bootstrap: none)"
        );
        assert_eq!(
            listening(vec![], true).to_string(),
            "[DHT] listening on 127.0.0.1:6881 (bootstrap: public)"
        );
        assert_eq!(
            ServerEvent::Published { node, seq: 7, stored_on: 3 }.to_string(),
            format!("[PUBLISHED] {n} seq 7 on 3 DHT nodes")
        );
        assert_eq!(
            ServerEvent::PublishRefused { node, reason: "stale".into() }.to_string(),
            format!("[PUBLISH REFUSED] {n}: stale")
        );
        let found = ResolvedRecord { seq: 7, tracker: Some(tracker) };
        assert_eq!(
            ServerEvent::Resolved { node, found: Some(found) }.to_string(),
            format!("[RESOLVED] {n} \u{2192} tracker {t} seq 7")
        );
        assert_eq!(
            ServerEvent::Resolved { node, found: None }.to_string(),
            format!("[RESOLVED] {n}: no record")
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
