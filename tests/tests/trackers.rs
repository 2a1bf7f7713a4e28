//! Several trackers found through a private Mainline DHT (issue 17), with the real binaries in
//! the NAT lab (see `qpeer_tests::lab`).
//!
//! Three trackers on the lab's internet form a DHT of their own (each `--dht-listen`s and
//! `--dht-bootstrap`s through the other two: nothing here contacts the public network). Node a
//! (cone NAT) knows only tracker 1; b (cone NAT) and c (symmetric NAT) know trackers 2 and 3,
//! in that order, and live on 2. a reaches b (direct) and c (relayed) by NodeId alone: ping and
//! a file. Tracker 2 then dies without a word (SIGKILL): b and c move to 3 within 10 s, publish
//! a new record, and a reaches both again.
//!
//! Ignored by default (root and nftables), like the other lab tests: run it with
//! `cargo build --bins && cargo test -p qpeer-tests --test trackers -- --ignored`. The
//! `[MEASURED]` lines it prints feed docs/PERFORMANCE.md.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use qpeer_tests::lab::{Host, Lab, Lines, Process};
use qpeer_tests::lab_run::{
    final_path, home, listening_port, node_id, registration, replies, scenario, spawn_qpeer,
    spawn_qpeer_trackers, start_trackers_on, upgrades_to_direct, LabTracker, Logs,
};

/// The UDP port of every tracker's DHT node.
const DHT_PORT: u16 = 6881;

/// Size of each file a sends.
const FILE_LEN: usize = 3 << 20;

/// Most time a node may take to be registered on its next tracker once its home died.
const FAILOVER_LIMIT: Duration = Duration::from_secs(10);

/// A tracker of the DHT.
struct DhtTracker {
    name: String,
    tracker: LabTracker,
    /// The first 8 hex characters of its NodeId, as console lines name it.
    short: String,
}

/// A listening node with several trackers.
struct Peer {
    name: String,
    process: Process,
    id: String,
    inbox: PathBuf,
}

impl Peer {
    fn short(&self) -> &str {
        &self.id[..8]
    }
}

/// Lines of `lines` from index `from` on.
fn lines_from(lines: &Lines, from: usize) -> Vec<String> {
    lines.snapshot().into_iter().skip(from).collect()
}

/// The tracker named by a `[HOME] tracker <8hex> at HOST:PORT` line.
fn home_of(line: &str) -> Option<&str> {
    line.strip_prefix("[HOME] tracker ")?.split_whitespace().next()
}

/// `(seq, nodes)` of a node's `[RECORD] published seq N on K DHT nodes` line.
fn record_of(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("[RECORD] published seq ")?;
    let mut words = rest.split_whitespace();
    let seq = words.next()?.parse().ok()?;
    (words.next()? == "on").then_some(())?;
    let nodes = words.next()?.parse().ok()?;
    Some((seq, nodes))
}

/// `(tracker short id, ms)` of the last `[RESOLVED] <peer8hex> lives on tracker <8hex> at ADDR
/// (seq N, T ms)` line about `peer` in `output`.
fn resolved(output: &str, peer: &str) -> Option<(String, f64)> {
    let prefix = format!("[RESOLVED] {} lives on tracker ", &peer[..8]);
    output.lines().rev().find_map(|line| {
        let rest = line.strip_prefix(&prefix)?;
        let tracker = rest.split_whitespace().next()?.to_string();
        let ms = rest.rsplit_once(", ")?.1.strip_suffix(" ms)")?.trim().parse().ok()?;
        Some((tracker, ms))
    })
}

