//! The tracker's node in the BitTorrent Mainline DHT (the `mainline` crate, BEP 5 + BEP 44):
//! it publishes the home records its nodes sign, as BEP 44 mutable items (key = the NodeId,
//! salt = [`RECORD_SALT`]), and resolves other nodes' records for its nodes.
//!
//! The DHT node runs on a thread of its own (mainline's actor); sessions talk to it through
//! its async handle and never block their frame loop on it. It always runs in server mode: a
//! tracker is a public, long-running server, so it stores other trackers' items too.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use mainline::async_dht::AsyncDht;
use mainline::errors::{ConcurrencyError, PutMutableError};
use mainline::{Dht, MutableItem};
use parking_lot::Mutex;
use qpeer_certs::NodeId;
use qpeer_wire::record::{SignedRecord, RECORD_SALT};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::events::ServerEvent;

/// DHT queries (publish or resolve) in flight at once over the whole tracker; more are
/// answered `Busy`. mainline runs every query on one thread.
pub const MAX_DHT_QUERIES: usize = 256;

/// How the tracker joins the Mainline DHT (see [`crate::TrackerConfig::dht`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhtConfig {
    /// The DHT node's UDP address (IPv4 only: mainline speaks BEP 5 over IPv4). Port 0 picks
    /// a free port. A specific, public-looking IP also becomes the node's BEP 42 public IP,
    /// so that its DHT id is one other nodes accept as secure.
    pub listen: SocketAddrV4,
    /// The DHT nodes to join through. Empty and not `public`: this is the first node of a
    /// private DHT, which others join through it.
    pub bootstrap: Vec<SocketAddrV4>,
    /// Join the public Mainline network through its well-known bootstrap nodes (and
    /// `bootstrap`, if any). Never in tests: they make their own DHT.
    pub public: bool,
}

impl DhtConfig {
    /// A node of a private DHT joined through `bootstrap` (none: the first node).
    pub fn private(listen: SocketAddrV4, bootstrap: Vec<SocketAddrV4>) -> Self {
        Self { listen, bootstrap, public: false }
    }

    /// A node of the public Mainline network.
    pub fn public(listen: SocketAddrV4) -> Self {
        Self { listen, bootstrap: Vec::new(), public: true }
    }
}

/// The DHT node could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the DHT node on {addr}: {source}")]
pub struct DhtError {
    pub addr: SocketAddrV4,
    #[source]
    pub source: std::io::Error,
}

/// Why a publish did not happen.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PublishError {
    #[error("the record's signature is not 64 bytes")]
    SignatureLength,
    #[error("the DHT holds a newer record of this node")]
    NotMostRecent,
    #[error("another publish of this node is in flight; retry shortly")]
    Conflict,
    #[error("the DHT did not store the record: {0}")]
    Failed(String),
    #[error("the tracker's DHT node has stopped")]
    Stopped,
}

/// The running DHT node and the tracker's query budget.
#[derive(Debug)]
pub(crate) struct TrackerDht {
    /// mainline's thread runs while a handle to it exists: [`TrackerDht::stop`] drops this
    /// one, and queries hold theirs only while they run.
    dht: Mutex<Option<AsyncDht>>,
    /// Where the DHT node listens.
    pub(crate) addr: SocketAddrV4,
    queries: Arc<Semaphore>,
}

/// True for an IPv4 address that could be the node's public one (BEP 42 ids are computed
/// from it): not unspecified, loopback, private, link-local, carrier-grade NAT, broadcast
/// or multicast.
pub(crate) fn global_looking(ip: Ipv4Addr) -> bool {
    let carrier_nat = ip.octets()[0] == 100 && (ip.octets()[1] & 0xc0) == 64;
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || carrier_nat)
}

impl TrackerDht {
    /// Starts the DHT node for `config`; returns it and the `[DHT]` event to report.
    pub(crate) fn start(config: &DhtConfig) -> Result<(Self, ServerEvent), DhtError> {
        let mut builder = Dht::builder();
        builder.server_mode().port(config.listen.port()).bind_address(*config.listen.ip());
        if global_looking(*config.listen.ip()) {
            builder.public_ip(*config.listen.ip());
        }
        if config.public {
            // mainline's default bootstrap (the public network), plus any given.
            if !config.bootstrap.is_empty() {
                builder.extra_bootstrap(&config.bootstrap);
            }
        } else if config.bootstrap.is_empty() {
            builder.no_bootstrap();
        } else {
            builder.bootstrap(&config.bootstrap);
        }
        let dht = builder.build().map_err(|source| DhtError { addr: config.listen, source })?;
        // A channel round trip to mainline's thread, which just started.
        #[allow(deprecated)]
        let addr = dht.info().local_addr();
        let event =
            ServerEvent::DhtListening { addr, bootstrap: config.bootstrap.clone(), public: config.public };
        Ok((
            Self {
                dht: Mutex::new(Some(dht.as_async())),
                addr,
                queries: Arc::new(Semaphore::new(MAX_DHT_QUERIES)),
            },
            event,
        ))
    }

