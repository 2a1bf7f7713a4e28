//! IPv6 through real kernel firewalls (see `qpeer_tests::lab`, [`Stack`]), with the real
//! binaries: IPv6-only homes, dual-stack homes (IPv4 behind NAT, IPv6 behind a stateful
//! firewall) and IPv4-only homes, around a tracker with both families.
//!
//! Ignored by default (they need root and nftables); `.ci/run` runs them with `--ignored`.
//! Each test builds its own lab, checks its namespaces are gone afterwards, and fails with
//! every process's output.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use qpeer_tests::lab::{lab_send_bin, Host, Lab, Stack};
use qpeer_tests::lab_run::{
    final_path, node_id, registration, replies, scenario, spawn_qpeer, start_listener, wait_direct, World,
};
use qpeer_tests::{assert_same_tree, write_random};

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// The tracker address a node on `host` uses: IPv6 when the host has it, else IPv4.
fn tracker_for(world: &World, host: &Host) -> Result<String> {
    match host.addr6 {
        Some(_) => world.tracker.addr6.clone().context("the tracker has no IPv6 address"),
        None => Ok(world.tracker.addr.clone()),
    }
}

/// The direct address at the end of a `direct <addr>` path.
fn direct(path: &str) -> Option<SocketAddr> {
    path.strip_prefix("direct ")?.parse().ok()
}

/// The lab's home firewall as a node sees it: `inside` (in a home) sends one datagram from
/// port 47001 to `outside` port 47002; a datagram back from there arrives, one from
/// `outside`'s port 47003 (unsolicited) does not.
fn firewall_drops_unsolicited(lab: &Lab, inside: &Host, outside: &Host) -> Result<()> {
    let (inside6, outside6) =
        (inside.addr6.context("no IPv6 inside")?, outside.addr6.context("no IPv6 outside")?);
    let send = lab_send_bin()?;
    let args = |from: &str, to: String, hex: &str, listen: &str| {
        // Three rounds 300 ms apart: the firewall check must not hang on one datagram's timing.
        strings(&[
            "--from",
            from,
            "--to",
            &to,
            "--hex",
            hex,
            "--count",
            "3",
            "--interval-ms",
            "300",
            "--listen-ms",
            listen,
        ])
    };
    let mut opener =
        lab.spawn(inside, &send, &args("[::]:47001", format!("[{outside6}]:47002"), "01", "3000"))?;
    // It prints only at the end: give it time to send and listen.
    std::thread::sleep(Duration::from_millis(400));
    for (port, hex) in [("47003", "03"), ("47002", "02")] {
        let mut answer = lab.spawn(
            outside,
            &send,
            &args(&format!("[::]:{port}"), format!("[{inside6}]:47001"), hex, "0"),
        )?;
        let code = answer.wait(Duration::from_secs(5))?;
        ensure!(code == 0, "qpeer-lab-send failed: {}", answer.stderr.text());
    }
    opener.wait(Duration::from_secs(5))?;
    let got = opener.stdout.text();

    let from = |port: &str| format!("[RECEIVED] [{outside6}]:{port} ");
    ensure!(got.contains(&from("47002")), "the answer did not get through the firewall:\n{got}");
    ensure!(!got.contains(&from("47003")), "an unsolicited datagram got through the firewall:\n{got}");
    Ok(())
}

/// A listener on `listener_host` (home `a`) pinged three times from `pinger_host` (home `b`),
/// each reaching the tracker at `trackers` (listener's, pinger's). Checks that every ping
/// came back and the last went direct to `want` (an IP of the listener), and that the
/// listener's session with the pinger ended direct too; returns the pinger's and the
/// listener's direct paths.
fn ping_direct(
    lab: &mut Lab,
    world: &mut World,
    (listener_host, pinger_host): (&Host, &Host),
    trackers: (&str, &str),
    want: IpAddr,
) -> Result<(SocketAddr, SocketAddr)> {
    let listener = start_listener(lab, listener_host, &world.home("a"), trackers.0, &[])
        .with_context(|| format!("the listener did not start\n{}", world.dump()))?;
    world.logs.watch("listener", &listener.process);
    let args = strings(&["ping", &listener.id, "--count", "3", "--interval", "0.3"]);
    let mut pinger = spawn_qpeer(lab, pinger_host, &world.home("b"), trackers.1, &args)?;
    world.logs.watch("pinger", &pinger);
    let exit =
        pinger.wait(Duration::from_secs(20)).with_context(|| format!("ping hung\n{}", world.dump()))?;
    ensure!(exit == 0, "ping exited {exit}\n{}", world.dump());
    if std::env::var_os("QPEER_LAB_VERBOSE").is_some() {
        eprintln!("{}", world.dump());
    }
    let out = pinger.stdout.text();
    ensure!(out.contains("3 received"), "pings lost\n{}", world.dump());
    // A session may start relayed and upgrade: the last reply shows where it ended up.
    let last = replies(&out).pop().map(|r| r.path).unwrap_or_default();
    let at = direct(&last).with_context(|| format!("the last reply went {last:?}\n{}", world.dump()))?;
    ensure!(at.ip() == want, "the last reply went to {at}, not {want}\n{}", world.dump());
    let (_, pinger_id) = registration(&pinger)?;
    let from = wait_direct(&listener.process.stdout, &pinger_id, Duration::from_secs(5))
        .with_context(|| format!("the listener's session never went direct\n{}", world.dump()))?;
    Ok((at, from))
}

