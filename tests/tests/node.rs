//! Node integration tests on loopback: a real tracker and real nodes in one process.

use std::time::Duration;

use anyhow::Result;
use qpeer_node::{NodeError, PeerPath as Path};
use qpeer_tests::{connection_fingerprint, init_tracing, node, TestTracker};
use qpeer_tracker::Limits;

#[tokio::test]
async fn ping_both_ways_over_a_direct_path() -> Result<()> {
    init_tracing();
    let tracker = TestTracker::start()?;
    let a = node(&tracker).await?;
    let b = node(&tracker).await?;
    let conn = a.connect(b.id()).await?;
    assert_eq!(conn.node_id(), b.id());
    assert_eq!(conn.path(), Path::Direct(b.local_addr()));
    assert!(conn.ping(1).await? < Duration::from_secs(1));
    let back = b.connect(a.id()).await?;
    assert_eq!(back.path(), Path::Direct(a.local_addr()));
    back.ping(2).await?;
    assert_eq!(
        connection_fingerprint(conn.connection())?,
        connection_fingerprint(back.connection())?,
        "the second connect reuses the one connection"
    );
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn connection_arrives_at_accept_on_the_other_side() -> Result<()> {
    let tracker = TestTracker::start()?;
    let a = node(&tracker).await?;
    let b = node(&tracker).await?;
    // Whichever side dials by id order, the side that did not ask sees the connection in accept().
    let conn = a.connect(b.id()).await?;
    let accepted = tokio::time::timeout(Duration::from_secs(5), b.accept()).await?.expect("accepted");
    assert_eq!(accepted.node_id(), a.id());
    assert_eq!(connection_fingerprint(conn.connection())?, connection_fingerprint(accepted.connection())?);
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn single_socket_tracker_and_peers_share_one_address() -> Result<()> {
    let tracker = TestTracker::start()?;
    let a = node(&tracker).await?;
    let b = node(&tracker).await?;
    let c = node(&tracker).await?;
    let ab = a.connect(b.id()).await?;
    let ac = a.connect(c.id()).await?;
    // What the tracker observed for a, and the direct path b and c reach a on, are all a's
    // one socket (quinn itself sees each session's stable virtual address).
    let observed = a.observed_addr().expect("registered");
    assert_eq!(observed, a.local_addr());
    let at_b = peer_of(&b, a.id()).await;
    let at_c = peer_of(&c, a.id()).await;
    assert_eq!(at_b.path(), Path::Direct(observed));
    assert_eq!(at_c.path(), Path::Direct(observed));
    assert_eq!(ab.path(), Path::Direct(b.observed_addr().expect("b registered")));
    assert_eq!(ac.path(), Path::Direct(c.observed_addr().expect("c registered")));
    for n in [&a, &b, &c] {
        n.shutdown().await;
    }
    Ok(())
}

/// `node`'s connection to `peer`, waiting briefly for the side that did not dial to install it.
async fn peer_of(node: &qpeer_node::Node, peer: qpeer_certs::NodeId) -> qpeer_node::PeerConnection {
    for _ in 0..100 {
        if let Some(conn) = node.peers().into_iter().find(|p| p.node_id() == peer) {
            return conn;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{} never got a connection to {peer}", node.id());
}

#[tokio::test]
async fn simultaneous_connects_end_with_exactly_one_connection() -> Result<()> {
    let tracker = TestTracker::start_with(Limits {
        max_connections_per_ip: 1024,
        introductions_per_sec: 1000,
        introduction_burst: 1000,
        ..Limits::default()
    })?;
    for round in 0..50 {
        let started = std::time::Instant::now();
        let a = node(&tracker).await?;
        let b = node(&tracker).await?;
        let (ab, ba) = tokio::join!(a.connect(b.id()), b.connect(a.id()));
        let (ab, ba) = (ab?, ba?);
        assert_eq!(
            connection_fingerprint(ab.connection())?,
            connection_fingerprint(ba.connection())?,
            "round {round}: both sides must hold the same connection"
        );
        // Give any stray second connection time to appear, then check nothing replaced it.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(ab.is_open() && ba.is_open(), "round {round}: the chosen connection stays open");
        assert_eq!(a.peers().len(), 1, "round {round}");
        assert_eq!(b.peers().len(), 1, "round {round}");
        assert_eq!(
            connection_fingerprint(a.peers()[0].connection())?,
            connection_fingerprint(b.peers()[0].connection())?,
            "round {round}"
        );
        ab.ping(1).await?;
        ba.ping(2).await?;
        let connected = started.elapsed();
        a.shutdown().await;
        b.shutdown().await;
        eprintln!("round {round}: connected {connected:?}, shut down {:?}", started.elapsed() - connected);
    }
    Ok(())
}

#[tokio::test]
async fn nodes_re_register_after_a_tracker_restart() -> Result<()> {
    let mut tracker = TestTracker::start()?;
    let a = node(&tracker).await?;
    let b = node(&tracker).await?;
    tracker.stop().await;
    // Both notice the loss (the tracker closed with a reason).
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(a.observed_addr().is_none() && b.observed_addr().is_none());
    tracker.restart()?;
    let restarted = std::time::Instant::now();
    a.registered(Duration::from_secs(5)).await?;
    b.registered(Duration::from_secs(5)).await?;
    assert!(restarted.elapsed() < Duration::from_secs(5));
    let conn = a.connect(b.id()).await?;
    conn.ping(1).await?;
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_wrong_tracker_id_is_refused() -> Result<()> {
    let tracker = TestTracker::start()?;
    let home = tempfile::tempdir()?;
    let mut wrong = tracker.tracker_addr();
    let expected = qpeer_certs::Identity::generate()?.node_id();
    wrong.node_id = Some(expected);
    let node = qpeer_node::Node::builder()
        .home(home.path())
        .bind_addr(([127, 0, 0, 1], 0).into())
        .tracker(wrong)
        .bind()
        .await?;
    match node.registered(Duration::from_secs(5)).await {
        Err(NodeError::TrackerIdMismatch(mismatch)) => {
            assert_eq!(mismatch.expected, expected);
            assert_eq!(mismatch.actual, tracker.identity.node_id());
        }
        other => panic!("expected a tracker id mismatch, got {other:?}"),
    }
    node.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn trust_on_first_use_remembers_the_tracker_and_refuses_a_changed_one() -> Result<()> {
    let home = tempfile::tempdir()?;
    let mut first = TestTracker::start()?;
    let mut plain = first.tracker_addr();
    plain.node_id = None;
    let node = qpeer_node::Node::builder()
        .home(home.path())
        .bind_addr(([127, 0, 0, 1], 0).into())
        .tracker(plain.clone())
        .bind()
        .await?;
    node.registered(Duration::from_secs(5)).await?;
    node.shutdown().await;
    let known = std::fs::read_to_string(home.path().join("known_trackers"))?;
    assert!(known.contains(&first.identity.node_id().to_string()), "{known}");
    first.stop().await;

    // Another tracker (another key) on the same address.
    let impostor = qpeer_certs::Identity::generate()?;
    let mut config = qpeer_tracker::TrackerConfig::new(first.addr, std::sync::Arc::new(impostor));
    config.console = false;
    let tracker = qpeer_tracker::Tracker::bind(config)?;
    let impostor_id = tracker.node_id();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(tracker.run(async {
        let _ = stopped.await;
    }));
    let node = qpeer_node::Node::builder()
        .home(home.path())
        .bind_addr(([127, 0, 0, 1], 0).into())
        .tracker(plain)
        .bind()
        .await?;
    match node.registered(Duration::from_secs(5)).await {
        Err(e @ NodeError::TrackerIdMismatch(_)) => {
            let text = e.to_string();
            assert!(text.contains("known_trackers") && text.contains("line 1"), "{text}");
            assert!(text.contains(&impostor_id.to_string()), "{text}");
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    node.shutdown().await;
    let _ = stop.send(());
    let _ = task.await;
    Ok(())
}

#[tokio::test]
async fn connecting_to_an_unregistered_node_is_a_typed_error() -> Result<()> {
    let tracker = TestTracker::start()?;
    let a = node(&tracker).await?;
    let stranger = qpeer_certs::Identity::generate()?.node_id();
    assert!(matches!(a.connect(stranger).await, Err(NodeError::PeerNotFound(id)) if id == stranger));
    assert!(matches!(a.connect(a.id()).await, Err(NodeError::SelfConnect)));
    a.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_dual_stack_node_reaches_an_ipv4_node_directly() -> Result<()> {
    // An IPv6 socket (dual-stack on Linux) sees IPv4 peers as v4-mapped addresses; the path
    // layer keeps them plain IPv4, and maps them back for the socket.
    let tracker = TestTracker::start()?;
    let home = tempfile::tempdir()?;
    let dual = qpeer_node::Node::builder()
        .home(home.path())
        .bind_addr("[::]:0".parse()?)
        .tracker(tracker.tracker_addr())
        .bind()
        .await?;
    dual.registered(Duration::from_secs(10)).await?;
    let v4 = node(&tracker).await?;
    let conn = dual.connect(v4.id()).await?;
    conn.ping(1).await?;
    assert_eq!(conn.path(), Path::Direct(v4.local_addr()));
    let back = peer_of(&v4, dual.id()).await;
    assert!(matches!(back.path(), Path::Direct(addr) if addr.is_ipv4()), "{}", back.path());
    back.ping(2).await?;
    dual.shutdown().await;
    v4.shutdown().await;
    Ok(())
}
