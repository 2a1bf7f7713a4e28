//! `qpeer-tracker`: the rendezvous server qpeer nodes register with.

use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use qpeer_certs::{resolve_home, Identity};
use qpeer_tracker::{DhtConfig, Limits, ServerEvents, Tracker, TrackerConfig};
use tokio_util::sync::CancellationToken;

/// The qpeer tracker: nodes register with it over mutual TLS (QUIC, ALPN qpeer-tracker/1).
///
/// It tells each node the address it sees it at, keeps a directory of registered nodes, and
/// introduces two nodes so that both punch a hole at the same moment. When no hole can be
/// punched it relays their packets, which stay end-to-end encrypted between the two nodes:
/// the tracker can neither read nor alter them, and relays only between two nodes that both
/// asked for it. On start it prints the `[TRACKER] ID@IP:PORT` string that nodes
/// pass as `--tracker` (or QPEER_TRACKER).
///
/// Several trackers share the load and stand in for each other through the BitTorrent
/// Mainline DHT (--dht-listen, --dht-bootstrap, --dht public): each publishes the home records
/// its nodes sign and resolves other nodes' records, so that a node on one tracker reaches a
/// node on another by its NodeId alone. Without these options the tracker serves alone.
///
/// Exit codes: 0 stopped by SIGINT or SIGTERM, 1 failure (one line on stderr), 2 bad usage.
#[derive(Parser)]
#[command(name = "qpeer-tracker", version, about, long_about, after_help = EXAMPLES)]
struct Cli {
    /// UDP address to listen on. Default: [::]:4433 (IPv6 and IPv4) where the system has
    /// IPv6, else 0.0.0.0:4433. Use 127.0.0.1:0 for a random local port. Give it more than
    /// once to listen on several addresses with the same identity: nodes then measure how
    /// their NAT maps them (`qpeer netcheck`).
    #[arg(long, env = "QPEER_TRACKER_LISTEN", value_delimiter = ',')]
    listen: Vec<SocketAddr>,
    /// Home directory holding the tracker's identity key (default: $QPEER_HOME, else
    /// ~/.local/share/qpeer).
    #[arg(long, env = "QPEER_HOME")]
    home: Option<PathBuf>,
    /// PEM certificate chain issued by a CA, presented instead of the self-signed identity
    /// certificate (nodes then use --tracker-ca). Needs --key.
    #[arg(long, requires = "key", value_name = "FILE")]
    cert: Option<PathBuf>,
    /// PEM private key for --cert.
    #[arg(long, requires = "cert", value_name = "FILE")]
    key: Option<PathBuf>,
    /// Most nodes registered at once.
    #[arg(long, default_value_t = Limits::default().max_nodes)]
    max_nodes: usize,
    /// Largest control frame accepted, in bytes (at most 65536).
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u32).range(16..=65536))]
    max_frame_len: u32,
    /// Introductions one node may request per second (sustained).
    #[arg(long, default_value_t = Limits::default().introductions_per_sec)]
    introductions_per_sec: u32,
    /// Introductions one node may request in a burst.
    #[arg(long, default_value_t = Limits::default().introduction_burst)]
    introduction_burst: u32,
    /// Most simultaneous connections from one source IP.
    #[arg(long, default_value_t = Limits::default().max_connections_per_ip)]
    max_connections_per_ip: usize,
    /// Relay bytes per second one node may send through the tracker.
    #[arg(long, default_value_t = Limits::default().relay_bytes_per_sec)]
    relay_bytes_per_sec: u32,
    /// Relay packets per second one node may send through the tracker.
    #[arg(long, default_value_t = Limits::default().relay_packets_per_sec)]
    relay_packets_per_sec: u32,
    /// Seconds a new connection has to register before it is closed.
    #[arg(long, default_value_t = Limits::default().register_timeout.as_secs_f64(), value_parser = parse_seconds)]
    register_timeout: f64,
    /// Seconds a control frame may take to arrive once its first byte has.
    #[arg(long, default_value_t = Limits::default().partial_frame_timeout.as_secs_f64(), value_parser = parse_seconds)]
    frame_timeout: f64,
    /// Seconds without packets after which a node is dropped (nodes send keep-alives).
    #[arg(long, default_value_t = Limits::default().idle_timeout.as_secs())]
    idle_timeout: u64,
    /// Run a Mainline DHT node on this IPv4 UDP address (IP:PORT; port 0 picks one). With no
    /// --dht-bootstrap and no --dht public, this is the first node of a private DHT: other
    /// trackers join through it. Default, when another --dht option is given: 0.0.0.0:6881.
    #[arg(long, value_name = "ADDR", value_parser = parse_dht_addr)]
    dht_listen: Option<SocketAddrV4>,
    /// Join a DHT through these nodes only (IPv4 IP:PORT; repeat the flag or separate with
    /// commas), such as the other trackers' --dht-listen addresses: a private DHT.
    #[arg(long, value_name = "ADDR[,ADDR...]", value_delimiter = ',', value_parser = parse_dht_addr)]
    dht_bootstrap: Vec<SocketAddrV4>,
    /// `public`: join the public Mainline network through its well-known bootstrap nodes
    /// (and any --dht-bootstrap nodes too).
    #[arg(long, value_name = "NETWORK")]
    dht: Option<DhtNetwork>,
    /// DHT requests (publish, resolve) one node may make per second (sustained).
    #[arg(long, default_value_t = Limits::default().dht_requests_per_sec)]
    dht_requests_per_sec: u32,
    /// DHT requests one node may make in a burst.
    #[arg(long, default_value_t = Limits::default().dht_request_burst)]
    dht_request_burst: u32,
}