    /// Stops the DHT node (once the queries still running end): the tracker stopped.
    pub(crate) fn stop(&self) {
        drop(self.dht.lock().take());
    }

    fn handle(&self) -> Option<AsyncDht> {
        self.dht.lock().clone()
    }

    /// A slot for one query, if the tracker has one left.
    pub(crate) fn query_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.queries.clone().try_acquire_owned().ok()
    }

    /// Stores `record` (already checked) as a BEP 44 mutable item. Returns how many DHT nodes
    /// acknowledged storing it (mainline's `PutOutcome::stored_at`: successful put responses
    /// from the closest nodes it sent the item to).
    pub(crate) async fn publish(&self, record: &SignedRecord) -> Result<u32, PublishError> {
        let signature: [u8; 64] =
            record.signature.as_slice().try_into().map_err(|_| PublishError::SignatureLength)?;
        let item = MutableItem::new_signed_unchecked(
            *record.node.as_bytes(),
            signature,
            &record.value,
            record.seq,
            Some(RECORD_SALT),
        );
        let dht = self.handle().ok_or(PublishError::Stopped)?;
        match dht.put_mutable(item, None).await {
            Ok(outcome) => Ok(outcome.stored_at),
            Err(PutMutableError::Concurrency(ConcurrencyError::NotMostRecent)) => {
                Err(PublishError::NotMostRecent)
            }
            Err(PutMutableError::Concurrency(_)) => Err(PublishError::Conflict),
            Err(PutMutableError::Query(e)) => Err(PublishError::Failed(e.to_string())),
        }
    }

    /// The most recent record of `node` the DHT holds (mainline checked its signature and
    /// target; the asker verifies the rest).
    pub(crate) async fn resolve(&self, node: &NodeId) -> Option<SignedRecord> {
        let item = self.handle()?.get_mutable_most_recent(node.as_bytes(), Some(RECORD_SALT)).await?;
        record_of(node, &item)
    }
}

/// The record `item` carries for `node`; `None` when the item is someone else's.
fn record_of(node: &NodeId, item: &MutableItem) -> Option<SignedRecord> {
    if item.key() != node.as_bytes() || item.salt() != Some(RECORD_SALT) {
        return None;
    }
    Some(SignedRecord {
        node: *node,
        seq: item.seq(),
        value: item.value().to_vec(),
        signature: item.signature().to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mainline::SigningKey;
    use qpeer_wire::record::signable;

    /// mainline signs (and DHT nodes check) `encode_signable(seq, value, salt)`; it is not
    /// exported, so this checks it through a signature: an item mainline signed verifies
    /// under our [`signable`] bytes, and the item our bytes describe is the one it made.
    #[test]
    fn our_signable_is_what_mainline_signs() {
        for (seq, value) in [(1_i64, b"Hello World!".to_vec()), (-3, Vec::new()), (1 << 40, vec![0xff; 1000])]
        {
            let key = SigningKey::from_bytes(&[0x42; 32]);
            let item = MutableItem::new(key, &value, seq, Some(RECORD_SALT));
            let node = NodeId::from_bytes(*item.key());
            assert!(node.verify(&signable(seq, &value), item.signature()), "seq {seq}");
            let ours = MutableItem::new_signed_unchecked(
                *item.key(),
                *item.signature(),
                &value,
                seq,
                Some(RECORD_SALT),
            );
            assert_eq!(ours, item);
            let record = record_of(&node, &item).expect("the node's item");
            assert_eq!((record.seq, record.value.as_slice()), (seq, value.as_slice()));
            assert!(record_of(&NodeId::from_bytes([1; 32]), &item).is_none());
        }
    }

    #[test]
    fn only_public_looking_ips_become_the_bep42_ip() {
        for ip in ["198.51.100.2", "8.8.8.8", "203.0.113.9"] {
            assert!(global_looking(ip.parse().expect("ip")), "{ip}");
        }
        for ip in
            ["0.0.0.0", "127.0.0.1", "10.0.0.1", "192.168.1.1", "169.254.0.1", "100.64.0.1", "224.0.0.1"]
        {
            assert!(!global_looking(ip.parse().expect("ip")), "{ip}");
        }
    }
}
