//! Hole punching through real kernel NATs (see `qpeer_tests::lab`), with the real binaries.
//!
//! Ignored by default (they need root and nftables); `.ci/run` runs them with `--ignored`.
//! Each test builds its own lab, checks its namespaces are gone afterwards, and fails with a
//! clear reason when the lab cannot be built (never a silent skip).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use qpeer_tests::lab::{Host, Lab, Place, Process};
use qpeer_tests::lab_run::{
    final_path, home, node_id, registration, replies, scenario, spawn_qpeer, start_listener, start_tracker,
    upgrades_to_direct, wait_direct,
};

/// What one lab run saw.
struct Run {
    tracker: Process,
    listener: Process,
    pinger: Process,
    pinger_exit: i32,
    listener_id: String,
    pinger_id: String,
    listener_host: Host,
    listener_port: u16,
    elapsed: Duration,
}

/// The peer's address on the direct path `process` ends up with: from its
/// `[PEER CONNECTED] <peer> direct <addr> rtt …` line, or, when the session started relayed,
/// from the later `[PATH] <peer> direct <addr> (was …)` line.
fn direct_addr(process: &Process, peer: &str) -> Result<SocketAddr> {
    wait_direct(&process.stdout, peer, Duration::from_secs(5))
}

/// Builds the lab, starts a tracker on the internet, a listening node at `listener_place`
/// and pings it from a node at `pinger_place` (or two nodes on one LAN when `same_lan`).
fn run_pair(lab: &mut Lab, listener_place: Place, pinger_place: Place, same_lan: bool) -> Result<Run> {
    let tracker = start_tracker(lab)?;
    let (listener_host, pinger_host) = if same_lan {
        let mut router = lab.home_router("home", false, None)?;
        (lab.host_behind(&mut router, "a")?, lab.host_behind(&mut router, "b")?)
    } else {
        (lab.node_host("a", listener_place)?, lab.node_host("b", pinger_place)?)
    };
    let listener = start_listener(lab, &listener_host, &home(lab, "a"), &tracker.addr, &[])?;
    let listener_id = listener.id.clone();

    let start = Instant::now();
    // A session may start relayed and upgrade: the last of three replies, 0.3 s apart, shows
    // where it ended up.
    let ping =
        ["ping".into(), listener_id.clone(), "--count".into(), "3".into(), "--interval".into(), "0.3".into()];
    let mut pinger = spawn_qpeer(lab, &pinger_host, &home(lab, "b"), &tracker.addr, &ping)?;
    let pinger_exit = pinger.wait(Duration::from_secs(20))?;
    let elapsed = start.elapsed();
    let (_, pinger_id) = registration(&pinger)?;
    Ok(Run {
        tracker: tracker.process,
        listener: listener.process,
        pinger,
        pinger_exit,
        listener_id,
        pinger_id,
        listener_host,
        listener_port: listener.port,
        elapsed,
    })
}

fn describe(run: &Run) -> String {
    format!(
        "pinger exit {}\n--- pinger stdout\n{}\n--- pinger stderr\n{}\n--- listener stdout\n{}\n--- listener stderr\n{}\n--- tracker\n{}",
        run.pinger_exit,
        run.pinger.stdout.text(),
        run.pinger.stderr.text(),
        run.listener.stdout.text(),
        run.listener.stderr.text(),
        run.tracker.stdout.text()
    )
}

