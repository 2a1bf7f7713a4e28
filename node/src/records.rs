//! Home records (see [`qpeer_wire::record`]): ours, signed with our key and published through
//! the home tracker, and our peers', resolved through the home tracker's DHT node, verified
//! here (a tracker only carries them) and cached.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use qpeer_certs::NodeId;
use qpeer_tracker::{ClientError, TrackerClient};
use qpeer_wire::record::{HomeRecord, RecordError, SignedRecord, RECORD_TTL_SECS, REPUBLISH_SECS};
use qpeer_wire::tracker::{ErrorKind, MAX_TRACKER_ADDRS};

use crate::error::{NodeError, TrackerRequest};
use crate::events::NodeEvent;
use crate::shared::Shared;

/// A resolved record is used without asking the DHT again for this long (while it is valid).
const CACHE_FOR: Duration = Duration::from_secs(60);
/// Most peers' records kept.
const MAX_CACHED: usize = 4096;
/// After a failed publish, try again after this.
const RETRY_PUBLISH: Duration = Duration::from_secs(10);

/// Where our own home record stands.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RecordState {
    /// Not published yet (not registered, or the first publish is on its way).
    #[default]
    Unpublished,
    /// The home tracker is in no DHT: peers on other trackers cannot find this node.
    NoDht,
    /// In the DHT with this sequence number, stored on `stored_on` DHT nodes.
    Published { seq: i64, stored_on: u32 },
    /// The last publish failed (it is tried again).
    Failed { reason: String },
}

impl std::fmt::Display for RecordState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordState::Unpublished => f.write_str("not published yet"),
            RecordState::NoDht => f.write_str("not published: the home tracker is in no DHT"),
            RecordState::Published { seq, stored_on } => {
                write!(f, "published, seq {seq}, on {stored_on} DHT nodes")
            }
            RecordState::Failed { reason } => write!(f, "publish failed ({reason}); retrying"),
        }
    }
}

/// A peer's verified record, as resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Located {
    pub(crate) record: HomeRecord,
    pub(crate) seq: i64,
    /// From the cache, not the DHT just now.
    pub(crate) cached: bool,
}

struct Cached {
    record: HomeRecord,
    seq: i64,
    fetched: Instant,
}

/// Peers' records: the newest verified one per peer, and the newest sequence number seen
/// (an older record is refused even after the cached one was dropped).
#[derive(Default)]
pub(crate) struct RecordCache {
    records: Mutex<HashMap<NodeId, Cached>>,
    newest_seq: Mutex<HashMap<NodeId, i64>>,
}

impl RecordCache {
    /// The cached record of `peer`, while fresh and valid.
    fn fresh(&self, peer: &NodeId, now_unix: u64) -> Option<Located> {
        let records = self.records.lock();
        let cached = records.get(peer)?;
        let fresh = cached.fetched.elapsed() < CACHE_FOR && cached.record.check_time(now_unix).is_ok();
        fresh.then(|| Located { record: cached.record.clone(), seq: cached.seq, cached: true })
    }

    /// Verifies `signed` as `peer`'s record at `now_unix`, refusing an older one than seen
    /// before, and keeps it.
    pub(crate) fn accept(
        &self,
        peer: &NodeId,
        signed: &SignedRecord,
        now_unix: u64,
    ) -> Result<Located, RecordError> {
        let record = signed.verify(peer, now_unix)?;
        {
            let mut newest = self.newest_seq.lock();
            let known = newest.get(peer).copied();
            // The same record again is fine; an older one is a replay.
            if let Some(known) = known.filter(|known| signed.seq < *known) {
                return Err(RecordError::Stale { seq: signed.seq, known });
            }
            if newest.len() >= MAX_CACHED && !newest.contains_key(peer) {
                newest.clear();
            }
            newest.insert(*peer, signed.seq);
        }
        let mut records = self.records.lock();
        if records.len() >= MAX_CACHED && !records.contains_key(peer) {
            records.retain(|_, cached| cached.fetched.elapsed() < CACHE_FOR);
        }
        records.insert(*peer, Cached { record: record.clone(), seq: signed.seq, fetched: Instant::now() });
        Ok(Located { record, seq: signed.seq, cached: false })
    }

    /// Drops `peer`'s cached record (its tracker did not hold it, or could not be reached).
    pub(crate) fn forget(&self, peer: &NodeId) {
        self.records.lock().remove(peer);
    }

