//! Home records: "this node lives on that tracker", signed by the node's own Ed25519 key and
//! published in the BitTorrent Mainline DHT as a BEP 44 mutable item (key = the NodeId,
//! salt = [`RECORD_SALT`]), so that nodes on other trackers can find it and no tracker can
//! forge where a node lives (see docs/PROTOCOL.md, "Home records").
//!
//! Pure data: the record's bytes, the BEP 44 signable encoding and the checks. Trackers do
//! the DHT traffic; nodes sign and verify.

use std::net::SocketAddr;

use qpeer_certs::identity::SIGNATURE_LEN;
use qpeer_certs::{Identity, NodeId, TlsError};
use serde::{Deserialize, Serialize};

use crate::codec::{decode_body, encode_body};
use crate::tracker::MAX_TRACKER_ADDRS;

/// BEP 44 salt of qpeer's home records: the same key may publish other items under other salts.
pub const RECORD_SALT: &[u8] = b"qpeer-home";

/// BEP 44's limit for a mutable item's value.
pub const MAX_VALUE_LEN: usize = 1000;

/// Version byte at the start of a record's value.
pub const RECORD_VERSION: u8 = 1;

/// How long a record is good for after it was signed. Short, so that a node that moved or
/// died is not looked for at its old tracker for long.
pub const RECORD_TTL_SECS: u32 = 15 * 60;

/// A node republishes its record this often while nothing changes (and at once on a change).
pub const REPUBLISH_SECS: u64 = 5 * 60;

/// Clock skew tolerated on `issued_at` (a record "from the future" by more is refused).
pub const MAX_CLOCK_SKEW_SECS: u64 = 5 * 60;

/// What a record says: the node's home tracker, and when the node said so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HomeRecord {
    /// The home tracker's identity: a dialer pins it when it connects there.
    pub tracker: NodeId,
    /// Where the home tracker listens (at most [`MAX_TRACKER_ADDRS`]).
    pub addrs: Vec<SocketAddr>,
    /// Seconds since the Unix epoch, the node's clock.
    pub issued_at: u64,
    /// Seconds after `issued_at` that the record is good for.
    pub ttl_secs: u32,
}

/// The record as it travels between node, tracker and DHT: a BEP 44 mutable item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRecord {
    /// The node whose record this is (the item's public key).
    pub node: NodeId,
    /// BEP 44 sequence number: a newer record has a higher one.
    pub seq: i64,
    /// [`RECORD_VERSION`] then the bincode of a [`HomeRecord`]; at most [`MAX_VALUE_LEN`].
    pub value: Vec<u8>,
    /// Ed25519 signature of [`signable`]`(seq, value)` by `node`.
    pub signature: Vec<u8>,
}

/// Why a record is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("the record is not signed by the node it names")]
    BadSignature,
    #[error("the record names node {found}, not {expected}")]
    WrongNode { expected: NodeId, found: NodeId },
    #[error("sequence number {seq} is not newer than {known}, the newest already seen")]
    Stale { seq: i64, known: i64 },
    #[error("the record expired {ago} s ago")]
    Expired { ago: u64 },
    #[error("the record was issued {ahead} s in the future")]
    FromTheFuture { ahead: u64 },
    #[error("the record's value is {len} bytes; BEP 44 allows {MAX_VALUE_LEN}")]
    TooLarge { len: usize },
    #[error("the record has {0} tracker addresses; at most {MAX_TRACKER_ADDRS}")]
    TooManyAddrs(usize),
    #[error("the record names no tracker address")]
    NoAddrs,
    #[error("record version {0} is not understood")]
    UnknownVersion(u8),
    #[error("the record does not decode: {0}")]
    Malformed(String),
    #[error("the record names tracker {named}, not this tracker ({this})")]
    OtherTracker { named: NodeId, this: NodeId },
    #[error("cannot sign the record: {0}")]
    Sign(String),
}

/// The bytes BEP 44 signs: `4:salt<len>:<salt>3:seqi<seq>e1:v<len>:<value>` (bencoded
/// key/value pairs without the surrounding dictionary).
pub fn signable(seq: i64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + RECORD_SALT.len() + value.len());
    out.extend_from_slice(format!("4:salt{}:", RECORD_SALT.len()).as_bytes());
    out.extend_from_slice(RECORD_SALT);
    out.extend_from_slice(format!("3:seqi{seq}e1:v{}:", value.len()).as_bytes());
    out.extend_from_slice(value);
    out
}