/// A direct path: ping succeeds, the tracker saw both nodes, and each side saw the other's
/// connection come from the address the tracker observed (one socket per node).
fn expect_direct(listener: Place, pinger: Place, same_lan: bool) {
    let name =
        if same_lan { "same-lan".to_string() } else { format!("{listener} listener x {pinger} pinger") };
    scenario(&name.clone(), |lab| {
        let run = run_pair(lab, listener, pinger, same_lan)?;
        eprintln!("{name}: ping finished in {:?}", run.elapsed);
        if std::env::var_os("QPEER_LAB_VERBOSE").is_some() {
            eprintln!("{}", describe(&run));
        }
        ensure!(run.pinger_exit == 0, "ping failed\n{}", describe(&run));
        let pinger_out = run.pinger.stdout.text();
        // A session may start relayed and upgrade: the last reply must have gone direct.
        let last = replies(&pinger_out).pop().map(|r| r.path).unwrap_or_default();
        ensure!(last.starts_with("direct "), "the last reply was not direct\n{}", describe(&run));
        ensure!(pinger_out.contains("3 received"), "pings lost\n{}", describe(&run));
        let tracker_out = run.tracker.stdout.text();
        for id in [&run.listener_id, &run.pinger_id] {
            let short = &id[..8];
            ensure!(
                tracker_out.lines().any(|l| l.starts_with("[NEW CONNECTION]") && l.ends_with(short)),
                "tracker never showed {short}\n{}",
                describe(&run)
            );
        }
        ensure!(tracker_out.contains("[ACTIVE CONNECTIONS] 2"), "{}", describe(&run));

        let (pinger_observed, _) = registration(&run.pinger)?;
        let (listener_observed, _) = registration(&run.listener)?;
        let pinger_seen_from = direct_addr(&run.listener, &run.pinger_id)?;
        let listener_seen_at = direct_addr(&run.pinger, &run.listener_id)?;
        if same_lan {
            // Linux NATs do not hairpin: the LAN candidate must have won.
            let lan = SocketAddr::new(run.listener_host.addr.into(), run.listener_port);
            ensure!(
                listener_seen_at == lan,
                "expected the LAN path {lan}, got {listener_seen_at}\n{}",
                describe(&run)
            );
        } else {
            // A symmetric NAT maps each destination to a new port, so only the address matches
            // there; everywhere else the peer sees the very mapping the tracker observed.
            let same = |place: Place, seen: SocketAddr, observed: SocketAddr| match place {
                Place::Symmetric => seen.ip() == observed.ip(),
                _ => seen == observed,
            };
            ensure!(
                same(pinger, pinger_seen_from, pinger_observed),
                "the listener saw the pinger at {pinger_seen_from}, the tracker at {pinger_observed}\n{}",
                describe(&run)
            );
            ensure!(
                same(listener, listener_seen_at, listener_observed),
                "the pinger reached the listener at {listener_seen_at}, the tracker saw it at {listener_observed}\n{}",
                describe(&run)
            );
        }
        Ok(())
    });
}

/// No hole can be punched: the ping goes through the tracker's relay, end to end.
fn expect_relayed(listener: Place, pinger: Place) {
    let name = format!("{listener} listener x {pinger} pinger");
    scenario(&name.clone(), |lab| {
        let run = run_pair(lab, listener, pinger, false)?;
        eprintln!("{name}: relayed ping finished in {:?}", run.elapsed);
        ensure!(run.pinger_exit == 0, "ping failed\n{}", describe(&run));
        let path_line = format!("PING {}: relayed via tracker", run.listener_id);
        ensure!(run.pinger.stdout.text().contains(&path_line), "not relayed\n{}", describe(&run));
        ensure!(run.pinger.stdout.text().contains("3 received"), "pings lost\n{}", describe(&run));
        let connected = format!("[PEER CONNECTED] {} relayed via tracker rtt", run.pinger_id);
        ensure!(run.listener.stdout.text().contains(&connected), "listener not relayed\n{}", describe(&run));
        for process in [&run.pinger, &run.listener] {
            let text = process.stdout.text();
            let upgrades = upgrades_to_direct(&text);
            ensure!(upgrades.is_empty(), "a relayed pair went direct: {upgrades:?}\n{}", describe(&run));
        }
        ensure!(run.tracker.stdout.text().contains("[RELAY] "), "no relay line\n{}", describe(&run));
        Ok(())
    });
}

#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn public_x_public() {
    expect_direct(Place::Public, Place::Public, false);
}

#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn public_x_cone() {
    expect_direct(Place::Public, Place::Cone, false);
}

#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn cone_x_public() {
    expect_direct(Place::Cone, Place::Public, false);
}

#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn public_x_cgnat() {
    expect_direct(Place::Public, Place::Cgnat, false);
}

#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn cgnat_x_public() {
    expect_direct(Place::Cgnat, Place::Public, false);
}