/// Starts the three trackers, each a DHT node bootstrapping through the other two, and waits
/// until each one listens and runs its DHT node.
fn start_trackers(lab: &mut Lab, logs: &mut Logs) -> Result<Vec<DhtTracker>> {
    let hosts: Vec<Host> =
        (1..=3).map(|i| lab.public_host(&format!("t{i}"), Some(i))).collect::<Result<_>>()?;
    let dht: Vec<String> = hosts.iter().map(|h| format!("{}:{DHT_PORT}", h.addr)).collect();
    let mut specs = Vec::new();
    for (i, host) in hosts.into_iter().enumerate() {
        let others: Vec<&str> =
            dht.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, a)| a.as_str()).collect();
        let extra = vec!["--dht-listen".into(), dht[i].clone(), "--dht-bootstrap".into(), others.join(",")];
        specs.push((host, format!("t{}", i + 1), extra));
    }
    let names: Vec<String> = specs.iter().map(|(_, name, _)| name.clone()).collect();
    let started = start_trackers_on(lab, specs)?;
    let mut trackers = Vec::new();
    for (tracker, name) in started.into_iter().zip(names) {
        logs.watch(&format!("tracker {name}"), &tracker.process);
        let wait = |prefix: &'static str| {
            tracker
                .process
                .stdout
                .wait_for(Duration::from_secs(10), |l| l.starts_with(prefix))
                .with_context(|| format!("tracker {name} printed no {prefix} line"))
        };
        wait("[LISTENING] ")?;
        let dht_line = wait("[DHT] listening on ")?;
        let own = format!("{}:{DHT_PORT}", tracker.host.addr);
        ensure!(dht_line.contains(&own), "tracker {name}'s DHT node is not on {own}: {dht_line}");
        let short = tracker.addr.get(..8).context("malformed tracker address")?.to_string();
        eprintln!("tracker {name}: {} ({dht_line})", tracker.addr);
        trackers.push(DhtTracker { name, tracker, short });
    }
    Ok(trackers)
}

/// Starts `qpeer listen` on a node with `trackers`, receiving files from `sender`; waits until
/// it chose its home, which must be `want`, registered, listens and published its record.
fn start_peer(
    lab: &Lab,
    logs: &mut Logs,
    host: &Host,
    name: &str,
    trackers: &[&DhtTracker],
    want: &DhtTracker,
    sender: &str,
) -> Result<Peer> {
    let inbox = lab.dir.path().join(format!("inbox-{name}"));
    let args = [
        "listen".to_string(),
        "--out".into(),
        inbox.display().to_string(),
        "--accept-from".into(),
        sender.into(),
    ];
    let addrs: Vec<String> = trackers.iter().map(|t| t.tracker.addr.clone()).collect();
    let process = spawn_qpeer_trackers(lab, host, &home(lab, name), &addrs, &args)?;
    logs.watch(&format!("node {name}"), &process);
    let line = process.stdout.wait_for(Duration::from_secs(10), |l| l.starts_with("[HOME] "))?;
    let chosen = home_of(&line).with_context(|| format!("malformed [HOME] line: {line}"))?;
    ensure!(chosen == want.short, "node {name} chose {line}, not tracker {} ({})", want.name, want.short);
    let (observed, id) = registration(&process)?;
    listening_port(&process)?;
    eprintln!("node {name}: {id} observed at {observed}, home {}", want.name);
    Ok(Peer { name: name.to_string(), process, id, inbox })
}

