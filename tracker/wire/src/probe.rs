//! Path probes: the signed ping/pong datagrams the path layer sends from the node's one UDP
//! socket to learn which direct addresses of a peer work (docs/PROTOCOL.md, "Path probes").
//!
//! Pure data: encoding, decoding and signature checks, no I/O. A probe names both NodeIds and
//! is signed by its sender's long-term Ed25519 key, so nobody can claim to be a peer, and a
//! pong echoes the random `tx` of the ping it answers, so an old pong replayed from elsewhere
//! answers nothing.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use qpeer_certs::identity::SIGNATURE_LEN;
use qpeer_certs::{Identity, NodeId, TlsError, NODE_ID_LEN};

/// First bytes of every probe. The socket takes every datagram that starts with them out of
/// QUIC's way (quinn greases QUIC's fixed bit, so the zero first byte alone would not tell a
/// probe from a QUIC packet; the eight bytes together do).
pub const MAGIC: [u8; 8] = *b"\0qpprobe";

/// Length of a probe's random transaction id.
pub const TX_LEN: usize = 16;

const KIND_AT: usize = MAGIC.len();
const FROM_AT: usize = KIND_AT + 1;
const TO_AT: usize = FROM_AT + NODE_ID_LEN;
const TX_AT: usize = TO_AT + NODE_ID_LEN;
const OBSERVED_AT: usize = TX_AT + TX_LEN;
/// An IPv6 address (IPv4 as v4-mapped) and a port.
const ADDR_LEN: usize = 18;
const INCARNATION_AT: usize = OBSERVED_AT + ADDR_LEN;
const SIGNED_LEN: usize = INCARNATION_AT + 8;

/// Length of every probe datagram.
pub const PROBE_LEN: usize = SIGNED_LEN + SIGNATURE_LEN;

/// Signatures cover this context string before the probe's bytes, so a probe signature can
/// never be reused as a signature of anything else made with the same key.
const CONTEXT: &[u8] = b"qpeer path probe v1\0";

/// A ping asks "does this address reach you?"; a pong answers one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    Ping,
    Pong,
}

/// One probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub kind: ProbeKind,
    /// The sender, whose key signs the probe.
    pub from: NodeId,
    /// The node the probe is meant for (a probe for someone else is ignored).
    pub to: NodeId,
    /// Chosen at random by the pinger; a pong carries the tx of the ping it answers.
    pub tx: [u8; TX_LEN],
    /// In a pong: the address the ping came from, as its receiver saw it.
    pub observed: Option<SocketAddr>,
    /// A random number the sending process chose when it started: tells a restarted peer
    /// from the same one.
    pub incarnation: u64,
}

/// Why bytes are not a valid probe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("not a probe (no probe magic)")]
    NotAProbe,
    #[error("a probe is {PROBE_LEN} bytes, got {0}")]
    Length(usize),
    #[error("unknown probe kind {0}")]
    Kind(u8),
    #[error("the probe is not signed by the node it names")]
    BadSignature,
}

/// True when `datagram` starts like a probe (whether valid or not): such datagrams belong to
/// the path layer and never reach QUIC.
pub fn looks_like_probe(datagram: &[u8]) -> bool {
    datagram.starts_with(&MAGIC)
}

impl Probe {
    /// The probe's bytes, signed with `signer` (whose NodeId should be `from`; a probe signed
    /// by anyone else is refused by [`Probe::decode`]).
    pub fn encode(&self, signer: &Identity) -> Result<[u8; PROBE_LEN], TlsError> {
        let mut out = [0u8; PROBE_LEN];
        out[..KIND_AT].copy_from_slice(&MAGIC);
        out[KIND_AT] = match self.kind {
            ProbeKind::Ping => 1,
            ProbeKind::Pong => 2,
        };
        out[FROM_AT..TO_AT].copy_from_slice(self.from.as_bytes());
        out[TO_AT..TX_AT].copy_from_slice(self.to.as_bytes());
        out[TX_AT..OBSERVED_AT].copy_from_slice(&self.tx);
        if let Some(addr) = self.observed {
            let v6 = match addr.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out[OBSERVED_AT..OBSERVED_AT + 16].copy_from_slice(&v6.octets());
            out[OBSERVED_AT + 16..INCARNATION_AT].copy_from_slice(&addr.port().to_be_bytes());
        }
        out[INCARNATION_AT..SIGNED_LEN].copy_from_slice(&self.incarnation.to_be_bytes());
        let signature = signer.sign(&signed_message(&out[..SIGNED_LEN]))?;
        out[SIGNED_LEN..].copy_from_slice(&signature);
        Ok(out)
    }

