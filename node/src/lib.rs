//! qpeer-node: a qpeer node. One quinn endpoint on one UDP socket talks to the tracker and,
//! through holes punched in both NATs, straight to other nodes over mutually authenticated
//! QUIC.
//!
//! # Layout
//! - [`node`]: [`Node`] and [`NodeBuilder`]: the public handle; the endpoint, tracker
//!   registration (with re-registration), and routing of introductions and handshakes to
//!   sessions.
//! - [`session`]: one actor per peer: its connection, the handshake in progress, who waits.
//! - [`paths`]: the path table: each session's virtual address and current best path.
//! - [`socket`]: [`socket::PathSocket`], the one UDP socket with the path layer inside.
//! - [`prober`]: sends and answers path probes, re-chooses paths.
//! - [`relay`]: queues to and from the tracker's relay.
//! - [`peer`]: [`PeerConnection`], the node-to-node stream protocol (stream kinds, ping, close codes).
//! - [`transfer`]: sending and receiving files and directories (BLAKE3-verified, resumable).
//! - [`progress`]: progress bars / lines for transfers.
//! - [`candidates`]: which local addresses to register and which peer addresses to try.
//! - [`known_trackers`]: tracker ids trusted on first use.
//! - [`error`]: typed errors ([`NodeError`]).
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

pub mod candidates;
pub mod commands;
pub mod control;
pub mod error;
pub mod events;
pub mod known_trackers;
pub mod node;
pub mod paths;
pub mod peer;
pub mod prober;
pub mod progress;
pub mod relay;
pub mod session;
pub mod socket;
pub mod transfer;

pub use error::NodeError;
pub use events::{Events, NodeEvent};
pub use node::{Node, NodeBuilder};
pub use paths::PeerPath;
pub use peer::PeerConnection;

/// Random bytes that need not be secret (a probe's tx, a process's incarnation). The system
/// RNG does not fail on supported platforms; zeros would still be valid values.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    bytes
}

/// Locks a mutex, taking the data back if a panic poisoned it: every lock here guards state
/// that stays consistent between statements.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
