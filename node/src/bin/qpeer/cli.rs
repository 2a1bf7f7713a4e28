//! The command line: what `qpeer` accepts and its `--help` text.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
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
/// 4 `status` found no node running, 130 stopped by SIGINT (Ctrl-C), 143 stopped by SIGTERM.
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
    /// Congestion controller of peer connections: rate (default: qpeer's delivery-rate
    /// model; keeps long, lossy paths full with at most one path's worth of queue), bbr
    /// (quinn's BBR) or cubic (backs off at every loss; gentler to other traffic on a
    /// shared link).
    #[arg(long, global = true, value_name = "rate|bbr|cubic")]
    pub congestion: Option<qpeer_node::Congestion>,
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
        /// Accept files from this peer (repeatable): a NodeId, a local alias, a name
        /// registered with the tracker, or a unique id prefix of 6+ hex characters (as for
        /// `send`).
        #[arg(long, value_name = "PEER")]
        accept_from: Vec<String>,
    },
    /// Send files and directories to a peer; exits 0 only when the peer verified every file.
    ///
    /// Run the same command again after an interruption to resume: each file continues from
    /// what the receiver already holds.
    Send {
        #[command(flatten)]
        node: NodeOpts,
        /// The peer: its NodeId, a local alias (`qpeer alias`), a name it registered with
        /// (`--name`, as `qpeer peers` lists), or a unique prefix of its NodeId of at least 6
        /// hex characters. Tried in that order: full id, alias, tracker name, id prefix; a name
        /// or prefix that fits more than one node is refused, listing them (exit 2).
        peer: String,
        /// Files and directories to send.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Print only the result.
        #[arg(long, short = 'q')]
        quiet: bool,
        /// Print one JSON summary object at the end instead of text (no progress): files,
        /// total_bytes, sent_bytes, elapsed_s, rate_bytes_per_s, ok, error.
        #[arg(long)]
        json: bool,
    },
    /// List the nodes registered with the tracker, one per line, id first, with name,
    /// registration time and local aliases.
    Peers {
        #[command(flatten)]
        node: NodeOpts,
        /// Print one JSON array of {id, name, aliases, registered_at, registered, self}.
        #[arg(long)]
        json: bool,
    },
    /// Connect to a peer and measure round trips; each reply says which path it took.
    Ping {
        #[command(flatten)]
        node: NodeOpts,
        /// The peer: its NodeId, a local alias (`qpeer alias`), a name it registered with
        /// (`--name`, as `qpeer peers` lists), or a unique prefix of its NodeId of at least 6
        /// hex characters. Tried in that order: full id, alias, tracker name, id prefix; a name
        /// or prefix that fits more than one node is refused, listing them (exit 2).
        peer: String,
        /// Number of pings (at least 1).
        #[arg(long, short = 'c', default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
        count: u32,
        /// Seconds between pings (0 to 3600; fractions such as 0.2 allowed).
        #[arg(long, short = 'i', default_value_t = 1.0, value_parser = parse_interval)]
        interval: f64,
        /// Print JSON, one object per line: {"type":"reply",...} per reply, then
        /// {"type":"summary",...}.
        #[arg(long)]
        json: bool,
    },
    /// Local names for peers, kept in HOME/aliases: `qpeer alias` lists them, `qpeer alias
    /// NAME ID` adds one (an existing name is replaced only with --force), `qpeer alias
    /// --remove NAME` removes one. An alias works wherever a peer is named (`send`, `ping`,
    /// `--accept-from`).
    Alias {
        /// Home directory (default: $QPEER_HOME, else ~/.local/share/qpeer).
        #[arg(long, env = "QPEER_HOME")]
        home: Option<PathBuf>,
        /// The alias (not 6+ hex characters, which would read as an id prefix).
        #[arg(requires = "id")]
        name: Option<String>,
        /// The peer's full NodeId (or another alias).
        id: Option<String>,
        /// Replace an existing alias of that name.
        #[arg(long, requires = "name")]
        force: bool,
        /// Remove this alias.
        #[arg(long, value_name = "NAME", conflicts_with_all = ["name", "id", "force"])]
        remove: Option<String>,
    },
    /// Show whether a node runs on this home: its NodeId, tracker, observed address, peers
    /// with path and RTT, and transfers both ways with bytes so far (a one-shot `qpeer send`
    /// running a node of its own is shown too). Exits 4 when nothing runs.
    Status {
        /// Home directory (default: $QPEER_HOME, else ~/.local/share/qpeer).
        #[arg(long, env = "QPEER_HOME")]
        home: Option<PathBuf>,
        /// Print one JSON object: state ("listening", "one-shot" or "not running"), id, home,
        /// tracker, observed, peers [{id, path, direct, rtt_ms, path_age_s}], transfers
        /// [{direction, peer, done_bytes, total_bytes, sent_now_bytes, files_done, files, ...}].
        #[arg(long)]
        json: bool,
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
    /// Print a shell completion script for bash, zsh or fish on stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the qpeer(1) man page (roff) on stdout, or write every page into a directory.
    Man {
        /// Write qpeer.1 and qpeer-<command>.1 into this directory instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// Seconds between pings: a finite number from 0 to 3600.
fn parse_interval(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && (0.0..=3600.0).contains(&seconds) => Ok(seconds),
        _ => Err(format!("'{text}' is not a number of seconds from 0 to 3600")),
    }
}
