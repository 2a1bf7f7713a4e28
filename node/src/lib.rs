//! qpeer-node: a qpeer node. One quinn endpoint on one UDP socket talks to the tracker and,
//! through holes punched in both NATs, straight to other nodes over mutually authenticated
//! QUIC.
//!
//! # Layout
//! Public:
//! - [`node`]: [`Node`] and [`NodeBuilder`], the handle: starts the endpoint and the node's
//!   tasks, and asks sessions for connections.
//! - [`events`]: [`NodeEvent`]s, what the node tells its user (the library never prints).
//! - [`peer`]: [`PeerConnection`]: streams to a verified peer, ping.
//! - [`transfer`]: sending and receiving files and directories (BLAKE3-verified, resumable).
//! - [`error`]: typed errors ([`NodeError`] and its parts).
//! - [`records`]: home records, ours (published) and peers' (resolved, verified, cached).
//!
//! Inside (a newcomer's reading order):
//! - `shared`: what the node's tasks share, grouped by owner.
//! - `tracker_link`: chooses the home among the node's trackers, keeps it registered
//!   there (moving on when it dies) and routes what it says.
//! - `visits`: registrations at other nodes' home trackers, to meet peers living there.
//! - `registry` and `session`: one actor per peer (its connection, the handshake in
//!   progress, who waits), by NodeId.
//! - `streams`: handshakes to their session, a connection's streams by kind.
//! - `paths`: the path table: each session's virtual address and current best path.
//! - `socket`: `PathSocket`, the one UDP socket with the path layer inside.
//! - `prober`: sends and answers path probes, re-chooses paths.
//! - `relay_link`: queues to and from the trackers' relays, a slot per tracker connection.
//! - `transport`: QUIC settings of the endpoint and of peer connections.
//! - `window`: tunes each peer connection's receive window to what its path carries.
//! - [`congestion`]: the delivery-rate congestion controller of peer connections.
//! - `candidates`: which local addresses to register and which peer addresses to try.
//! - `known_trackers`: tracker ids trusted on first use.
//! - `home`: the lock that keeps one node per home.
//!
//! Wire formats are in the `qpeer-wire` crate; the `qpeer` binary (feature `cli`, on by
//! default) renders events as console lines. `examples/embed.rs` embeds a node.
//!
//! # Example
//! A tracker and two nodes in one process on loopback; `a` connects to `b` and pings it.
//! (Across machines, each node only needs the tracker's `ID@HOST:PORT`.)
//! ```
//! # #[tokio::main] async fn main() -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use qpeer_node::Node;
//!
//! let tracker_id = Arc::new(qpeer_certs::Identity::generate()?);
//! let tracker = qpeer_tracker::Tracker::bind(qpeer_tracker::TrackerConfig::new(
//!     "127.0.0.1:0".parse()?,
//!     tracker_id,
//! ))?;
//! let tracker_addr: qpeer_tracker::TrackerAddr = tracker.tracker_string().parse()?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let serving = tokio::spawn(tracker.run(async { let _ = stopped.await; }));
//!
//! let (home_a, home_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
//! let a = Node::builder().home(home_a.path()).bind_addr("127.0.0.1:0".parse()?)
//!     .tracker(tracker_addr.clone()).bind().await?;
//! let b = Node::builder().home(home_b.path()).bind_addr("127.0.0.1:0".parse()?)
//!     .tracker(tracker_addr).bind().await?;
//! a.registered(Duration::from_secs(10)).await?;
//! b.registered(Duration::from_secs(10)).await?;
//!
//! let conn = a.connect(b.id()).await?;
//! // The first packets may go through the relay; the session moves to the direct path as
//! // soon as a probe answers.
//! println!("{} rtt {:?}", conn.path(), conn.ping(1).await?);
//!
//! a.shutdown().await;
//! b.shutdown().await;
//! let _ = stop.send(());
//! serving.await?;
//! # Ok(()) }
//! ```

mod candidates;
pub mod congestion;
pub mod error;
pub mod events;
mod home;
mod known_trackers;
pub mod netcheck;
pub mod node;
mod paths;
pub mod peer;
mod prober;
pub mod records;
mod registry;
mod relay_link;
mod session;
mod shared;
mod socket;
mod streams;
mod tracker_link;
pub mod transfer;
mod transport;
mod visits;
mod window;

pub use error::NodeError;
pub use events::{Events, NodeEvent};
pub use home::LOCK_FILE;
pub use netcheck::NetReport;
pub use node::{AcceptHandle, Node, NodeBuilder, DEFAULT_CONNECT_TIMEOUT, SOCKET_BUFFER};
pub use paths::PeerPath;
pub use peer::PeerConnection;
pub use qpeer_wire::tracker::Mapping;
pub use records::RecordState;
pub use tracker_link::HomeTracker;
pub use transport::{Congestion, UnknownCongestion};

/// Random bytes that need not be secret (a probe's tx, a process's incarnation). The system
/// RNG does not fail on supported platforms; zeros would still be valid values.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    bytes
}
