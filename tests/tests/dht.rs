//! Several trackers joined by a private Mainline DHT, in one process on loopback: a node finds
//! a peer that lives on another tracker through the peer's signed home record, and reaches
//! it through that tracker (introduction, and its relay when the path must be relayed); a
//! node whose home stops moves to its next tracker and is found there. The DHT is made here,
//! from the trackers' own DHT nodes: nothing contacts the public network. (Hole punching
//! through real NATs across trackers, with the real binaries: `tests/trackers.rs`.)

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use qpeer_node::{NodeError, PeerPath};
use qpeer_tests::dht::{node_on, published, trackers};

#[tokio::test]
async fn a_peer_on_another_tracker_is_found_by_its_record_and_reached_directly_and_relayed() -> Result<()> {
    let mut trackers = trackers(3)?;
    let homes: Vec<_> = (0..4).map(|_| tempfile::tempdir()).collect::<Result<_, _>>()?;
    let a = node_on(&[&trackers[0]], homes[0].path(), false).await?;
    let b = node_on(&[&trackers[1]], homes[1].path(), false).await?;
    published(&b, 0).await?;

    // a's tracker has never heard of b: a finds b's record and meets b at b's tracker.
    let conn = a.connect(b.id()).await?;
    conn.ping(1).await?;
    assert!(matches!(conn.path(), PeerPath::Direct(_) | PeerPath::Relayed), "{}", conn.path());

    // Relay-only nodes: the session must travel through d's tracker's relay, which c
    // reaches on its visit.
    let c = node_on(&[&trackers[0]], homes[2].path(), true).await?;
    let d = node_on(&[&trackers[2]], homes[3].path(), true).await?;
    published(&d, 0).await?;
    let relayed = c.connect(d.id()).await?;
    relayed.ping(2).await?;
    assert_eq!(relayed.path(), PeerPath::Relayed);
    let accepted = tokio::time::timeout(Duration::from_secs(5), d.accept()).await?.expect("accepted");
    assert_eq!(accepted.node_id(), c.id());

    for node in [a, b, c, d] {
        node.shutdown().await;
    }
    for tracker in &mut trackers {
        tracker.stop().await;
    }
    Ok(())
}

#[tokio::test]
async fn a_record_naming_a_tracker_that_does_not_hold_the_node_is_refused() -> Result<()> {
    let mut trackers = trackers(3)?;
    let homes: Vec<_> = (0..2).map(|_| tempfile::tempdir()).collect::<Result<_, _>>()?;
    let b = node_on(&[&trackers[1]], homes[1].path(), false).await?;
    published(&b, 0).await?;
    let b_id = b.id();
    // b leaves; its record (good for minutes) still names tracker 2.
    b.shutdown().await;

    let a = node_on(&[&trackers[0]], homes[0].path(), false).await?;
    match a.connect(b_id).await {
        Err(e) => match e.root() {
            NodeError::StaleRecord { peer, .. } if *peer == b_id => {}
            other => bail!("expected a stale record, got: {other}"),
        },
        Ok(_) => bail!("connected to a node that left"),
    }
    a.shutdown().await;
    for tracker in &mut trackers {
        tracker.stop().await;
    }
    Ok(())
}

#[tokio::test]
async fn a_node_whose_home_stops_moves_to_its_next_tracker_and_is_found_there() -> Result<()> {
    let mut trackers = trackers(3)?;
    let homes: Vec<_> = (0..3).map(|_| tempfile::tempdir()).collect::<Result<_, _>>()?;
    // b lists trackers 2 and 3; on loopback their RTTs tie, so the first listed is home.
    let b = node_on(&[&trackers[1], &trackers[2]], homes[1].path(), false).await?;
    let first_seq = published(&b, 0).await?;
    let home = b.home_tracker().expect("registered");
    ensure!(home.host_port == trackers[1].addr.host_port(), "home is {}", home.host_port);

    let a = node_on(&[&trackers[0]], homes[0].path(), false).await?;
    a.connect(b.id()).await?.ping(1).await?;

    let stopped = Instant::now();
    trackers[1].stop().await;
    let registrations = b.registrations();
    while b.registrations() == registrations || b.observed_addr().is_none() {
        ensure!(stopped.elapsed() < Duration::from_secs(10), "b did not move within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let home = b.home_tracker().expect("registered");
    ensure!(home.host_port == trackers[2].addr.host_port(), "b moved to {}", home.host_port);
    published(&b, first_seq).await?;

    // A node that never met b finds it on its new home.
    let fresh = node_on(&[&trackers[0]], homes[2].path(), false).await?;
    fresh.connect(b.id()).await?.ping(2).await?;
    // And a, whose visit to tracker 2 is gone, finds it again.
    a.connect(b.id()).await?.ping(3).await?;

    for node in [a, b, fresh] {
        node.shutdown().await;
    }
    for tracker in &mut trackers {
        tracker.stop().await;
    }
    Ok(())
}