#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn cone_x_cone() {
    expect_direct(Place::Cone, Place::Cone, false);
}

#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn cone_x_cgnat() {
    expect_direct(Place::Cone, Place::Cgnat, false);
}

#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn cgnat_x_cone() {
    expect_direct(Place::Cgnat, Place::Cone, false);
}

#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn cgnat_x_cgnat() {
    expect_direct(Place::Cgnat, Place::Cgnat, false);
}

#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn same_lan() {
    expect_direct(Place::Cone, Place::Cone, true);
}

#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn symmetric_x_public_is_direct() {
    // The node behind NAT dials the node without NAT, so a symmetric NAT does not matter.
    expect_direct(Place::Symmetric, Place::Public, false);
}

#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn public_x_symmetric_is_direct() {
    expect_direct(Place::Public, Place::Symmetric, false);
}

#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn symmetric_x_cone_is_relayed() {
    expect_relayed(Place::Symmetric, Place::Cone);
}

#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn cone_x_symmetric_is_relayed() {
    expect_relayed(Place::Cone, Place::Symmetric);
}

#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn symmetric_x_symmetric_is_relayed() {
    expect_relayed(Place::Symmetric, Place::Symmetric);
}

/// What a transfer scenario sends, and what it expects.
struct TransferCase {
    receiver: Place,
    sender: Place,
    /// Size of the big file.
    big: usize,
    /// Also send a small directory tree (nested dirs, unicode names, empty file, empty dir).
    tree: bool,
    /// Whether the path must be the relay (else direct).
    relayed: bool,
    /// Capture the internet bridge and prove this marker, present in the file, never appears.
    marker: Option<&'static str>,
}

fn transfer(case: TransferCase) {
    let name = format!("{} receiver x {} sender transfer", case.receiver, case.sender);
    scenario(&name.clone(), |lab| {
        let tracker = start_tracker(lab)?;
        let receiver_host = lab.node_host("a", case.receiver)?;
        let sender_host = lab.node_host("b", case.sender)?;
        let dir = lab.dir.path().to_path_buf();
        let src = dir.join("src");
        qpeer_tests::write_random(&src.join("big.bin"), case.big, 11)?;
        if let Some(marker) = case.marker {
            // The marker many times over, in the clear inside the file.
            let mut data = std::fs::read(src.join("big.bin"))?;
            for chunk in data.chunks_mut(64 * 1024) {
                let n = marker.len().min(chunk.len());
                chunk[..n].copy_from_slice(&marker.as_bytes()[..n]);
            }
            std::fs::write(src.join("big.bin"), data)?;
        }
        let mut paths = vec![src.join("big.bin").display().to_string()];
        if case.tree {
            qpeer_tests::write_random(&src.join("tree/nested/deep/x.bin"), 123_457, 12)?;
            qpeer_tests::write_random(&src.join("tree/ünïcødé 名前.txt"), 999, 13)?;
            std::fs::write(src.join("tree/empty.txt"), b"")?;
            std::fs::create_dir_all(src.join("tree/empty-dir"))?;
            paths.push(src.join("tree").display().to_string());
        }
        let files = if case.tree { 4 } else { 1 };

        let capture = match case.marker {
            Some(_) => Some(lab.capture_internet(&dir.join("internet.pcap"))?),
            None => None,
        };
        // The sender's id, so the receiver can allow it.
        let sender_id = node_id(&home(lab, "b"))?;

        let out = dir.join("inbox");
        let accept = ["--out".into(), out.display().to_string(), "--accept-from".into(), sender_id];
        let receiver = start_listener(lab, &receiver_host, &home(lab, "a"), &tracker.addr, &accept)?;
        let (receiver, receiver_id) = (receiver.process, receiver.id);
        let (tracker, tracker_addr) = (tracker.process, tracker.addr);

        let start = Instant::now();
        let mut args = vec!["send".to_string(), receiver_id.clone()];
        args.extend(paths);
        let mut sender = spawn_qpeer(lab, &sender_host, &home(lab, "b"), &tracker_addr, &args)?;
        let exit = sender.wait(Duration::from_secs(120))?;
        eprintln!("{name}: {:?}", start.elapsed());
        let context = || {
            format!(
                "sender stdout:\n{}\nsender stderr:\n{}\nreceiver:\n{}\n{}\ntracker:\n{}",
                sender.stdout.text(),
                sender.stderr.text(),
                receiver.stdout.text(),
                receiver.stderr.text(),
                tracker.stdout.text()
            )
        };
        ensure!(exit == 0, "send failed\n{}", context());
        let sent = sender.stdout.text();
        // A direct session may start relayed and upgrade ([PATH]); a relayed one never does.
        let path = final_path(&sent, &receiver_id).unwrap_or_default();
        let want = if case.relayed { "relayed via tracker" } else { "direct " };
        ensure!(path.starts_with(want), "wrong path: {path:?}\n{}", context());
        if case.relayed {
            for text in [sent.clone(), receiver.stdout.text()] {
                let upgrades = upgrades_to_direct(&text);
                ensure!(upgrades.is_empty(), "a relayed pair went direct: {upgrades:?}\n{}", context());
            }
        }
        ensure!(sent.contains(&format!("[SENT] {files} files")), "{}", context());
        ensure!(receiver.stdout.text().matches("[RECEIVED] ").count() == files, "{}", context());
        qpeer_tests::assert_same_tree(&src.join("big.bin"), &out.join("big.bin"))?;
        if case.tree {
            qpeer_tests::assert_same_tree(&src.join("tree"), &out.join("tree"))?;
        }
        if let (Some(capture), Some(marker)) = (capture, case.marker) {
            let pcap = capture.finish()?;
            ensure!(
                pcap.len() as u64 > case.big as u64,
                "the capture missed the transfer ({} bytes)",
                pcap.len()
            );
            let found = pcap.windows(marker.len()).any(|w| w == marker.as_bytes());
            ensure!(!found, "the marker appears in clear on the wire");
            // The marker must be findable when present: search the plaintext file as a control.
            let plain = std::fs::read(src.join("big.bin"))?;
            ensure!(plain.windows(marker.len()).any(|w| w == marker.as_bytes()), "control search failed");
        }
        Ok(())
    });
}