/// Waits for a `[RECORD] published` line of `peer` from line `from` on; `(seq, nodes, time
/// since `since` when it was seen)`.
fn wait_record(peer: &Peer, from: usize, since: Instant, timeout: Duration) -> Result<(u64, u64, Duration)> {
    let start = Instant::now();
    loop {
        if let Some(record) = lines_from(&peer.process.stdout, from).iter().find_map(|l| record_of(l)) {
            ensure!(record.1 >= 1, "node {} published its record on no DHT node", peer.name);
            return Ok((record.0, record.1, since.elapsed()));
        }
        if start.elapsed() > timeout {
            bail!("node {} published no record within {timeout:?}", peer.name);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `process` to its end (killed after `timeout`): its exit code, and when (from
/// `started`) its first line matching `first` appeared.
fn run_to_end(
    process: &mut Process,
    started: Instant,
    timeout: Duration,
    first: impl Fn(&str) -> bool,
) -> Result<(i32, Option<Duration>)> {
    let mut seen = None;
    loop {
        if seen.is_none() && process.stdout.snapshot().iter().any(|l| first(l)) {
            seen = Some(started.elapsed());
        }
        if let Some(status) = process.child.try_wait()? {
            // The reader threads may still hold the last lines.
            std::thread::sleep(Duration::from_millis(50));
            if seen.is_none() && process.stdout.snapshot().iter().any(|l| first(l)) {
                seen = Some(started.elapsed());
            }
            return Ok((status.code().unwrap_or(-1), seen));
        }
        if started.elapsed() > timeout {
            process.kill();
            bail!("still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What a reaches a peer with.
struct Dialer<'a> {
    host: &'a Host,
    home: String,
    /// Tracker 1, the only one a knows.
    tracker: String,
}

/// a pings `peer` and sends it a file by NodeId alone, over a direct path (`direct`) or the
/// relay of the peer's home tracker; a's `[RESOLVED]` line must name `peer_home`.
fn reach(
    lab: &Lab,
    logs: &mut Logs,
    a: &Dialer<'_>,
    peer: &Peer,
    peer_home: &DhtTracker,
    direct: bool,
    round: u32,
) -> Result<()> {
    let label = format!("a -> {} ({}, round {round})", peer.name, if direct { "direct" } else { "relayed" });

    // Ping: three replies, 0.3 s apart (a direct session may start relayed and upgrade).
    let ping = [
        "ping".to_string(),
        peer.id.clone(),
        "--count".into(),
        "3".into(),
        "--interval".into(),
        "0.3".into(),
    ];
    let started = Instant::now();
    let mut pinger = spawn_qpeer(lab, a.host, &a.home, &a.tracker, &ping)?;
    logs.watch(&format!("a ping {} round {round}", peer.name), &pinger);
    let (exit, first_reply) =
        run_to_end(&mut pinger, started, Duration::from_secs(30), |l| l.starts_with("reply from "))
            .with_context(|| format!("{label}: ping"))?;
    let out = pinger.stdout.text();
    ensure!(exit == 0, "{label}: ping exited {exit}");
    ensure!(out.contains("3 received"), "{label}: pings lost");
    // a knows one tracker only: its home, if it names one at all.
    if let Some(line) = out.lines().find(|l| l.starts_with("[HOME] ")) {
        ensure!(
            home_of(line) == Some(a.tracker.get(..8).unwrap_or_default()),
            "{label}: a's home is not t1: {line}"
        );
    }
    let got = replies(&out);
    let last = got.last().map(|r| r.path.clone()).unwrap_or_default();
    if direct {
        ensure!(last.starts_with("direct "), "{label}: the last reply went {last:?}, not direct");
    } else {
        ensure!(
            got.iter().all(|r| r.path.starts_with("relayed via tracker")),
            "{label}: not every reply was relayed: {got:?}"
        );
        let upgrades = upgrades_to_direct(&out);
        ensure!(upgrades.is_empty(), "{label}: a relayed pair went direct: {upgrades:?}");
    }
    let (via, resolve_ms) = resolved(&out, &peer.id)
        .with_context(|| format!("{label}: a printed no [RESOLVED] line for {}", peer.short()))?;
    ensure!(
        via == peer_home.short,
        "{label}: a resolved {} to tracker {via}, but it lives on {} ({})",
        peer.short(),
        peer_home.name,
        peer_home.short
    );
    let first_reply = first_reply.context("no reply line")?;
    eprintln!(
        "[MEASURED] {label}: ping command start to first reply {} ms (resolve {resolve_ms:.1} ms, first rtt {:.2} ms, last rtt {:.2} ms)",
        first_reply.as_millis(),
        got.first().map_or(0.0, |r| r.rtt_ms),
        got.last().map_or(0.0, |r| r.rtt_ms),
    );

    // A file, checked byte for byte in the peer's inbox.
    let name = format!("to-{}-{round}.bin", peer.name);
    let file = lab.dir.path().join("src").join(&name);
    qpeer_tests::write_random(&file, FILE_LEN, 17 + u64::from(round))?;
    let send = ["send".to_string(), peer.id.clone(), file.display().to_string()];
    let started = Instant::now();
    let mut sender = spawn_qpeer(lab, a.host, &a.home, &a.tracker, &send)?;
    logs.watch(&format!("a send {} round {round}", peer.name), &sender);
    let (exit, _) = run_to_end(&mut sender, started, Duration::from_secs(60), |_| false)
        .with_context(|| format!("{label}: send"))?;
    let elapsed = started.elapsed();
    let sent = sender.stdout.text();
    ensure!(exit == 0, "{label}: send exited {exit}");
    ensure!(sent.contains("[SENT] 1 files"), "{label}: no [SENT] line");
    let path = final_path(&sent, &peer.id).unwrap_or_default();
    let want = if direct { "direct " } else { "relayed via tracker" };
    ensure!(path.starts_with(want), "{label}: the transfer went {path:?}");
    if !direct {
        let upgrades = upgrades_to_direct(&sent);
        ensure!(upgrades.is_empty(), "{label}: a relayed transfer went direct: {upgrades:?}");
    }
    peer.process
        .stdout
        .wait_for(Duration::from_secs(5), |l| l.starts_with("[RECEIVED] ") && l.contains(&name))
        .with_context(|| format!("{label}: {} printed no [RECEIVED] {name}", peer.name))?;
    qpeer_tests::assert_same_tree(&file, &peer.inbox.join(&name))?;
    eprintln!(
        "[MEASURED] {label}: send of {} MiB, command start to exit {} ms",
        FILE_LEN >> 20,
        elapsed.as_millis()
    );
    Ok(())
}

/// Kills tracker 2 and waits until each of `peers` chose tracker 3 as its new home and
/// registered there (from the lines after `marks`); each one's failover time.
fn fail_over(t2: &mut DhtTracker, t3: &DhtTracker, peers: &[&Peer], marks: &[usize]) -> Result<Instant> {
    t2.tracker.process.kill();
    let killed = Instant::now();
    let mut done: Vec<Option<Duration>> = vec![None; peers.len()];
    // Watch a little longer than the limit, so that a slow failover is measured, not just failed.
    let watch = FAILOVER_LIMIT + Duration::from_secs(5);
    while done.iter().any(Option::is_none) && killed.elapsed() < watch {
        for (i, peer) in peers.iter().enumerate() {
            if done[i].is_some() {
                continue;
            }
            let lines = lines_from(&peer.process.stdout, marks[i]);
            let moved = lines.iter().any(|l| home_of(l) == Some(t3.short.as_str()));
            let registered = lines.iter().any(|l| l.starts_with("[REGISTERED] observed "));
            if moved && registered {
                done[i] = Some(killed.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (peer, time) in peers.iter().zip(done) {
        let time = time.ok_or_else(|| {
            anyhow!(
                "node {} was not registered on tracker {} ({}) within {watch:?} of tracker {}'s death",
                peer.name,
                t3.name,
                t3.short,
                t2.name
            )
        })?;
        eprintln!(
            "[MEASURED] failover of node {}: tracker {} killed to [HOME] {} and [REGISTERED] in {} ms",
            peer.name,
            t2.name,
            t3.name,
            time.as_millis()
        );
        ensure!(
            time <= FAILOVER_LIMIT,
            "node {} took {time:?} to fail over (limit {FAILOVER_LIMIT:?})",
            peer.name
        );
    }
    Ok(killed)
}

/// Whether tracker `t`'s console shows node `short` registering.
fn registered_on(t: &DhtTracker, short: &str) -> bool {
    t.tracker
        .process
        .stdout
        .snapshot()
        .iter()
        .any(|l| l.starts_with("[NEW CONNECTION]") && l.ends_with(short))
}

fn three_trackers(lab: &mut Lab, logs: &mut Logs) -> Result<()> {
    let test_start = Instant::now();
    let mut trackers = start_trackers(lab, logs)?;
    let (a_host, _) = lab.home_host("a", false)?;
    let (b_host, _) = lab.home_host("b", false)?;
    let (c_host, _) = lab.home_host("c", true)?;
    let a_home = home(lab, "a");
    let a_id = node_id(&a_home)?;

    let (t1, t2, t3) = (&trackers[0], &trackers[1], &trackers[2]);
    // One listener after the other: b's registration and record (its home tracker publishing
    // to the DHT) must not slow t2's answer to c's RTT measurement down.
    let mut seqs = Vec::new();
    let mut peers = Vec::new();
    for (name, host) in [("b", &b_host), ("c", &c_host)] {
        let started = Instant::now();
        let peer = start_peer(lab, logs, host, name, &[t2, t3], t2, &a_id)?;
        let (seq, nodes, time) = wait_record(&peer, 0, started, Duration::from_secs(30))?;
        eprintln!(
            "[MEASURED] node {name}: listener start to [RECORD] published seq {seq} on {nodes} DHT nodes in {} ms",
            time.as_millis()
        );
        seqs.push(seq);
        peers.push(peer);
    }
    let [b, c]: [Peer; 2] = peers.try_into().map_err(|_| anyhow!("two listeners"))?;
    for peer in [&b, &c] {
        ensure!(registered_on(t2, peer.short()), "tracker t2 never showed {} registering", peer.name);
        ensure!(!registered_on(t1, peer.short()), "node {} registered on t1 too", peer.name);
        ensure!(!registered_on(t3, peer.short()), "node {} registered on t3 too", peer.name);
    }

    let a = Dialer { host: &a_host, home: a_home, tracker: t1.tracker.addr.clone() };
    reach(lab, logs, &a, &b, t2, true, 1)?;
    reach(lab, logs, &a, &c, t2, false, 1)?;

    let marks = [b.process.stdout.snapshot().len(), c.process.stdout.snapshot().len()];
    let (before, rest) = trackers.split_at_mut(2);
    let (t2, t3) = (&mut before[1], &rest[0]);
    let killed = fail_over(t2, t3, &[&b, &c], &marks)?;
    for ((peer, mark), old) in [&b, &c].into_iter().zip(marks).zip(seqs) {
        let (seq, nodes, time) = wait_record(peer, mark, killed, Duration::from_secs(20))?;
        ensure!(seq > old, "node {}'s new record has seq {seq}, not above {old}", peer.name);
        ensure!(registered_on(t3, peer.short()), "tracker t3 never showed {} registering", peer.name);
        eprintln!(
            "[MEASURED] node {}: new record seq {seq} on {nodes} DHT nodes, seen {} ms after tracker t2 was killed",
            peer.name,
            time.as_millis()
        );
    }
    let t3 = &trackers[2];
    reach(lab, logs, &a, &b, t3, true, 2)?;
    reach(lab, logs, &a, &c, t3, false, 2)?;
    eprintln!("[MEASURED] whole scenario: {} ms", test_start.elapsed().as_millis());
    Ok(())
}

#[test]
#[ignore = "needs root and nftables: see docs/TESTING.md"]
fn three_trackers_found_through_the_dht_and_failover() {
    scenario("three trackers", |lab| {
        let mut logs = Logs::default();
        let result = three_trackers(lab, &mut logs);
        if std::env::var_os("QPEER_LAB_VERBOSE").is_some() {
            eprintln!("{}", logs.dump());
        }
        // Every process is gone by now (dropped with `three_trackers`); its output is not.
        result.map_err(|e| anyhow!("{e:#}\n{}", logs.dump()))
    });
}
