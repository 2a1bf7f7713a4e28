//! Trackers in a Mainline DHT: publishing and resolving home records. Every DHT here is a
//! private one on loopback (a `mainline::Testnet`, or trackers bootstrapping from each
//! other): nothing contacts the public network.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use mainline::Testnet;
use qpeer_certs::config::PINNED_SERVER_NAME;
use qpeer_certs::{Identity, NodeId, ServerTrust};
use qpeer_tracker::client::RegisterInfo;
use qpeer_tracker::{
    ClientError, DhtConfig, Limits, ServerEvents, Tracker, TrackerClient, TrackerConfig, TrackerEvent,
};
use qpeer_wire::record::{HomeRecord, SignedRecord, RECORD_TTL_SECS};
use qpeer_wire::tracker::ErrorKind;
use tokio::sync::{mpsc, oneshot};

struct RunningTracker {
    addr: SocketAddr,
    id: NodeId,
    dht_addr: Option<SocketAddrV4>,
    events: Option<ServerEvents>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningTracker {
    async fn start(dht: Option<DhtConfig>, limits: Limits) -> Self {
        let identity = Arc::new(Identity::generate().expect("identity"));
        let mut config = TrackerConfig::new((Ipv4Addr::LOCALHOST, 0).into(), identity);
        config.dht = dht;
        config.limits = limits;
        config.console = true;
        let mut tracker = Tracker::bind(config).expect("bind tracker");
        let events = tracker.events();
        let (stop, stopped) = oneshot::channel::<()>();
        let (addr, id, dht_addr) = (tracker.local_addr(), tracker.node_id(), tracker.dht_addr());
        let task = tokio::spawn(tracker.run(async {
            let _ = stopped.await;
        }));
        Self { addr, id, dht_addr, events, stop: Some(stop), task }
    }

    /// A tracker in the DHT that `testnet` runs.
    async fn on(testnet: &Testnet) -> Self {
        Self::start(Some(DhtConfig::private(loopback_any(), bootstrap_of(testnet))), Limits::default()).await
    }

    /// The next console line that starts with `prefix` (earlier ones are skipped).
    async fn line_starting(&mut self, prefix: &str) -> String {
        let events = self.events.as_mut().expect("console events");
        let wait = async {
            while let Some(event) = events.recv().await {
                let text = event.to_string();
                if let Some(line) = text.lines().find(|line| line.starts_with(prefix)) {
                    return line.to_string();
                }
            }
            panic!("the tracker's events ended before a {prefix:?} line");
        };
        tokio::time::timeout(Duration::from_secs(20), wait).await.expect("the line within 20 s")
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

fn loopback_any() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)
}

fn testnet() -> Testnet {
    Testnet::builder(3).bind_address(Ipv4Addr::LOCALHOST).build().expect("a testnet on loopback")
}

fn bootstrap_of(testnet: &Testnet) -> Vec<SocketAddrV4> {
    testnet.bootstrap.iter().map(|addr| addr.parse().expect("an IPv4 socket address")).collect()
}

struct TestNode {
    identity: Identity,
    client: TrackerClient,
    _endpoint: quinn::Endpoint,
    _events: mpsc::Receiver<TrackerEvent>,
}

async fn register(tracker: &RunningTracker, visitor: bool) -> TestNode {
    let identity = Identity::generate().expect("identity");
    let endpoint = quinn::Endpoint::client((Ipv4Addr::LOCALHOST, 0).into()).expect("client endpoint");
    let candidates = vec![endpoint.local_addr().expect("addr")];
    let (client, events) = TrackerClient::connect(
        &endpoint,
        &identity,
        tracker.addr,
        PINNED_SERVER_NAME,
        &ServerTrust::Pinned(tracker.id),
        RegisterInfo { candidates, name: None, incarnation: 1, visitor },
    )
    .await
    .expect("register");
    TestNode { identity, client, _endpoint: endpoint, _events: events }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs()
}

/// `signer`'s record saying it lives on `tracker`, with sequence number `seq`.
fn record(signer: &Identity, tracker: &RunningTracker, seq: i64) -> SignedRecord {
    home(tracker.id, tracker.addr).sign(signer, seq).expect("sign")
}

fn home(tracker: NodeId, addr: SocketAddr) -> HomeRecord {
    HomeRecord { tracker, addrs: vec![addr], issued_at: unix_now(), ttl_secs: RECORD_TTL_SECS }
}

fn refused_as(result: Result<impl std::fmt::Debug, ClientError>, expected: ErrorKind) -> String {
    match result {
        Err(ClientError::Refused { kind, message }) if kind == expected => message,
        other => panic!("expected a {expected:?} refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_published_on_one_tracker_resolves_through_another_and_verifies() {
    let testnet = testnet();
    let mut home_tracker = RunningTracker::on(&testnet).await;
    let mut other_tracker = RunningTracker::on(&testnet).await;
    let dht_line = home_tracker.line_starting("[DHT]").await;
    assert!(dht_line.starts_with("[DHT] listening on 127.0.0.1:"), "{dht_line}");
    assert!(dht_line.ends_with(&format!("(bootstrap: {})", testnet.bootstrap.join(", "))), "{dht_line}");

    let node = register(&home_tracker, false).await;
    let node_id = node.identity.node_id();
    let published = node.client.publish(record(&node.identity, &home_tracker, 1)).await.expect("publish");
    assert_eq!(published.seq, 1);
    assert!(published.stored_on >= 1, "stored on {} DHT nodes", published.stored_on);
    assert_eq!(
        home_tracker.line_starting("[PUBLISHED]").await,
        format!("[PUBLISHED] {} seq 1 on {} DHT nodes", node_id.short(), published.stored_on)
    );

    let dialer = register(&other_tracker, false).await;
    let found = dialer.client.resolve(node_id).await.expect("resolve").expect("a record");
    let verified = found.verify(&node_id, unix_now()).expect("the record verifies");
    assert_eq!((found.seq, verified.tracker, verified.addrs), (1, home_tracker.id, vec![home_tracker.addr]));
    assert_eq!(
        other_tracker.line_starting("[RESOLVED]").await,
        format!("[RESOLVED] {} \u{2192} tracker {} seq 1", node_id.short(), home_tracker.id.short())
    );

    // A newer record replaces it.
    node.client.publish(record(&node.identity, &home_tracker, 2)).await.expect("publish seq 2");
    let found = dialer.client.resolve(node_id).await.expect("resolve").expect("a record");
    assert_eq!(found.seq, 2);

    home_tracker.stop().await;
    other_tracker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_stale_and_misdirected_records_are_refused() {
    let testnet = testnet();
    let mut tracker = RunningTracker::on(&testnet).await;
    let node = register(&tracker, false).await;
    let node_id = node.identity.node_id();
    let other = Identity::generate().expect("identity");

    // Signed by another key, claiming to be this node's.
    let mut forged = record(&other, &tracker, 1);
    forged.node = node_id;
    let message = refused_as(node.client.publish(forged).await, ErrorKind::BadRecord);
    assert!(message.contains("not signed by"), "{message}");
    assert_eq!(
        tracker.line_starting("[PUBLISH REFUSED]").await,
        format!("[PUBLISH REFUSED] {}: {message}", node_id.short())
    );
    // Honestly another node's record: this connection is not that node.
    refused_as(node.client.publish(record(&other, &tracker, 1)).await, ErrorKind::BadRecord);
    // Naming a tracker that does not hold this node.
    let elsewhere = home(other.node_id(), "127.0.0.1:9".parse().expect("addr")).sign(&node.identity, 1);
    let message = refused_as(node.client.publish(elsewhere.expect("sign")).await, ErrorKind::BadRecord);
    assert!(message.contains(&other.node_id().to_string()), "{message}");
    // Expired.
    let mut old = home(tracker.id, tracker.addr);
    old.issued_at -= u64::from(RECORD_TTL_SECS) + 60;
    refused_as(node.client.publish(old.sign(&node.identity, 1).expect("sign")).await, ErrorKind::BadRecord);

    // Sequence numbers only go up.
    node.client.publish(record(&node.identity, &tracker, 5)).await.expect("seq 5");
    for stale in [5, 4] {
        let message = refused_as(
            node.client.publish(record(&node.identity, &tracker, stale)).await,
            ErrorKind::BadRecord,
        );
        assert!(message.contains("not newer"), "{message}");
    }
    node.client.publish(record(&node.identity, &tracker, 6)).await.expect("seq 6");
    tracker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visitor_is_introduced_but_not_listed_and_cannot_publish() {
    // The first node of a private DHT of its own: nothing to contact.
    let mut tracker =
        RunningTracker::start(Some(DhtConfig::private(loopback_any(), Vec::new())), Limits::default()).await;
    assert!(tracker.line_starting("[DHT]").await.ends_with("(bootstrap: none)"));
    let resident = register(&tracker, false).await;
    assert!(tracker.line_starting("[NEW CONNECTION]").await.ends_with(&resident.identity.node_id().short()));
    let visitor = register(&tracker, true).await;
    let line = tracker.line_starting("[NEW CONNECTION]").await;
    assert!(line.ends_with(&format!("{} (visitor)", visitor.identity.node_id().short())), "{line}");

    let listed: Vec<NodeId> =
        resident.client.list_all().await.expect("list").into_iter().map(|p| p.node_id).collect();
    assert_eq!(listed, vec![resident.identity.node_id()], "a visitor is not listed");
    let intro = visitor.client.introduce(resident.identity.node_id()).await.expect("a visitor is introduced");
    assert_eq!(intro.peer, resident.identity.node_id());

    let message = refused_as(
        visitor.client.publish(record(&visitor.identity, &tracker, 1)).await,
        ErrorKind::InvalidRequest,
    );
    assert!(message.contains("visitor"), "{message}");
    tracker.stop().await;
}

#[tokio::test]
async fn a_tracker_without_a_dht_answers_no_dht() {
    let tracker = RunningTracker::start(None, Limits::default()).await;
    assert_eq!(tracker.dht_addr, None);
    let node = register(&tracker, false).await;
    refused_as(node.client.publish(record(&node.identity, &tracker, 1)).await, ErrorKind::NoDht);
    refused_as(node.client.resolve(node.identity.node_id()).await, ErrorKind::NoDht);
    tracker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_node_resolves_to_no_record() {
    let testnet = testnet();
    let mut tracker = RunningTracker::on(&testnet).await;
    let node = register(&tracker, false).await;
    let unknown = Identity::generate().expect("identity").node_id();
    assert_eq!(node.client.resolve(unknown).await.expect("resolve"), None);
    assert_eq!(
        tracker.line_starting("[RESOLVED]").await,
        format!("[RESOLVED] {}: no record", unknown.short())
    );
    tracker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_requests_are_rate_limited_per_node() {
    let limits = Limits { dht_requests_per_sec: 0, dht_request_burst: 2, ..Limits::default() };
    let tracker = RunningTracker::start(Some(DhtConfig::private(loopback_any(), Vec::new())), limits).await;
    let a = register(&tracker, false).await;
    let b = register(&tracker, false).await;
    let unknown = Identity::generate().expect("identity").node_id();
    for _ in 0..2 {
        a.client.resolve(unknown).await.expect("within the burst");
    }
    refused_as(a.client.resolve(unknown).await, ErrorKind::RateLimited);
    refused_as(a.client.publish(record(&a.identity, &tracker, 1)).await, ErrorKind::RateLimited);
    b.client.resolve(unknown).await.expect("b is not limited by a's bucket");
    tracker.stop().await;
}

/// The lab's layout: three trackers, the first started alone, the others joining through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trackers_form_a_private_dht_through_each_other() {
    let first =
        RunningTracker::start(Some(DhtConfig::private(loopback_any(), Vec::new())), Limits::default()).await;
    let seed = first.dht_addr.expect("a DHT address");
    let joined = || DhtConfig::private(loopback_any(), vec![seed]);
    let second = RunningTracker::start(Some(joined()), Limits::default()).await;
    let third = RunningTracker::start(Some(joined()), Limits::default()).await;

    let node = register(&second, false).await;
    let node_id = node.identity.node_id();
    let published = node.client.publish(record(&node.identity, &second, 1)).await.expect("publish");
    assert!(published.stored_on >= 1, "stored on {}", published.stored_on);
    let dialer = register(&third, false).await;
    let found = dialer.client.resolve(node_id).await.expect("resolve").expect("a record");
    assert_eq!(found.verify(&node_id, unix_now()).expect("verifies").tracker, second.id);

    // The publishing tracker stops (its DHT node too): the others still hold the record.
    let second_id = second.id;
    second.stop().await;
    let found = dialer.client.resolve(node_id).await.expect("resolve").expect("still a record");
    assert_eq!(found.verify(&node_id, unix_now()).expect("verifies").tracker, second_id);

    for tracker in [first, third] {
        tracker.stop().await;
    }
}
