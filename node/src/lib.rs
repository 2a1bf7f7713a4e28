//! qpeer-node: a qpeer node. One quinn endpoint on one UDP socket talks to the tracker and,
//! through holes punched in both NATs, straight to other nodes over mutually authenticated
//! QUIC.
//!
//! # Layout
//! - [`node`]: [`Node`] and [`NodeBuilder`]: the endpoint, tracker registration (with
//!   re-registration), introductions, punching, and the accept loop.
//! - [`peer`]: [`PeerConnection`], the node-to-node stream protocol (stream kinds, ping, close codes).
//! - [`transfer`]: sending and receiving files and directories (BLAKE3-verified, resumable).
//! - [`progress`]: progress bars / lines for transfers.
//! - [`candidates`]: which local addresses to register and which peer addresses to try.
//! - [`known_trackers`]: tracker ids trusted on first use.
//! - [`error`]: typed errors ([`NodeError`]).
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), qpeer_node::NodeError> {
//! use std::time::Duration;
//! let tracker = "5c3d…@198.51.100.1:4433".parse().expect("tracker address");
//! let node = qpeer_node::Node::builder().home("/tmp/qpeer-a").tracker(tracker).bind().await?;
//! node.registered(Duration::from_secs(10)).await?;
//! let peer = "0123…".parse().expect("peer id");
//! let conn = node.connect(peer).await?;
//! println!("{} rtt {:?}", conn.path(), conn.ping(1).await?);
//! node.shutdown().await;
//! # Ok(()) }
//! ```

pub mod candidates;
pub mod error;
pub mod known_trackers;
pub mod node;
pub mod peer;
pub mod progress;
pub mod transfer;

pub use error::NodeError;
pub use node::{Node, NodeBuilder};
pub use peer::{Path, PeerConnection};