/// [`ping_direct`] from `pinger` to `listener`, both with IPv6 and on the tracker's IPv6
/// address: both sides must end up direct at the other's IPv6 address.
fn ping_direct_over_ipv6(lab: &mut Lab, world: &mut World, listener: &Host, pinger: &Host) -> Result<()> {
    let listener6 = listener.addr6.context("no IPv6 on the listener")?;
    let pinger6 = pinger.addr6.context("no IPv6 on the pinger")?;
    let tracker = tracker_for(world, listener)?;
    let hosts = (listener, pinger);
    let (_, from) = ping_direct(lab, world, hosts, (&tracker, &tracker), IpAddr::V6(listener6))?;
    ensure!(from.ip() == IpAddr::V6(pinger6), "the listener reached the pinger at {from}\n{}", world.dump());
    Ok(())
}

/// Two homes with IPv6 only, each behind a router that drops unsolicited inbound packets:
/// the nodes punch through both firewalls at once and move a file directly over IPv6.
#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn ipv6_only_homes_transfer_directly_through_firewalls() {
    scenario("ipv6-only homes", |lab| {
        let mut world = World::start_dual(lab)?;
        let (receiver_host, _) = lab.home_host_with("a", false, Stack::V6)?;
        let (sender_host, _) = lab.home_host_with("b", false, Stack::V6)?;
        let receiver_ip = IpAddr::V6(receiver_host.addr6.context("no IPv6 on the receiver")?);
        let tracker = tracker_for(&world, &receiver_host)?;
        firewall_drops_unsolicited(lab, &receiver_host, &world.tracker.host)?;

        let src = world.dir.join("src");
        write_random(&src.join("big.bin"), 8 << 20, 21)?;
        let out = world.dir.join("inbox");
        let sender_id = node_id(&world.home("b"))?;
        let accept = strings(&["--out", &out.display().to_string(), "--accept-from", &sender_id]);
        let receiver = start_listener(lab, &receiver_host, &world.home("a"), &tracker, &accept)
            .with_context(|| format!("the receiver did not start\n{}", world.dump()))?;
        world.logs.watch("receiver", &receiver.process);
        ensure!(receiver.observed.is_ipv6(), "the receiver registered at {}", receiver.observed);

        let args = vec!["send".to_string(), receiver.id.clone(), src.join("big.bin").display().to_string()];
        let mut sender = spawn_qpeer(lab, &sender_host, &world.home("b"), &tracker, &args)?;
        world.logs.watch("sender", &sender);
        let exit =
            sender.wait(Duration::from_secs(60)).with_context(|| format!("send hung\n{}", world.dump()))?;
        ensure!(exit == 0, "send exited {exit}\n{}", world.dump());
        let sent = sender.stdout.text();
        ensure!(sent.contains("[SENT] 1 files"), "{}", world.dump());
        let path = final_path(&sent, &receiver.id).unwrap_or_default();
        let at = direct(&path).with_context(|| format!("the transfer went {path:?}\n{}", world.dump()))?;
        ensure!(at.ip() == receiver_ip, "sent to {at}, not the receiver's {receiver_ip}\n{}", world.dump());
        assert_same_tree(&src.join("big.bin"), &out.join("big.bin"))?;
        Ok(())
    });
}

