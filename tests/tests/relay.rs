//! The relay path between two in-process nodes: one node is relay-only, so the nodes' own
//! QUIC connection must travel through the tracker.

use std::time::Duration;

use anyhow::Result;
use qpeer_node::transfer::receive::{AcceptPolicy, ReceiveConfig, Receiver};
use qpeer_node::transfer::scan::scan;
use qpeer_node::transfer::send::send;
use qpeer_node::Events;
use qpeer_node::{Node, PeerPath as Path};
use qpeer_tests::{connection_fingerprint, node, TestTracker};

async fn relay_only_node(tracker: &TestTracker, home: &std::path::Path) -> Result<Node> {
    let node = Node::builder()
        .home(home)
        .bind_addr(([127, 0, 0, 1], 0).into())
        .tracker(tracker.tracker_addr())
        .relay_only(true)
        .bind()
        .await?;
    node.registered(Duration::from_secs(10)).await?;
    Ok(node)
}

#[tokio::test]
async fn relayed_connection_pings_and_transfers_end_to_end() -> Result<()> {
    let tracker = TestTracker::start()?;
    let stats = tracker.stats();
    let home = tempfile::tempdir()?;
    let relayed = relay_only_node(&tracker, home.path()).await?;
    let direct = node(&tracker).await?;

    // Whichever side dials by the role rule, the path is the relay.
    let conn = relayed.connect(direct.id()).await?;
    assert_eq!(conn.path(), Path::Relayed);
    conn.ping(1).await?;
    let accepted = tokio::time::timeout(Duration::from_secs(5), direct.accept()).await?.expect("accepted");
    assert_eq!(accepted.path(), Path::Relayed);
    assert_eq!(connection_fingerprint(conn.connection())?, connection_fingerprint(accepted.connection())?);

    // A 20 MiB file, end to end through the relay.
    let out = tempfile::tempdir()?;
    let receiver = Receiver::new(ReceiveConfig {
        out: Some(out.path().to_path_buf()),
        policy: AcceptPolicy::Only([relayed.id()].into_iter().collect()),
        events: Events::new(),
    });
    tokio::spawn(receiver.serve(accepted));
    let src = tempfile::tempdir()?;
    let file = src.path().join("relayed.bin");
    let data: Vec<u8> = (0..20u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&file, &data)?;
    let paths = vec![file.clone()];
    let plan = tokio::task::spawn_blocking(move || scan(&paths)).await??;
    let report = send(&conn, plan, &Events::new()).await?;
    assert_eq!(report.total_bytes, data.len() as u64);
    assert_eq!(std::fs::read(out.path().join("relayed.bin"))?, data);
    assert!(stats.relayed_bytes() > data.len() as u64, "the bytes went through the tracker");
    relayed.shutdown().await;
    direct.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_direct_path_is_preferred_when_it_validates() -> Result<()> {
    let tracker = TestTracker::start()?;
    let stats = tracker.stats();
    let a = node(&tracker).await?;
    let b = node(&tracker).await?;
    let conn = a.connect(b.id()).await?;
    assert!(matches!(conn.path(), Path::Direct(_)));
    conn.ping(1).await?;
    // The relay link was prepared in parallel; at most the first handshake packets, sent
    // before a probe answered, went through it.
    assert!(stats.relayed_bytes() < 32 * 1024, "{} bytes relayed", stats.relayed_bytes());
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_relay_only_node_and_a_no_relay_node_have_no_path_and_say_why() -> Result<()> {
    let tracker = TestTracker::start()?;
    let home = tempfile::tempdir()?;
    let relayed = relay_only_node(&tracker, home.path()).await?;
    let home = tempfile::tempdir()?;
    let direct_only = Node::builder()
        .home(home.path())
        .bind_addr(([127, 0, 0, 1], 0).into())
        .tracker(tracker.tracker_addr())
        .no_relay(true)
        .connect_timeout(Duration::from_secs(2))
        .bind()
        .await?;
    direct_only.registered(Duration::from_secs(10)).await?;
    let started = std::time::Instant::now();
    match direct_only.connect(relayed.id()).await {
        Err(qpeer_node::NodeError::Unreachable { peer, reason, .. }) => {
            let reason = reason.to_string();
            assert_eq!(peer, relayed.id());
            assert!(reason.contains("--no-relay"), "{reason}");
        }
        other => panic!("expected no path, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(4), "the connect timeout holds");
    // Both settings at once leave no path at all: refused at start.
    let home = tempfile::tempdir()?;
    let both = Node::builder()
        .home(home.path())
        .tracker(tracker.tracker_addr())
        .relay_only(true)
        .no_relay(true)
        .bind()
        .await;
    assert!(matches!(both, Err(qpeer_node::NodeError::Conflict(_))));
    relayed.shutdown().await;
    direct_only.shutdown().await;
    Ok(())
}
