//! Hole punching through real kernel NATs (see `qpeer_tests::lab`), with the real binaries.
//!
//! Ignored by default (they need root and nftables); `.ci/run` runs them with `--ignored`.
//! Each test builds its own lab, checks its namespaces are gone afterwards, and fails with a
//! clear reason when the lab cannot be built (never a silent skip).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use qpeer_tests::lab::{bin_dir, leftover_namespaces, Host, Lab, Place, Process};

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

/// The id and observed address from a node's `[REGISTERED] observed ADDR as ID` line.
fn registration(process: &Process) -> Result<(SocketAddr, String)> {
    let line =
        process.stdout.wait_for(Duration::from_secs(10), |l| l.starts_with("[REGISTERED] observed "))?;
    let rest = line.trim_start_matches("[REGISTERED] observed ");
    let (addr, id) = rest.split_once(" as ").context("malformed [REGISTERED] line")?;
    Ok((addr.parse()?, id.trim().to_string()))
}

/// The address in `[PEER CONNECTED] <id> direct <addr> rtt …` for `peer`.
fn direct_addr(process: &Process, peer: &str) -> Result<SocketAddr> {
    let prefix = format!("[PEER CONNECTED] {peer} direct ");
    let line = process.stdout.wait_for(Duration::from_secs(5), |l| l.starts_with(&prefix))?;
    let addr = line[prefix.len()..].split_whitespace().next().context("no address")?;
    Ok(addr.parse()?)
}

/// Builds the lab, starts a tracker on the internet, a listening node at `listener_place`
/// and pings it from a node at `pinger_place` (or two nodes on one LAN when `same_lan`).
fn run_pair(lab: &mut Lab, listener_place: Place, pinger_place: Place, same_lan: bool) -> Result<Run> {
    let bins = bin_dir()?;
    let tracker_host = lab.public_host("trk", Some(1))?;
    let (listener_host, pinger_host) = if same_lan {
        let mut router = lab.home_router("home", false, None)?;
        (lab.host_behind(&mut router, "a")?, lab.host_behind(&mut router, "b")?)
    } else {
        (lab.node_host("a", listener_place)?, lab.node_host("b", pinger_place)?)
    };
    let home = |name: &str| lab.dir.path().join(name).display().to_string();

    let tracker = lab.spawn(
        &tracker_host,
        &bins.join("qpeer-tracker"),
        &["--listen".into(), format!("{}:4433", tracker_host.addr), "--home".into(), home("trk")],
    )?;
    let tracker_line = tracker.stdout.wait_for(Duration::from_secs(10), |l| l.starts_with("[TRACKER] "))?;
    let tracker_addr = tracker_line.trim_start_matches("[TRACKER] ").to_string();

    let listener = lab.spawn(
        &listener_host,
        &bins.join("qpeer"),
        &["listen".into(), "--home".into(), home("a"), "--tracker".into(), tracker_addr.clone()],
    )?;
    let (_, listener_id) = registration(&listener)?;
    let listening = listener.stdout.wait_for(Duration::from_secs(5), |l| l.starts_with("[LISTENING] "))?;
    let listener_port: u16 = listening
        .split_whitespace()
        .find_map(|w| w.strip_suffix(';').and_then(|a| a.parse::<SocketAddr>().ok()))
        .context("no bound address in [LISTENING] line")?
        .port();

    let start = Instant::now();
    let mut pinger = lab.spawn(
        &pinger_host,
        &bins.join("qpeer"),
        &[
            "ping".into(),
            listener_id.clone(),
            "--count".into(),
            "2".into(),
            "--interval".into(),
            "0.2".into(),
            "--home".into(),
            home("b"),
            "--tracker".into(),
            tracker_addr,
        ],
    )?;
    let pinger_exit = pinger.wait(Duration::from_secs(20))?;
    let elapsed = start.elapsed();
    let (_, pinger_id) = registration(&pinger)?;
    Ok(Run {
        tracker,
        listener,
        pinger,
        pinger_exit,
        listener_id,
        pinger_id,
        listener_host,
        listener_port,
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

/// Runs one scenario in a fresh lab and checks that none of its namespaces survive it.
fn scenario(name: &str, check: impl FnOnce(&mut Lab) -> Result<()>) {
    let mut lab = Lab::new().expect("the NAT lab cannot be built here (it needs root, ip and nft)");
    let namespaces = lab.namespaces().to_vec();
    let prefix = namespaces[0].trim_end_matches("-inet").to_string();
    let result = check(&mut lab);
    drop(lab);
    let left = leftover_namespaces(&format!("{prefix}-"));
    assert!(left.is_empty(), "{name}: namespaces left behind: {left:?}");
    if let Err(e) = result {
        panic!("{name}: {e:#}");
    }
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
        let path_line = format!("PING {}: direct ", run.listener_id);
        ensure!(pinger_out.contains(&path_line), "not direct\n{}", describe(&run));
        ensure!(pinger_out.contains("2 received"), "pings lost\n{}", describe(&run));
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
        ensure!(run.pinger.stdout.text().contains("2 received"), "pings lost\n{}", describe(&run));
        let connected = format!("[PEER CONNECTED] {} relayed via tracker rtt", run.pinger_id);
        ensure!(run.listener.stdout.text().contains(&connected), "listener not relayed\n{}", describe(&run));
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
        let bins = bin_dir()?;
        let tracker_host = lab.public_host("trk", Some(1))?;
        let receiver_host = lab.node_host("a", case.receiver)?;
        let sender_host = lab.node_host("b", case.sender)?;
        let dir = lab.dir.path().to_path_buf();
        let home = |name: &str| dir.join(name).display().to_string();
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
        let tracker = lab.spawn(
            &tracker_host,
            &bins.join("qpeer-tracker"),
            &["--listen".into(), format!("{}:4433", tracker_host.addr), "--home".into(), home("trk")],
        )?;
        let tracker_line =
            tracker.stdout.wait_for(Duration::from_secs(10), |l| l.starts_with("[TRACKER] "))?;
        let tracker_addr = tracker_line.trim_start_matches("[TRACKER] ").to_string();

        // The sender's id, so the receiver can allow it.
        let id_out =
            std::process::Command::new(bins.join("qpeer")).args(["id", "--home", &home("b")]).output()?;
        ensure!(id_out.status.success(), "qpeer id failed");
        let sender_id = String::from_utf8(id_out.stdout)?.lines().last().context("no id")?.to_string();

        let out = dir.join("inbox");
        let receiver = lab.spawn(
            &receiver_host,
            &bins.join("qpeer"),
            &[
                "listen".into(),
                "--home".into(),
                home("a"),
                "--tracker".into(),
                tracker_addr.clone(),
                "--out".into(),
                out.display().to_string(),
                "--accept-from".into(),
                sender_id,
            ],
        )?;
        let (_, receiver_id) = registration(&receiver)?;
        receiver.stdout.wait_for(Duration::from_secs(5), |l| l.starts_with("[LISTENING] "))?;

        let start = Instant::now();
        let mut args = vec!["send".to_string(), receiver_id];
        args.extend(paths);
        args.extend(["--home".into(), home("b"), "--tracker".into(), tracker_addr]);
        let mut sender = lab.spawn(&sender_host, &bins.join("qpeer"), &args)?;
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
        let path = if case.relayed { " relayed via tracker rtt" } else { " direct " };
        ensure!(
            sent.lines().any(|l| l.starts_with("[PEER CONNECTED]") && l.contains(path)),
            "wrong path\n{}",
            context()
        );
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
