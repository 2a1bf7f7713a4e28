//! qpeer-tracker: the QUIC rendezvous server nodes register with, its wire protocol, and
//! the client nodes use to talk to it.
//!
//! # Layout
//! - [`directory`]: the registered nodes, their addresses, and per-node rate limits.
//! - [`server`]: [`server::Tracker`]: accept loop, per-connection tasks, introductions, shutdown.
//! - [`client`]: [`client::TrackerClient`], used by nodes over their own quinn endpoint.
//! - [`addr`]: the `ID@HOST:PORT` tracker address form.

pub mod addr;
pub mod client;
pub mod directory;
pub mod server;

pub use addr::TrackerAddr;
pub use client::{ClientError, TrackerClient, TrackerEvent};
pub use server::{Limits, Tracker, TrackerConfig};