    /// Parses a probe and checks that `from` signed it.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProbeError> {
        let probe = Self::parse(bytes)?;
        if !probe.from.verify(&signed_message(&bytes[..SIGNED_LEN]), &bytes[SIGNED_LEN..]) {
            return Err(ProbeError::BadSignature);
        }
        Ok(probe)
    }

    /// Parses without checking the signature (cheap checks first: who it is for).
    fn parse(bytes: &[u8]) -> Result<Self, ProbeError> {
        if !looks_like_probe(bytes) {
            return Err(ProbeError::NotAProbe);
        }
        if bytes.len() != PROBE_LEN {
            return Err(ProbeError::Length(bytes.len()));
        }
        let kind = match bytes[KIND_AT] {
            1 => ProbeKind::Ping,
            2 => ProbeKind::Pong,
            other => return Err(ProbeError::Kind(other)),
        };
        let id = |at: usize| {
            let mut raw = [0u8; NODE_ID_LEN];
            raw.copy_from_slice(&bytes[at..at + NODE_ID_LEN]);
            NodeId::from_bytes(raw)
        };
        let mut tx = [0u8; TX_LEN];
        tx.copy_from_slice(&bytes[TX_AT..OBSERVED_AT]);
        let mut ip = [0u8; 16];
        ip.copy_from_slice(&bytes[OBSERVED_AT..OBSERVED_AT + 16]);
        let port = u16::from_be_bytes([bytes[OBSERVED_AT + 16], bytes[OBSERVED_AT + 17]]);
        let ip = Ipv6Addr::from(ip);
        let observed = (port != 0).then(|| {
            let ip = ip.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(ip));
            SocketAddr::new(ip, port)
        });
        let mut incarnation = [0u8; 8];
        incarnation.copy_from_slice(&bytes[INCARNATION_AT..SIGNED_LEN]);
        Ok(Self {
            kind,
            from: id(FROM_AT),
            to: id(TO_AT),
            tx,
            observed,
            incarnation: u64::from_be_bytes(incarnation),
        })
    }

    /// The node a probe names as its receiver, without checking the signature (to drop
    /// probes meant for someone else before paying for a signature check).
    pub fn addressed_to(bytes: &[u8]) -> Option<NodeId> {
        Self::parse(bytes).ok().map(|p| p.to)
    }
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(CONTEXT.len() + body.len());
    message.extend_from_slice(CONTEXT);
    message.extend_from_slice(body);
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn keys() -> &'static (Identity, Identity) {
        static KEYS: OnceLock<(Identity, Identity)> = OnceLock::new();
        KEYS.get_or_init(|| {
            (Identity::generate().expect("identity"), Identity::generate().expect("identity"))
        })
    }

    fn addr() -> impl Strategy<Value = Option<SocketAddr>> {
        prop_oneof![
            Just(None),
            (any::<[u8; 4]>(), 1..=u16::MAX).prop_map(|(ip, port)| Some(SocketAddr::from((ip, port)))),
            (any::<[u8; 16]>(), 1..=u16::MAX)
                .prop_filter("not v4-mapped", |(ip, _)| Ipv6Addr::from(*ip).to_ipv4_mapped().is_none())
                .prop_map(|(ip, port)| Some(SocketAddr::from((Ipv6Addr::from(ip), port)))),
        ]
    }

    proptest! {
        #[test]
        fn probes_roundtrip(pong in any::<bool>(), tx in any::<[u8; TX_LEN]>(), observed in addr(), incarnation in any::<u64>()) {
            let (a, b) = keys();
            let probe = Probe {
                kind: if pong { ProbeKind::Pong } else { ProbeKind::Ping },
                from: a.node_id(),
                to: b.node_id(),
                tx,
                observed,
                incarnation,
            };
            let bytes = probe.encode(a).expect("encode");
            prop_assert_eq!(Probe::decode(&bytes), Ok(probe));
            prop_assert_eq!(Probe::addressed_to(&bytes), Some(b.node_id()));
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Probe::decode(&bytes);
            let mut probe = MAGIC.to_vec();
            probe.extend_from_slice(&bytes);
            let _ = Probe::decode(&probe);
        }

        #[test]
        fn any_changed_byte_breaks_the_signature(at in 0..PROBE_LEN, flip in 1..=u8::MAX) {
            let (a, b) = keys();
            let probe = Probe { kind: ProbeKind::Ping, from: a.node_id(), to: b.node_id(), tx: [7; TX_LEN], observed: None, incarnation: 1 };
            let mut bytes = probe.encode(a).expect("encode");
            bytes[at] ^= flip;
            prop_assert!(Probe::decode(&bytes) != Ok(probe));
        }
    }

    #[test]
    fn a_probe_signed_by_someone_else_is_refused() {
        let (a, b) = keys();
        let forged = Probe {
            kind: ProbeKind::Pong,
            from: a.node_id(),
            to: b.node_id(),
            tx: [1; TX_LEN],
            observed: None,
            incarnation: 9,
        };
        let bytes = forged.encode(b).expect("encode");
        assert_eq!(Probe::decode(&bytes), Err(ProbeError::BadSignature));
        assert_eq!(Probe::decode(&bytes[..10]), Err(ProbeError::Length(10)));
        assert_eq!(Probe::decode(b"\x40abc"), Err(ProbeError::NotAProbe));
    }
}