impl HomeRecord {
    /// The value bytes of this record.
    pub fn encode(&self) -> Result<Vec<u8>, RecordError> {
        self.check_shape()?;
        let mut value = vec![RECORD_VERSION];
        value.extend(encode_body(self).map_err(|e| RecordError::Malformed(e.to_string()))?);
        if value.len() > MAX_VALUE_LEN {
            return Err(RecordError::TooLarge { len: value.len() });
        }
        Ok(value)
    }

    /// Parses value bytes (shape only: see [`SignedRecord::verify`] for the rest).
    pub fn decode(value: &[u8]) -> Result<Self, RecordError> {
        if value.len() > MAX_VALUE_LEN {
            return Err(RecordError::TooLarge { len: value.len() });
        }
        match value.split_first() {
            Some((&RECORD_VERSION, body)) => {
                let record: Self = decode_body(body).map_err(|e| RecordError::Malformed(e.to_string()))?;
                record.check_shape()?;
                Ok(record)
            }
            Some((&other, _)) => Err(RecordError::UnknownVersion(other)),
            None => Err(RecordError::Malformed("empty value".into())),
        }
    }

    fn check_shape(&self) -> Result<(), RecordError> {
        if self.addrs.is_empty() {
            return Err(RecordError::NoAddrs);
        }
        if self.addrs.len() > MAX_TRACKER_ADDRS {
            return Err(RecordError::TooManyAddrs(self.addrs.len()));
        }
        Ok(())
    }

    /// Good at `now` (seconds since the Unix epoch): not expired, not from the future.
    pub fn check_time(&self, now: u64) -> Result<(), RecordError> {
        if self.issued_at > now + MAX_CLOCK_SKEW_SECS {
            return Err(RecordError::FromTheFuture { ahead: self.issued_at - now });
        }
        let expires = self.issued_at.saturating_add(u64::from(self.ttl_secs));
        if now > expires {
            return Err(RecordError::Expired { ago: now - expires });
        }
        Ok(())
    }

    /// Signs this record as `identity`'s, with sequence number `seq`.
    pub fn sign(&self, identity: &Identity, seq: i64) -> Result<SignedRecord, RecordError> {
        let value = self.encode()?;
        let signature =
            identity.sign(&signable(seq, &value)).map_err(|e: TlsError| RecordError::Sign(e.to_string()))?;
        Ok(SignedRecord { node: identity.node_id(), seq, value, signature: signature.to_vec() })
    }
}

impl SignedRecord {
    /// The record, when `expected` signed it, it is well formed and good at `now`.
    /// Sequence numbers are the caller's business ([`SignedRecord::check_newer`]): only it
    /// knows the newest one it has seen.
    pub fn verify(&self, expected: &NodeId, now: u64) -> Result<HomeRecord, RecordError> {
        if self.node != *expected {
            return Err(RecordError::WrongNode { expected: *expected, found: self.node });
        }
        if self.value.len() > MAX_VALUE_LEN {
            return Err(RecordError::TooLarge { len: self.value.len() });
        }
        if self.signature.len() != SIGNATURE_LEN
            || !self.node.verify(&signable(self.seq, &self.value), &self.signature)
        {
            return Err(RecordError::BadSignature);
        }
        let record = HomeRecord::decode(&self.value)?;
        record.check_time(now)?;
        Ok(record)
    }