    /// Drops every cached record naming `tracker` (we lost our connection to it).
    pub(crate) fn forget_tracker(&self, tracker: &NodeId) {
        self.records.lock().retain(|_, cached| cached.record.tracker != *tracker);
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `peer`'s home record: the cached one unless `fresh`, else resolved through `home` and
/// verified. `Ok(None)`: the DHT has none, or the home tracker is in no DHT.
pub(crate) async fn locate(
    shared: &Arc<Shared>,
    home: &TrackerClient,
    peer: NodeId,
    fresh: bool,
) -> Result<Option<Located>, NodeError> {
    let now = unix_now();
    if !fresh {
        if let Some(located) = shared.records.fresh(&peer, now) {
            return Ok(Some(located));
        }
    }
    let started = Instant::now();
    let signed = match home.resolve(peer).await {
        Ok(Some(signed)) => signed,
        Ok(None) | Err(ClientError::Refused { kind: ErrorKind::NoDht, .. }) => return Ok(None),
        Err(source) => return Err(NodeError::TrackerRequest { request: TrackerRequest::Resolve, source }),
    };
    let located = shared
        .records
        .accept(&peer, &signed, unix_now())
        .map_err(|source| NodeError::RecordRefused { peer, source })?;
    shared.events.emit(NodeEvent::PeerResolved {
        peer,
        tracker: located.record.tracker,
        addr: located.record.addrs[0],
        seq: located.seq,
        took: started.elapsed(),
    });
    Ok(Some(located))
}

/// Publishes our home record through `client` (our home tracker, reached at `addr`) and
/// republishes it every [`REPUBLISH_SECS`] until that connection closes.
pub(crate) async fn publish_while_registered(
    shared: Arc<Shared>,
    client: Arc<TrackerClient>,
    addr: SocketAddr,
) {
    let tracker = match client.tracker_id().map_or_else(|| qpeer_certs::peer_node_id(client.connection()), Ok)
    {
        Ok(id) => id,
        Err(e) => return tracing::debug!("no tracker id to publish a record with: {e}"),
    };
    let first = qpeer_wire::canonical(addr);
    let mut addrs = vec![first];
    addrs.extend(client.other_addrs().iter().map(|a| qpeer_wire::canonical(*a)).filter(|a| *a != first));
    addrs.truncate(MAX_TRACKER_ADDRS);
    loop {
        let record =
            HomeRecord { tracker, addrs: addrs.clone(), issued_at: unix_now(), ttl_secs: RECORD_TTL_SECS };
        // The tracker may be slow to answer (a DHT put waits for the DHT): shutting down or
        // losing the connection must not wait for it.
        let published = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = client.closed() => return,
            published = publish_once(&shared, &client, &record) => published,
        };
        let state = match published {
            Ok(published) => RecordState::Published { seq: published.seq, stored_on: published.stored_on },
            Err(PublishError::NoDht) => RecordState::NoDht,
            Err(PublishError::Failed(reason)) => RecordState::Failed { reason },
        };
        let again = match &state {
            RecordState::NoDht => None,
            RecordState::Failed { .. } => Some(RETRY_PUBLISH),
            _ => Some(Duration::from_secs(REPUBLISH_SECS)),
        };
        if client.connection().close_reason().is_some() {
            // This registration is over; the next one reports its own record.
            return;
        }
        shared.tracker.set_record(state.clone());
        shared.events.emit(NodeEvent::RecordChanged(state));
        let wait = async {
            match again {
                Some(again) => tokio::time::sleep(again).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = client.closed() => return,
            _ = wait => {}
        }
    }
}

enum PublishError {
    NoDht,
    Failed(String),
}

async fn publish_once(
    shared: &Shared,
    client: &TrackerClient,
    record: &HomeRecord,
) -> Result<qpeer_tracker::client::Published, PublishError> {
    let seq = shared.tracker.next_record_seq();
    let signed = record.sign(&shared.identity, seq).map_err(|e| PublishError::Failed(e.to_string()))?;
    match client.publish(signed).await {
        Ok(published) => Ok(published),
        Err(ClientError::Refused { kind: ErrorKind::NoDht, .. }) => Err(PublishError::NoDht),
        Err(e) => Err(PublishError::Failed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use qpeer_certs::Identity;

    use super::*;

    fn record(tracker: u8, now: u64) -> HomeRecord {
        HomeRecord {
            tracker: NodeId::from_bytes([tracker; 32]),
            addrs: vec!["198.51.100.3:4433".parse().expect("addr")],
            issued_at: now,
            ttl_secs: RECORD_TTL_SECS,
        }
    }

    #[test]
    fn a_record_signed_by_another_key_is_refused() {
        let peer = Identity::generate().expect("identity");
        let forger = Identity::generate().expect("identity");
        let cache = RecordCache::default();
        let now = unix_now();
        let mut forged = record(2, now).sign(&forger, 10).expect("signed");
        forged.node = peer.node_id();
        assert_eq!(cache.accept(&peer.node_id(), &forged, now), Err(RecordError::BadSignature));
        // The forger's own, honest record is not `peer`'s either.
        let theirs = record(2, now).sign(&forger, 10).expect("signed");
        assert!(matches!(cache.accept(&peer.node_id(), &theirs, now), Err(RecordError::WrongNode { .. })));
        assert!(cache.fresh(&peer.node_id(), now).is_none(), "nothing refused is kept");
    }

    #[test]
    fn an_older_record_than_one_seen_is_refused_even_after_the_cache_forgot() {
        let peer = Identity::generate().expect("identity");
        let id = peer.node_id();
        let cache = RecordCache::default();
        let now = unix_now();
        let new = record(3, now).sign(&peer, 20).expect("signed");
        let old = record(2, now - 60).sign(&peer, 19).expect("signed");
        assert_eq!(
            cache.accept(&id, &new, now).expect("accepted").record.tracker,
            NodeId::from_bytes([3; 32])
        );
        // The same record again (another resolve) is fine.
        assert!(cache.accept(&id, &new, now).is_ok());
        cache.forget(&id);
        assert_eq!(cache.accept(&id, &old, now), Err(RecordError::Stale { seq: 19, known: 20 }));
        // A newer one replaces it.
        let newer = record(4, now).sign(&peer, 21).expect("signed");
        assert_eq!(cache.accept(&id, &newer, now).expect("accepted").seq, 21);
        assert_eq!(cache.fresh(&id, now).expect("cached").record.tracker, NodeId::from_bytes([4; 32]));
        cache.forget_tracker(&NodeId::from_bytes([4; 32]));
        assert!(cache.fresh(&id, now).is_none());
    }

    #[test]
    fn an_expired_record_is_refused() {
        let peer = Identity::generate().expect("identity");
        let cache = RecordCache::default();
        let now = unix_now();
        let old = record(2, now - u64::from(RECORD_TTL_SECS) - 10).sign(&peer, 1).expect("signed");
        assert!(matches!(cache.accept(&peer.node_id(), &old, now), Err(RecordError::Expired { .. })));
    }
}