const EXAMPLES: &str = "Examples:
  qpeer-tracker                                   # [::]:4433, identity in ~/.local/share/qpeer
  qpeer-tracker --listen 0.0.0.0:4433 --home /var/lib/qpeer-tracker
  qpeer-tracker --listen 203.0.113.5:4433 --listen 203.0.113.6:4433   # NAT mapping checks
  qpeer-tracker --dht-listen 0.0.0.0:6881 --dht-bootstrap 198.51.100.7:6881";

/// A positive, finite number of seconds (at most an hour).
fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0 => Ok(seconds),
        _ => Err(format!("'{text}' is not a number of seconds above 0 and at most 3600")),
    }
}

/// An error and its causes on one line, leaving out a cause the text already says (the
/// library's errors include their source in their message).
fn describe(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// Which DHT `--dht` joins.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DhtNetwork {
    /// The public BitTorrent Mainline DHT.
    Public,
}

/// Where the DHT node listens when --dht-listen is not given.
const DEFAULT_DHT_LISTEN: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 6881);

/// An IPv4 socket address, with an error that says what is wanted.
fn parse_dht_addr(text: &str) -> Result<SocketAddrV4, String> {
    text.trim().parse().map_err(|_| {
        format!("'{text}' is not an IPv4 address and port such as 192.0.2.1:6881 (the DHT speaks IPv4 only)")
    })
}

/// The DHT configuration the --dht options ask for; `None` without any of them.
fn dht_config(
    listen: Option<SocketAddrV4>,
    bootstrap: Vec<SocketAddrV4>,
    network: Option<DhtNetwork>,
) -> Option<DhtConfig> {
    if listen.is_none() && bootstrap.is_empty() && network.is_none() {
        return None;
    }
    let listen = listen.unwrap_or(DEFAULT_DHT_LISTEN);
    Some(DhtConfig { listen, bootstrap, public: network == Some(DhtNetwork::Public) })
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // Usage errors: clap's message, exit 2.
    let cli = Cli::parse();
    // No `Error: ... Caused by:` chain and no backtrace, whatever RUST_BACKTRACE says.
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let home = resolve_home(cli.home.as_deref())?;
    let identity = Arc::new(Identity::load_or_create(&home)?);
    let certificate = match (&cli.cert, &cli.key) {
        (Some(cert), Some(key)) => {
            Some((qpeer_certs::config::load_certs(cert)?, qpeer_certs::config::load_private_key(key)?))
        }
        _ => None,
    };
    let limits = Limits {
        max_nodes: cli.max_nodes,
        max_frame_len: cli.max_frame_len as usize,
        introductions_per_sec: cli.introductions_per_sec,
        introduction_burst: cli.introduction_burst,
        max_connections_per_ip: cli.max_connections_per_ip,
        idle_timeout: Duration::from_secs(cli.idle_timeout.max(1)),
        register_timeout: Duration::from_secs_f64(cli.register_timeout.clamp(0.1, 3600.0)),
        partial_frame_timeout: Duration::from_secs_f64(cli.frame_timeout.clamp(0.1, 3600.0)),
        relay_bytes_per_sec: cli.relay_bytes_per_sec,
        relay_packets_per_sec: cli.relay_packets_per_sec,
        dht_requests_per_sec: cli.dht_requests_per_sec,
        dht_request_burst: cli.dht_request_burst,
    };
    let mut listen = cli.listen.into_iter();
    let mut config = TrackerConfig::new(listen.next().unwrap_or_else(default_listen), identity);
    config.extra_listen = listen.collect();
    config.certificate = certificate;
    config.limits = limits;
    config.console = true;
    config.dht = dht_config(cli.dht_listen, cli.dht_bootstrap, cli.dht);
    let mut tracker = Tracker::bind(config).context("the tracker cannot start")?;
    let events = tracker.events().context("the tracker keeps no console events")?;
    let stopped = CancellationToken::new();
    let console = tokio::spawn(print_events(events, stopped.clone()));
    tracker.run(shutdown_signal()).await;
    stopped.cancel();
    console.await.context("the console task failed")?;
    // Not println!: a closed stdout (the console's reader went away) must not panic the exit.
    let _ = writeln!(std::io::stdout(), "[STOPPED] tracker server stopped");
    Ok(())
}

/// Prints each event as its console line(s), flushed at once (readers follow stdout through
/// a pipe). Once `stopped` is cancelled, prints what is still queued and returns.
async fn print_events(mut events: ServerEvents, stopped: CancellationToken) {
    let mut text = String::new();
    loop {
        let event = tokio::select! {
            biased;
            event = events.recv() => event,
            () = stopped.cancelled() => {
                // No more events are taken; the queued ones still print, in order.
                events.close();
                events.recv().await
            }
        };
        let Some(event) = event else { break };
        text.clear();
        let _ = writeln!(text, "{event}");
        // Whatever else is queued goes out in the same write.
        while let Ok(event) = events.try_recv() {
            let _ = writeln!(text, "{event}");
        }
        // A full pipe blocks this thread only: the runtime moves other tasks off it. A closed
        // stdout (the reader went away) must not stop the tracker.
        tokio::task::block_in_place(|| {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(text.as_bytes());
            let _ = stdout.flush();
        });
    }
}

/// `[::]:4433` when an IPv6 socket can be opened (Linux makes it dual-stack by default),
/// else `0.0.0.0:4433`.
fn default_listen() -> SocketAddr {
    let dual: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, 0).into();
    if std::net::UdpSocket::bind(dual).is_ok() {
        (std::net::Ipv6Addr::UNSPECIFIED, 4433).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 4433).into()
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!("cannot listen for SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