/// Two dual-stack homes: the pair ends up on a direct IPv6 path, both ways.
#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn a_dual_stack_pair_uses_ipv6() {
    scenario("dual-stack pair", |lab| {
        let mut world = World::start_dual(lab)?;
        let (a, _) = lab.home_host_with("a", false, Stack::Dual)?;
        let (b, _) = lab.home_host_with("b", false, Stack::Dual)?;
        ping_direct_over_ipv6(lab, &mut world, &a, &b)
    });
}

/// Two dual-stack hosts on one LAN, where both families reach the other directly: IPv6 wins
/// over IPv4 (which may confirm first) on both sides.
#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn a_dual_stack_lan_pair_prefers_ipv6_over_ipv4() {
    scenario("dual-stack LAN pair", |lab| {
        let mut world = World::start_dual(lab)?;
        let mut router = lab.home_router_with("home", false, Stack::Dual)?;
        let a = lab.host_behind(&mut router, "a")?;
        let b = lab.host_behind(&mut router, "b")?;
        ping_direct_over_ipv6(lab, &mut world, &a, &b)
    });
}

/// A node in an IPv4-only home reaches a node in a dual-stack home over IPv4 (the dual-stack
/// node's one IPv6 socket sends and receives IPv4 as v4-mapped addresses), through both NATs.
#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn an_ipv4_only_node_reaches_a_dual_stack_node() {
    scenario("ipv4-only x dual-stack", |lab| {
        let mut world = World::start_dual(lab)?;
        let (dual, dual_router) = lab.home_host_with("a", false, Stack::Dual)?;
        let (v4, v4_router) = lab.home_host_with("b", false, Stack::V4)?;
        ensure!(v4.addr6.is_none(), "the IPv4-only host has IPv6");
        let tracker = world.tracker.addr.clone();
        let want = IpAddr::V4(dual_router.wan);
        let (_, from) = ping_direct(lab, &mut world, (&dual, &v4), (&tracker, &tracker), want)?;
        ensure!(
            from.ip() == IpAddr::V4(v4_router.wan),
            "the dual-stack node reached {from}\n{}",
            world.dump()
        );
        Ok(())
    });
}

/// A node behind a symmetric IPv4 NAT, whose home also has IPv6, reaches a node in an
/// IPv6-only home directly over IPv6 (IPv4 between two such NATs would need the relay).
#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn a_symmetric_nat_node_with_ipv6_reaches_an_ipv6_peer_directly() {
    scenario("symmetric + IPv6 x ipv6-only", |lab| {
        let mut world = World::start_dual(lab)?;
        let (v6, _) = lab.home_host_with("a", false, Stack::V6)?;
        let (symmetric, _) = lab.home_host_with("b", true, Stack::Dual)?;
        ping_direct_over_ipv6(lab, &mut world, &v6, &symmetric)
    });
}

/// The relay over IPv6: a `--relay-only` node in an IPv6-only home pings one in another
/// through the tracker, whose connections with both are IPv6.
#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn the_relay_works_over_ipv6() {
    scenario("relay over IPv6", |lab| {
        let mut world = World::start_dual(lab)?;
        let (a, _) = lab.home_host_with("a", false, Stack::V6)?;
        let (b, _) = lab.home_host_with("b", false, Stack::V6)?;
        let tracker = tracker_for(&world, &a)?;
        let listener = start_listener(lab, &a, &world.home("a"), &tracker, &[])
            .with_context(|| format!("the listener did not start\n{}", world.dump()))?;
        world.logs.watch("listener", &listener.process);
        let args = strings(&["ping", &listener.id, "--count", "3", "--interval", "0.3", "--relay-only"]);
        let mut pinger = spawn_qpeer(lab, &b, &world.home("b"), &tracker, &args)?;
        world.logs.watch("pinger", &pinger);
        let exit =
            pinger.wait(Duration::from_secs(20)).with_context(|| format!("ping hung\n{}", world.dump()))?;
        ensure!(exit == 0, "ping exited {exit}\n{}", world.dump());
        let (observed, _) = registration(&pinger)?;
        ensure!(observed.is_ipv6(), "the pinger registered at {observed}\n{}", world.dump());
        let out = pinger.stdout.text();
        ensure!(out.contains("3 received"), "pings lost\n{}", world.dump());
        let paths: Vec<String> = replies(&out).into_iter().map(|r| r.path).collect();
        ensure!(paths.iter().all(|p| p == "relayed via tracker"), "not relayed: {paths:?}\n{}", world.dump());
        ensure!(world.tracker.process.stdout.text().contains("[RELAY] "), "no relay line\n{}", world.dump());
        Ok(())
    });
}
