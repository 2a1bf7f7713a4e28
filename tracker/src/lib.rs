//! qpeer-tracker: the QUIC rendezvous server nodes register with, and the client nodes use
//! to talk to it. The wire protocol itself lives in `qpeer-wire`.
//!
//! # Layout
//! - [`server`]: [`Tracker`] and [`TrackerConfig`]: bind, the accept loop (an address over
//!   its connection limit is refused before TLS), `run(shutdown)`, counters.
//! - `sessions`: one node's connection task: `Register`, the request loop, introductions and
//!   relay requests, migrations, leaving.
//! - `registry`: the registered nodes as sessions share them (directory, session handles,
//!   rendezvous state) under one lock.
//! - [`directory`]: pure state: registered nodes, their addresses and names.
//! - `rendezvous`: pure state: recent introductions and relay requests.
//! - `relay`: relay links and per-node queues, owned by the relay; each node's
//!   `RelayClient` (reader and writer) runs on its own session.
//! - [`dht`]: [`DhtConfig`] and the tracker's Mainline DHT node (the `mainline` crate), which
//!   publishes and resolves the nodes' signed home records as BEP 44 mutable items.
//! - [`limits`]: [`Limits`], per-address connection counts, token buckets.
//! - [`events`]: [`ServerEvent`], what the tracker reports; the binary prints them.
//! - [`client`]: [`TrackerClient`], used by nodes over their own quinn endpoint.
//! - [`addr`]: the `ID@HOST:PORT` tracker address form.
//!
//! Tasks: the accept loop owns one task per connection (in the server's `TaskTracker`,
//! cancelled on shutdown); a session owns its control-stream writer task, and serves its
//! relay streams and migration checks inside its own task. A session's DHT requests
//! (publish, resolve) run as tasks in the server's `TaskTracker`, cancelled when the session
//! ends; the DHT itself runs on mainline's own thread, which stops when the tracker is dropped.

pub mod addr;
pub mod client;
pub mod dht;
pub mod directory;
pub mod events;
pub mod limits;
mod registry;
mod relay;
mod rendezvous;
pub mod server;
mod sessions;

pub use addr::TrackerAddr;
pub use client::{ClientError, TrackerClient, TrackerEvent};
pub use dht::DhtConfig;
pub use events::{ServerEvent, ServerEvents};
pub use limits::Limits;
pub use server::{Tracker, TrackerConfig, TrackerError};