#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn cone_x_cone_file_transfer() {
    transfer(TransferCase {
        receiver: Place::Cone,
        sender: Place::Cone,
        big: 100 << 20,
        tree: true,
        relayed: false,
        marker: None,
    });
}

#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn symmetric_x_cone_relayed_transfer() {
    transfer(TransferCase {
        receiver: Place::Symmetric,
        sender: Place::Cone,
        big: 20 << 20,
        tree: false,
        relayed: true,
        marker: None,
    });
}

#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn cone_x_symmetric_relayed_transfer() {
    transfer(TransferCase {
        receiver: Place::Cone,
        sender: Place::Symmetric,
        big: 20 << 20,
        tree: false,
        relayed: true,
        marker: None,
    });
}

#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn symmetric_x_symmetric_relayed_transfer() {
    transfer(TransferCase {
        receiver: Place::Symmetric,
        sender: Place::Symmetric,
        big: 20 << 20,
        tree: false,
        relayed: true,
        marker: None,
    });
}

#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn symmetric_x_public_transfer_is_direct() {
    transfer(TransferCase {
        receiver: Place::Public,
        sender: Place::Symmetric,
        big: 20 << 20,
        tree: false,
        relayed: false,
        marker: None,
    });
}

const MARKER: &str = "QPEER-CAPTURE-MARKER-7f3a9c1e5b2d";

#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn capture_shows_no_plaintext_on_a_direct_path() {
    transfer(TransferCase {
        receiver: Place::Cone,
        sender: Place::Cone,
        big: 4 << 20,
        tree: false,
        relayed: false,
        marker: Some(MARKER),
    });
}

#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn capture_shows_no_plaintext_on_a_relayed_path() {
    transfer(TransferCase {
        receiver: Place::Symmetric,
        sender: Place::Cone,
        big: 4 << 20,
        tree: false,
        relayed: true,
        marker: Some(MARKER),
    });
}
