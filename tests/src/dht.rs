//! Trackers joined by a private Mainline DHT, in one process on loopback (each DHT node binds
//! 127.0.0.1; the first bootstraps from nobody, the others from it: nothing reaches the
//! public network).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use qpeer_certs::Identity;
use qpeer_node::{Node, RecordState};
use qpeer_tracker::dht::DhtConfig;
use qpeer_tracker::{Tracker, TrackerAddr, TrackerConfig};
use tokio::sync::oneshot;

/// An in-process tracker with a DHT node.
pub struct DhtTracker {
    pub addr: TrackerAddr,
    pub dht: SocketAddrV4,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl DhtTracker {
    /// A tracker whose DHT node joins through `bootstrap` (none: the first node).
    pub fn start(bootstrap: &[SocketAddrV4]) -> Result<Self> {
        let mut config = TrackerConfig::new((Ipv4Addr::LOCALHOST, 0).into(), Arc::new(Identity::generate()?));
        config.dht = Some(DhtConfig::private(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), bootstrap.to_vec()));
        let tracker = Tracker::bind(config)?;
        let addr = tracker.tracker_string().parse()?;
        let Some(dht) = tracker.dht_addr() else { bail!("the tracker has no DHT node") };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(tracker.run(async {
            let _ = stopped.await;
        }));
        Ok(Self { addr, dht, stop: Some(stop), task: Some(task) })
    }

    /// Stops the tracker (its nodes see their connection closed) and waits for it.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// `n` trackers in one private DHT, each joined through the first.
pub fn trackers(n: usize) -> Result<Vec<DhtTracker>> {
    let first = DhtTracker::start(&[])?;
    let bootstrap = [first.dht];
    let mut all = vec![first];
    for _ in 1..n {
        all.push(DhtTracker::start(&bootstrap)?);
    }
    Ok(all)
}

/// A registered node on 127.0.0.1 with these trackers (in order of preference).
pub async fn node_on(trackers: &[&DhtTracker], home: &std::path::Path, relay_only: bool) -> Result<Node> {
    let node = Node::builder()
        .home(home)
        .bind_addr((Ipv4Addr::LOCALHOST, 0).into())
        .trackers(trackers.iter().map(|t| t.addr.clone()))
        .relay_only(relay_only)
        .bind()
        .await?;
    node.registered(Duration::from_secs(10)).await?;
    Ok(node)
}

/// Waits until `node`'s home record is in the DHT, newer than `after` (a sequence number).
pub async fn published(node: &Node, after: i64) -> Result<i64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match node.record_state() {
            RecordState::Published { seq, stored_on } if stored_on > 0 && seq > after => return Ok(seq),
            state if tokio::time::Instant::now() > deadline => bail!("record not published: {state}"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}
