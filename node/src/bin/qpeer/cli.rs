//! The command line: what `qpeer` accepts and its `--help` text.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use qpeer_certs::NodeId;
use qpeer_tracker::TrackerAddr;

/// qpeer: direct, end-to-end encrypted QUIC connections between machines behind home NATs.
///
/// A node registers with a tracker (`--tracker` / QPEER_TRACKER), which tells it its public
/// address and introduces it to other nodes; both then probe each other through their NATs
/// and talk over mutually authenticated QUIC. A connection starts at once, through the
/// tracker's relay if no direct path answers yet, and moves to a direct path as soon as a
/// signed probe gets through; it stays up while NATs rebind or networks change
/// (`[PATH]` lines say when its path changes). A node's id is its Ed25519 public key, kept
/// in its home directory (`--home` / QPEER_HOME, default ~/.local/share/qpeer).
///
/// One node runs per home (it holds HOME/node.lock). While `qpeer listen` runs, `qpeer send`,
/// `ping`, `peers` and `status` on the same home run inside it through its control socket
/// (HOME/node.sock), so the identity never registers twice.
///
/// Exit codes: 0 success, 1 failure (the reason is printed on stderr), 2 bad usage,
/// 3 `listen` stopped because the same NodeId registered from another process,
/// 4 `status` found no node running.
#[derive(Parser)]
#[command(version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone)]
pub struct NodeOpts {
    /// Home directory holding the identity key and known_trackers.
    #[arg(long, env = "QPEER_HOME", global = true)]
    pub home: Option<PathBuf>,
    /// Tracker: ID@HOST:PORT (pinned id, as printed by qpeer-tracker), HOST:PORT with
    /// --tracker-ca, or HOST:PORT alone (trust on first use, saved in HOME/known_trackers).
    /// Repeat it (or give QPEER_TRACKER a comma-separated list) for several trackers: the node
    /// registers with the fastest (ties: the first given) and moves to the next when it dies;
    /// peers on any tracker of a shared DHT are found by NodeId.
    #[arg(long, env = "QPEER_TRACKER", global = true, value_delimiter = ',', value_name = "TRACKER")]
    pub tracker: Vec<TrackerAddr>,
    /// Verify a HOST:PORT tracker's certificate against this CA (PEM) instead of its id.
    #[arg(long, value_name = "FILE", global = true)]
    pub tracker_ca: Option<PathBuf>,
    /// UDP address of the node's single socket. Default: [::]:0 dual-stack (IPv6 and IPv4),
    /// or 0.0.0.0:0 where the system has no IPv6.
    #[arg(long, global = true)]
    pub bind: Option<SocketAddr>,
    /// Name shown to other nodes in `qpeer peers`.
    #[arg(long, global = true)]
    pub name: Option<String>,
    /// Never connect directly: always go through the tracker's relay (end-to-end encrypted
    /// all the same). For networks that block direct UDP between peers, and for testing.
    #[arg(long, global = true, conflicts_with = "no_relay")]
    pub relay_only: bool,
    /// Never use the tracker's relay: reach peers directly or not at all (a peer behind a
    /// symmetric NAT may then be unreachable).
    #[arg(long, global = true)]
    pub no_relay: bool,
    /// Seconds to wait for registration with the tracker.
    #[arg(long, default_value_t = 10, global = true)]
    pub register_timeout: u64,
}

#[derive(Subcommand)]
pub enum Command {
    /// Print this node's NodeId (creating the identity on first use); the id is the last line.
    Id {
        #[command(flatten)]
        node: NodeOpts,
    },
    /// Register with the tracker, answer pings and receive files until Ctrl-C.
    ///
    /// Files arrive as DIR/<name>, directories as DIR/<name>/... . Each file is written to
    /// <name>.part, checked against the sender's BLAKE3 hash, and moved into place; an existing
    /// file is never overwritten (the sender is told). Only senders named with --accept-from or
    /// in HOME/allowlist (one NodeId per line) may send, unless --accept-any.
    Listen {
        #[command(flatten)]
        node: NodeOpts,
        /// Directory where received files are written (created if missing). Without it, file
        /// offers are refused.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Accept files from any node.
        #[arg(long, conflicts_with = "accept_from")]
        accept_any: bool,
        /// Accept files from this NodeId (repeatable).
        #[arg(long, value_name = "ID")]
        accept_from: Vec<NodeId>,
    },
    /// Send files and directories to a peer; exits 0 only when the peer verified every file.
    ///
    /// Run the same command again after an interruption to resume: each file continues from
    /// what the receiver already holds.
    Send {
        #[command(flatten)]
        node: NodeOpts,
        /// The receiving peer's NodeId.
        peer: NodeId,
        /// Files and directories to send.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Print only the result.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// List the nodes registered with the tracker, one per line, id first.
    Peers {
        #[command(flatten)]
        node: NodeOpts,
    },
    /// Connect to a peer and measure round trips; each reply says which path it took.
    Ping {
        #[command(flatten)]
        node: NodeOpts,
        /// The peer's NodeId.
        peer: NodeId,
        /// Number of pings.
        #[arg(long, short = 'c', default_value_t = 4)]
        count: u32,
        /// Seconds between pings.
        #[arg(long, short = 'i', default_value_t = 1.0)]
        interval: f64,
    },
    /// Show whether a node runs on this home: its NodeId, tracker, observed address, peers
    /// with path and RTT, and transfers in progress. Exits 4 when no node runs.
    Status {
        /// Home directory (default: $QPEER_HOME, else ~/.local/share/qpeer).
        #[arg(long, env = "QPEER_HOME")]
        home: Option<PathBuf>,
    },
    /// What kind of network this machine is on: whether UDP reaches the tracker, how the NAT
    /// maps the node's socket (measured at two tracker addresses), public addresses, RTT to
    /// the tracker, whether its relay answers, and what to expect of connections to peers.
    /// Runs on a throwaway identity, so a running `qpeer listen` on the home is not disturbed.
    Netcheck {
        #[command(flatten)]
        node: NodeOpts,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run the whole thing locally: a tracker and two nodes on 127.0.0.1 with throwaway
    /// identities; alice sends bob a generated 64 MiB file, which bob verifies by BLAKE3.
    Demo,
}
