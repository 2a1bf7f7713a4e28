//! qpeer-tracker: the QUIC rendezvous server nodes register with, its wire protocol, and
//! the client nodes use to talk to it.
//!
//! # Layout
//! - [`proto`]: wire types (frames, close codes, limits); pure data.
//! - [`codec`]: length-prefixed bincode framing and a bounded pull decoder; no I/O.
//! - [`stream`]: reading/writing frames on quinn streams, with timeouts for half-sent frames.
//! - [`directory`]: the registered nodes, their addresses, and per-node rate limits.
//! - [`server`]: [`server::Tracker`]: accept loop, per-connection tasks, introductions, shutdown.
//! - [`client`]: [`client::TrackerClient`], used by nodes over their own quinn endpoint.
//! - [`relay`]: relay stream framing (link id + length + opaque packet).
//! - [`addr`]: the `ID@HOST:PORT` tracker address form.

pub mod addr;
pub mod client;
pub mod codec;
pub mod directory;
pub mod proto;
pub mod relay;
pub mod server;
pub mod stream;

pub use addr::TrackerAddr;
pub use client::{ClientError, TrackerClient, TrackerEvent};
pub use server::{Limits, Tracker, TrackerConfig};