    /// Refuses this record unless it is newer than sequence number `known`.
    pub fn check_newer(&self, known: Option<i64>) -> Result<(), RecordError> {
        match known {
            Some(known) if self.seq <= known => Err(RecordError::Stale { seq: self.seq, known }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(now: u64) -> HomeRecord {
        HomeRecord {
            tracker: NodeId::from_bytes([7; 32]),
            addrs: vec![
                "198.51.100.2:4433".parse().expect("addr"),
                "[2001:db8::2]:4433".parse().expect("addr"),
            ],
            issued_at: now,
            ttl_secs: RECORD_TTL_SECS,
        }
    }

    #[test]
    fn signed_records_verify_and_others_do_not() {
        let node = Identity::generate().expect("identity");
        let other = Identity::generate().expect("identity");
        let signed = record(1_000).sign(&node, 5).expect("signed");
        assert_eq!(signed.verify(&node.node_id(), 1_010).expect("valid"), record(1_000));

        // Signed by another key but claiming to be `node`'s.
        let mut forged = record(1_000).sign(&other, 5).expect("signed");
        forged.node = node.node_id();
        assert_eq!(forged.verify(&node.node_id(), 1_010), Err(RecordError::BadSignature));
        // Honest about its signer, but asked for as `node`'s.
        let theirs = record(1_000).sign(&other, 5).expect("signed");
        assert!(matches!(theirs.verify(&node.node_id(), 1_010), Err(RecordError::WrongNode { .. })));

        // Any change to the seq or the value breaks the signature.
        let mut bumped = signed.clone();
        bumped.seq = 6;
        assert_eq!(bumped.verify(&node.node_id(), 1_010), Err(RecordError::BadSignature));
        let mut edited = signed.clone();
        let last = edited.value.len() - 1;
        edited.value[last] ^= 1;
        assert!(edited.verify(&node.node_id(), 1_010).is_err());
    }

    #[test]
    fn older_and_equal_sequence_numbers_are_stale() {
        let node = Identity::generate().expect("identity");
        let signed = record(1_000).sign(&node, 5).expect("signed");
        assert_eq!(signed.check_newer(None), Ok(()));
        assert_eq!(signed.check_newer(Some(4)), Ok(()));
        assert_eq!(signed.check_newer(Some(5)), Err(RecordError::Stale { seq: 5, known: 5 }));
        assert_eq!(signed.check_newer(Some(9)), Err(RecordError::Stale { seq: 5, known: 9 }));
    }

    #[test]
    fn expired_and_future_records_are_refused() {
        let node = Identity::generate().expect("identity");
        let signed = record(1_000).sign(&node, 1).expect("signed");
        let expires = 1_000 + u64::from(RECORD_TTL_SECS);
        assert!(signed.verify(&node.node_id(), expires).is_ok());
        assert_eq!(signed.verify(&node.node_id(), expires + 3), Err(RecordError::Expired { ago: 3 }));
        assert!(matches!(
            signed.verify(&node.node_id(), 1_000 - MAX_CLOCK_SKEW_SECS - 1),
            Err(RecordError::FromTheFuture { .. })
        ));
    }

    #[test]
    fn the_largest_record_fits_bep44() {
        let mut big = record(u64::MAX / 2);
        big.addrs =
            vec!["[2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:65535".parse().expect("addr"); MAX_TRACKER_ADDRS];
        let value = big.encode().expect("fits");
        assert!(value.len() <= MAX_VALUE_LEN, "{} bytes", value.len());
        big.addrs.push(big.addrs[0]);
        assert_eq!(big.encode(), Err(RecordError::TooManyAddrs(MAX_TRACKER_ADDRS + 1)));
        big.addrs.clear();
        assert_eq!(big.encode(), Err(RecordError::NoAddrs));
    }

    #[test]
    fn signable_is_bep44s_encoding() {
        // BEP 44's own example: salt "foobar", seq 1, value "Hello World!" (12 bytes) gives
        // `4:salt6:foobar3:seqi1e1:v12:Hello World!`; ours differs only in the salt.
        assert_eq!(signable(1, b"Hello World!"), b"4:salt10:qpeer-home3:seqi1e1:v12:Hello World!".to_vec());
        assert_eq!(signable(-3, b""), b"4:salt10:qpeer-home3:seqi-3e1:v0:".to_vec());
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_values_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let _ = HomeRecord::decode(&bytes);
        }

        #[test]
        fn records_roundtrip(issued_at in 0u64..u64::MAX / 2, ttl in any::<u32>(), port in any::<u16>(), n in 1usize..=MAX_TRACKER_ADDRS) {
            let addr: SocketAddr = ([198, 51, 100, 7], port).into();
            let record = HomeRecord { tracker: NodeId::from_bytes([3; 32]), addrs: vec![addr; n], issued_at, ttl_secs: ttl };
            prop_assert_eq!(HomeRecord::decode(&record.encode().expect("encodes")).expect("decodes"), record);
        }
    }
}
