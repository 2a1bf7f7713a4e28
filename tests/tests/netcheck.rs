//! `qpeer netcheck` through real kernel NATs (see `qpeer_tests::lab`): a tracker on two
//! addresses, and the mapping the real binary reports from each kind of place.
//!
//! Ignored by default (they need root and nftables), like the other lab tests.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use qpeer_tests::lab::{bin_dir, Host, Lab, Place};
use qpeer_tests::lab_run::{home, replies, scenario, spawn_qpeer, start_listener, LabTracker};

/// The tracker's second address, on the same host and interface as its first (198.51.100.1).
const SECOND_ADDR: &str = "198.51.100.2";

/// Starts `qpeer-tracker` on a public host listening on 198.51.100.1:4433 and
/// 198.51.100.2:4433 (the second address added to the host's `wan`), and waits until it
/// listens on both.
fn start_two_address_tracker(lab: &mut Lab) -> Result<LabTracker> {
    let host = lab.public_host("trk", Some(1))?;
    host.run("ip", &["addr", "add", &format!("{SECOND_ADDR}/24"), "dev", "wan"])?;
    let args = [
        "--listen".into(),
        format!("{}:4433", host.addr),
        "--listen".into(),
        format!("{SECOND_ADDR}:4433"),
        "--home".into(),
        home(lab, "trk"),
    ];
    let process = lab.spawn(&host, &bin_dir()?.join("qpeer-tracker"), &args)?;
    let line = process.stdout.wait_for(Duration::from_secs(10), |l| l.starts_with("[TRACKER] "))?;
    let addr = line.trim_start_matches("[TRACKER] ").to_string();
    let second = format!("[LISTENING] Server is listening on {SECOND_ADDR}:4433");
    process.stdout.wait_for(Duration::from_secs(5), |l| l == second)?;
    Ok(LabTracker { process, host, addr, addr6: None })
}

/// What `qpeer netcheck --json` printed on `host`, and how long it took.
fn netcheck(
    lab: &Lab,
    host: &Host,
    name: &str,
    tracker: &LabTracker,
) -> Result<(serde_json::Value, Duration)> {
    let start = Instant::now();
    let args = ["netcheck".to_string(), "--json".to_string()];
    let mut process = spawn_qpeer(lab, host, &home(lab, name), &tracker.addr, &args)?;
    let exit = process.wait(Duration::from_secs(30))?;
    let elapsed = start.elapsed();
    let output = process.stdout.text();
    ensure!(exit == 0, "netcheck exited {exit}\nstdout:\n{output}\nstderr:\n{}", process.stderr.text());
    let line = output.lines().last().context("netcheck printed nothing")?;
    let report: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("netcheck did not print JSON: {output}"))?;
    Ok((report, elapsed))
}

/// Runs netcheck from a node at `place` and checks UDP works and the mapping it reports.
fn expect_mapping(place: Place, mapping: &str) {
    scenario(&format!("netcheck at {place:?}"), |lab| {
        let tracker = start_two_address_tracker(lab)?;
        let host = lab.node_host("n", place)?;
        let (report, elapsed) = netcheck(lab, &host, "n", &tracker)?;
        eprintln!("netcheck at {place:?} answered in {elapsed:?}: {report}");
        let tracker_log = || tracker.process.stdout.text();
        ensure!(report["udp"] == true, "UDP should work: {report}\ntracker:\n{}", tracker_log());
        ensure!(
            report["mapping"] == mapping,
            "expected mapping {mapping}: {report}\ntracker:\n{}",
            tracker_log()
        );
        ensure!(report["public_v4"].is_string(), "a public IPv4 address: {report}");
        ensure!(report["rtt_ms"].is_number(), "an RTT: {report}");
        ensure!(report["relay"] == true, "the relay answers: {report}");
        ensure!(report["verdict"].as_str().is_some_and(|v| !v.is_empty()), "a verdict: {report}");
        Ok(())
    });
}

#[test]
#[ignore = "needs root and nftables (NAT lab)"]
fn a_public_host_has_no_nat() {
    expect_mapping(Place::Public, "none");
}

#[test]
#[ignore = "needs root and nftables (NAT lab)"]
fn a_cone_nat_maps_endpoint_independently() {
    expect_mapping(Place::Cone, "endpoint-independent");
}

#[test]
#[ignore = "needs root and nftables (NAT lab)"]
fn a_carrier_nat_maps_endpoint_independently() {
    expect_mapping(Place::Cgnat, "endpoint-independent");
}

#[test]
#[ignore = "needs root and nftables (NAT lab)"]
fn a_symmetric_nat_maps_endpoint_dependently() {
    expect_mapping(Place::Symmetric, "endpoint-dependent");
}

#[test]
#[ignore = "needs root and nftables (NAT lab)"]
fn blocked_udp_is_reported_within_five_seconds() {
    scenario("netcheck with UDP blocked", |lab| {
        let tracker = start_two_address_tracker(lab)?;
        let (host, router) = lab.home_host("n", false)?;
        // Only UDP to an address nobody uses gets through: the tracker is out of reach.
        router.block_udp_except("203.0.113.250".parse()?)?;
        let (report, elapsed) = netcheck(lab, &host, "n", &tracker)?;
        ensure!(report["udp"] == false, "UDP is blocked: {report}");
        let verdict = report["verdict"].as_str().unwrap_or_default();
        ensure!(verdict.contains("no UDP"), "a clear verdict: {report}");
        eprintln!("netcheck with UDP blocked answered in {elapsed:?}");
        ensure!(elapsed < Duration::from_secs(5), "took {elapsed:?}, at most 5 s: {report}");
        Ok(())
    });
}

#[test]
#[ignore = "needs root and nftables (NAT lab)"]
fn nodes_behind_symmetric_nats_learn_it_and_go_through_the_relay() {
    scenario("symmetric x symmetric with a two-address tracker", |lab| {
        let tracker = start_two_address_tracker(lab)?;
        let a = lab.node_host("a", Place::Symmetric)?;
        let b = lab.node_host("b", Place::Symmetric)?;
        let listener = start_listener(lab, &a, &home(lab, "a"), &tracker.addr, &[])?;
        // Every node measures its mapping after registering, and says so.
        let checked = |process: &qpeer_tests::lab::Process| {
            process.stdout.wait_for(Duration::from_secs(10), |l| l.starts_with("[NETCHECK] "))
        };
        let line = checked(&listener.process)?;
        ensure!(line.starts_with("[NETCHECK] mapping endpoint-dependent"), "listener: {line}");
        let ping = [
            "ping".into(),
            listener.id.clone(),
            "--count".into(),
            "3".into(),
            "--interval".into(),
            "0.3".into(),
        ];
        let mut pinger = spawn_qpeer(lab, &b, &home(lab, "b"), &tracker.addr, &ping)?;
        let exit = pinger.wait(Duration::from_secs(20))?;
        let out = pinger.stdout.text();
        let describe = || {
            format!("pinger:\n{out}\n{}\nlistener:\n{}", pinger.stderr.text(), listener.process.stdout.text())
        };
        ensure!(exit == 0 && out.contains("3 received"), "ping failed\n{}", describe());
        let last = replies(&out).pop().map(|r| r.path).unwrap_or_default();
        ensure!(!last.starts_with("direct "), "two symmetric NATs cannot punch: {last}\n{}", describe());
        Ok(())
    });
}
