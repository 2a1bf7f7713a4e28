//! The real `qpeer-tracker` binary prints its console lines in the documented order.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use qpeer_certs::config::PINNED_SERVER_NAME;
use qpeer_certs::{Identity, ServerTrust};
use qpeer_tracker::client::RegisterInfo;
use qpeer_tracker::{TrackerAddr, TrackerClient};

struct Tracker {
    child: Child,
    lines: mpsc::Receiver<String>,
    _home: tempfile::TempDir,
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Tracker {
    fn start() -> Self {
        Self::start_on(&["127.0.0.1:0"])
    }

    /// A tracker with one `--listen` per address.
    fn start_on(listen: &[&str]) -> Self {
        Self::start_with(listen, &[])
    }

    /// A tracker with one `--listen` per address and `args` after them.
    fn start_with(listen: &[&str], args: &[&str]) -> Self {
        let home = tempfile::tempdir().expect("home");
        let mut child = Command::new(env!("CARGO_BIN_EXE_qpeer-tracker"))
            .args(listen.iter().flat_map(|addr| ["--listen", addr]))
            .args(args)
            .arg("--home")
            .arg(home.path())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn qpeer-tracker");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines, _home: home }
    }

    fn next_line(&self) -> String {
        self.lines.recv_timeout(Duration::from_secs(10)).expect("a console line within 10 s")
    }

    /// The next `[LISTENING] Server is listening on ADDR` line and the `[TRACKER]` line after
    /// it, which must name the same port.
    fn listening(&self) -> (SocketAddr, TrackerAddr) {
        let listening = self.next_line();
        let bound: SocketAddr = listening
            .strip_prefix("[LISTENING] Server is listening on ")
            .unwrap_or_else(|| panic!("unexpected line {listening:?}"))
            .parse()
            .expect("a socket address");
        let tracker_line = self.next_line();
        let tracker_addr: TrackerAddr = tracker_line
            .strip_prefix("[TRACKER] ")
            .unwrap_or_else(|| panic!("unexpected line {tracker_line:?}"))
            .parse()
            .expect("ID@IP:PORT");
        assert_eq!(tracker_addr.port, bound.port());
        (bound, tracker_addr)
    }
}

#[tokio::test]
async fn console_lines_follow_the_documented_order() {
    let tracker = Tracker::start();
    assert_eq!(tracker.next_line(), "[STARTING] tracker server is starting...");
    let (bound, tracker_addr) = tracker.listening();
    assert_eq!(bound.ip(), Ipv4Addr::LOCALHOST);
    assert_ne!(bound.port(), 0, "the actually bound port is printed");
    let tracker_id = tracker_addr.node_id.expect("pinned form");

    let endpoint = quinn::Endpoint::client((Ipv4Addr::LOCALHOST, 0).into()).expect("endpoint");
    let identity = Identity::generate().expect("identity");
    let (client, _intros) = TrackerClient::connect(
        &endpoint,
        &identity,
        bound,
        PINNED_SERVER_NAME,
        &ServerTrust::Pinned(tracker_id),
        RegisterInfo::default(),
    )
    .await
    .expect("register");
    let local = endpoint.local_addr().expect("local");
    assert_eq!(
        tracker.next_line(),
        format!("[NEW CONNECTION] {local} connected. node {}", identity.node_id().short())
    );
    assert_eq!(tracker.next_line(), "[ACTIVE CONNECTIONS] 1");
    client.close().await;
    let disconnected = tracker.next_line();
    assert!(
        disconnected.starts_with(&format!("[DISCONNECTED] {local} node {} (", identity.node_id().short())),
        "{disconnected}"
    );
    assert_eq!(tracker.next_line(), "[ACTIVE CONNECTIONS] 0");

    // SIGTERM: a clean stop with exit code 0.
    let mut tracker = tracker;
    let pid = tracker.child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(status.success());
    let exit = tracker.child.wait().expect("wait");
    assert_eq!(exit.code(), Some(0), "a SIGTERM'd tracker exits 0");
    assert_eq!(tracker.next_line(), "[STOPPED] tracker server stopped");
}

#[test]
fn each_listen_address_gets_its_lines() {
    let tracker = Tracker::start_on(&["127.0.0.1:0", "127.0.0.2:0"]);
    assert_eq!(tracker.next_line(), "[STARTING] tracker server is starting...");
    let mut ids = Vec::new();
    for ip in [Ipv4Addr::LOCALHOST, Ipv4Addr::new(127, 0, 0, 2)] {
        let (bound, addr) = tracker.listening();
        assert_eq!(bound.ip(), ip);
        ids.push(addr.node_id.expect("pinned form"));
    }
    assert_eq!(ids[0], ids[1], "the same identity on every address");
}

#[test]
fn dht_options_print_the_dht_line() {
    // The first node of a private DHT: it contacts nobody.
    let first = Tracker::start_with(&["127.0.0.1:0"], &["--dht-listen", "127.0.0.1:0"]);
    assert_eq!(first.next_line(), "[STARTING] tracker server is starting...");
    first.listening();
    let line = first.next_line();
    let addr = line
        .strip_prefix("[DHT] listening on ")
        .and_then(|rest| rest.strip_suffix(" (bootstrap: none)"))
        .unwrap_or_else(|| panic!("unexpected line {line:?}"));
    let addr: std::net::SocketAddrV4 = addr.parse().expect("the DHT's address");
    assert_ne!(addr.port(), 0, "the actually bound port is printed");

    // Joining through it (repeated and comma-separated flags).
    let seed = addr.to_string();
    let both = format!("{seed},{seed}");
    let args = ["--dht-listen", "127.0.0.1:0", "--dht-bootstrap", &both, "--dht-bootstrap", &seed];
    let second = Tracker::start_with(&["127.0.0.1:0"], &args);
    second.next_line();
    second.listening();
    let line = second.next_line();
    assert!(line.ends_with(&format!("(bootstrap: {seed}, {seed}, {seed})")), "{line}");
}

#[test]
fn bad_dht_options_fail_with_one_clear_line() {
    for args in [
        &["--dht-listen", "[::1]:6881"][..],
        &["--dht-listen", "127.0.0.1"],
        &["--dht-bootstrap", "127.0.0.1:1,nowhere"],
        &["--dht", "private"],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_qpeer-tracker")).args(args).output().expect("run");
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let first = stderr.lines().next().unwrap_or_default();
        assert!(first.starts_with("error: invalid value"), "{args:?}: {stderr}");
        assert!(
            first.contains("IPv4 address and port")
                || first.contains("possible values: public")
                || stderr.contains("[possible values: public]"),
            "{args:?}: {stderr}"
        );
    }
}
