//! Framing: a 4-byte big-endian length prefix, then a bincode body (bincode 2, standard config,
//! serde encoding). Pure functions and a pull decoder; no I/O. Every bincode use in qpeer goes
//! through [`encode_body`] / [`decode_body`].

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::tracker::MAX_FRAME_LEN;

/// Length of the frame length prefix.
pub const HEADER_LEN: usize = 4;

/// Why bytes could not be turned into a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("frame body does not decode: {0}")]
    Malformed(String),
    #[error("frame body has {0} trailing bytes")]
    TrailingBytes(usize),
    #[error("message does not encode: {0}")]
    Encode(String),
}

fn bincode_config() -> impl bincode::config::Config {
    // The limit caps what the decoder may allocate for any single field.
    bincode::config::standard().with_limit::<MAX_FRAME_LEN>()
}

/// Serializes a message body (no length prefix).
pub fn encode_body<T: Serialize>(message: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(message, bincode_config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Deserializes a whole message body; trailing bytes are an error.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    let (message, used) = bincode::serde::decode_from_slice(body, bincode_config())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(CodecError::TrailingBytes(body.len() - used));
    }
    Ok(message)
}

/// Encodes a message as one frame: length prefix + body.
pub fn encode_frame<T: Serialize>(message: &T, max_len: usize) -> Result<Vec<u8>, CodecError> {
    let body = encode_body(message)?;
    let max = max_len.min(MAX_FRAME_LEN);
    if body.len() > max {
        return Err(CodecError::TooLarge { len: body.len(), max });
    }
    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Accumulates stream bytes and yields complete frame bodies.
///
/// Memory is bounded: a length prefix above the limit is reported before any body is buffered,
/// and the buffer never holds more than one frame plus one read.
#[derive(Debug)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
    max_len: usize,
}

impl FrameDecoder {
    pub fn new(max_len: usize) -> Self {
        Self { buffer: Vec::new(), max_len: max_len.min(MAX_FRAME_LEN) }
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// True while part of a frame is buffered (used to time out half-sent frames).
    /// The bytes received past the last whole frame, taken out of the decoder.
    pub fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buffer)
    }

    pub fn has_partial(&self) -> bool {
        !self.buffer.is_empty()
    }

    /// Takes the next complete frame body, if one is buffered.
    pub fn next_body(&mut self) -> Result<Option<Vec<u8>>, CodecError> {
        let Some(header) = self.buffer.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let mut prefix = [0u8; HEADER_LEN];
        prefix.copy_from_slice(header);
        let len = u32::from_be_bytes(prefix) as usize;
        if len > self.max_len {
            return Err(CodecError::TooLarge { len, max: self.max_len });
        }
        if self.buffer.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let body = self.buffer[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buffer.drain(..HEADER_LEN + len);
        Ok(Some(body))
    }

    /// Takes and decodes the next complete frame, if one is buffered.
    pub fn next_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, CodecError> {
        match self.next_body()? {
            Some(body) => decode_body(&body).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use proptest::prelude::*;
    use qpeer_certs::NodeId;

    use super::*;
    use crate::tracker::*;

    fn node_id() -> impl Strategy<Value = NodeId> {
        any::<[u8; 32]>().prop_map(NodeId::from_bytes)
    }

    /// Socket addresses as they travel: IPv6 flow info and scope id are not carried.
    fn addr() -> impl Strategy<Value = SocketAddr> {
        any::<SocketAddr>().prop_map(|addr| SocketAddr::new(addr.ip(), addr.port()))
    }

    fn client_frame() -> impl Strategy<Value = ClientFrame> {
        prop_oneof![
            (
                any::<u16>(),
                prop::collection::vec(addr(), 0..MAX_CANDIDATES),
                prop::option::of("[a-z0-9 é]{0,20}"),
                any::<u64>(),
                any::<bool>()
            )
                .prop_map(|(version, candidates, name, incarnation, visitor)| {
                    ClientFrame::Register { version, candidates, name, incarnation, visitor }
                }),
            prop::collection::vec(addr(), 0..MAX_CANDIDATES)
                .prop_map(|candidates| ClientFrame::Candidates { candidates }),
            (any::<u64>(), prop::option::of(node_id()), any::<u16>())
                .prop_map(|(request_id, after, limit)| ClientFrame::ListPeers { request_id, after, limit }),
            (any::<u64>(), node_id())
                .prop_map(|(request_id, target)| ClientFrame::Introduce { request_id, target }),
            (any::<u64>(), node_id())
                .prop_map(|(request_id, peer)| ClientFrame::RelayRequest { request_id, peer }),
            any::<u16>().prop_map(|version| ClientFrame::Observe { version }),
            mapping().prop_map(|mapping| ClientFrame::Mapping { mapping }),
            (any::<u64>(), signed_record())
                .prop_map(|(request_id, record)| ClientFrame::Publish { request_id, record }),
            (any::<u64>(), node_id())
                .prop_map(|(request_id, node)| ClientFrame::Resolve { request_id, node }),
        ]
    }

    /// Records as they travel: the bytes need not verify (the receiver checks them).
    fn signed_record() -> impl Strategy<Value = crate::record::SignedRecord> {
        (
            node_id(),
            any::<i64>(),
            prop::collection::vec(any::<u8>(), 0..64),
            prop::collection::vec(any::<u8>(), 64),
        )
            .prop_map(|(node, seq, value, signature)| crate::record::SignedRecord {
                node,
                seq,
                value,
                signature,
            })
    }

    fn mapping() -> impl Strategy<Value = Mapping> {
        prop_oneof![
            Just(Mapping::Unknown),
            Just(Mapping::None),
            Just(Mapping::EndpointIndependent),
            Just(Mapping::EndpointDependent),
        ]
    }

    fn server_frame() -> impl Strategy<Value = ServerFrame> {
        let peer = (node_id(), prop::option::of("[a-z]{0,10}"), any::<u64>())
            .prop_map(|(node_id, name, registered_at)| PeerInfo { node_id, name, registered_at });
        let addrs = (addr(), prop::collection::vec(addr(), 0..4))
            .prop_map(|(observed, candidates)| PeerAddrs { observed, candidates });
        let kind = prop_oneof![
            Just(ErrorKind::RateLimited),
            Just(ErrorKind::InvalidRequest),
            Just(ErrorKind::Busy),
            Just(ErrorKind::NotIntroduced),
            Just(ErrorKind::NoDht),
            Just(ErrorKind::BadRecord),
        ];
        prop_oneof![
            (any::<u16>(), addr(), prop::collection::vec(addr(), 0..MAX_TRACKER_ADDRS)).prop_map(
                |(version, observed, others)| ServerFrame::Registered { version, observed, others }
            ),
            (any::<u64>(), prop::collection::vec(peer, 0..8), prop::option::of(node_id()))
                .prop_map(|(request_id, peers, next)| ServerFrame::Peers { request_id, peers, next }),
            (prop::option::of(any::<u64>()), node_id(), addrs, any::<u64>(), mapping()).prop_map(
                |(request_id, peer, addrs, incarnation, mapping)| ServerFrame::Introduction {
                    request_id,
                    peer,
                    addrs,
                    incarnation,
                    mapping
                }
            ),
            addr().prop_map(|observed| ServerFrame::Observed { observed }),
            addr().prop_map(|observed| ServerFrame::Observation { observed }),
            (any::<u64>(), node_id())
                .prop_map(|(request_id, target)| ServerFrame::NotFound { request_id, target }),
            (any::<u64>(), kind, ".{0,30}").prop_map(|(request_id, kind, message)| ServerFrame::Error {
                request_id,
                kind,
                message
            }),
            any::<u64>().prop_map(|request_id| ServerFrame::RelayAccepted { request_id }),
            (node_id(), any::<u32>()).prop_map(|(peer, link)| ServerFrame::RelayReady { peer, link }),
            (any::<u64>(), any::<i64>(), any::<u32>()).prop_map(|(request_id, seq, stored_on)| {
                ServerFrame::Published { request_id, seq, stored_on }
            }),
            (any::<u64>(), prop::option::of(signed_record()))
                .prop_map(|(request_id, record)| ServerFrame::Resolved { request_id, record }),
        ]
    }

    /// Feeds `bytes` to a decoder in chunks and decodes frames of type T until error or exhaustion.
    fn drain<T: DeserializeOwned>(bytes: &[u8], chunk: usize) -> Vec<Result<T, CodecError>> {
        let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
        let mut out = Vec::new();
        for piece in bytes.chunks(chunk.max(1)) {
            decoder.extend(piece);
            loop {
                match decoder.next_frame::<T>() {
                    Ok(Some(frame)) => out.push(Ok(frame)),
                    Ok(None) => break,
                    Err(e) => {
                        out.push(Err(e));
                        return out;
                    }
                }
            }
            assert!(decoder.buffer.len() <= MAX_FRAME_LEN + HEADER_LEN + chunk);
        }
        out
    }

    #[test]
    fn oversized_length_prefix_is_refused_before_buffering() {
        let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
        decoder.extend(&u32::MAX.to_be_bytes());
        assert_eq!(
            decoder.next_body(),
            Err(CodecError::TooLarge { len: u32::MAX as usize, max: MAX_FRAME_LEN })
        );
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut body =
            encode_body(&ClientFrame::Introduce { request_id: 1, target: NodeId::from_bytes([7; 32]) })
                .expect("encode");
        body.push(0);
        assert_eq!(decode_body::<ClientFrame>(&body), Err(CodecError::TrailingBytes(1)));
    }

    /// The example bytes of docs/PROTOCOL.md section 2.13 (protocol version 4).
    #[test]
    fn frames_encode_as_documented() {
        assert_eq!(PROTOCOL_VERSION, 4);
        let observe = encode_frame(&ClientFrame::Observe { version: PROTOCOL_VERSION }, MAX_FRAME_LEN);
        assert_eq!(observe.expect("encode"), [0, 0, 0, 2, 5, 4]);
        let resolve = ClientFrame::Resolve { request_id: 2, node: NodeId::from_bytes([0xab; 32]) };
        let mut expected = vec![0, 0, 0, 34, 8, 2];
        expected.extend([0xab; 32]);
        assert_eq!(encode_frame(&resolve, MAX_FRAME_LEN).expect("encode"), expected);
        let mapping = ClientFrame::Mapping { mapping: Mapping::EndpointDependent };
        assert_eq!(encode_frame(&mapping, MAX_FRAME_LEN).expect("encode"), [0, 0, 0, 2, 6, 3]);
        let observed: SocketAddr = "203.0.113.7:40000".parse().expect("addr");
        let observation = encode_frame(&ServerFrame::Observation { observed }, MAX_FRAME_LEN);
        assert_eq!(observation.expect("encode"), [0, 0, 0, 9, 8, 0, 0xcb, 0, 0x71, 7, 0xfb, 0x40, 0x9c]);
    }

    proptest! {
        #[test]
        fn client_frames_roundtrip(frames in prop::collection::vec(client_frame(), 1..5), chunk in 1usize..64) {
            let mut bytes = Vec::new();
            for frame in &frames {
                bytes.extend(encode_frame(frame, MAX_FRAME_LEN).expect("encode"));
            }
            let decoded: Vec<ClientFrame> = drain(&bytes, chunk).into_iter().map(|r| r.expect("decode")).collect();
            prop_assert_eq!(decoded, frames);
        }

        #[test]
        fn server_frames_roundtrip(frame in server_frame(), chunk in 1usize..64) {
            let bytes = encode_frame(&frame, MAX_FRAME_LEN).expect("encode");
            let decoded: Vec<ServerFrame> = drain(&bytes, chunk).into_iter().map(|r| r.expect("decode")).collect();
            prop_assert_eq!(decoded, vec![frame]);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048), chunk in 1usize..300) {
            let _ = drain::<ClientFrame>(&bytes, chunk);
            let _ = drain::<ServerFrame>(&bytes, chunk);
            let _ = decode_body::<ClientFrame>(&bytes);
            let _ = decode_body::<ServerFrame>(&bytes);
        }

        #[test]
        fn truncated_frames_never_decode_and_never_panic(frame in client_frame(), cut in any::<prop::sample::Index>()) {
            let bytes = encode_frame(&frame, MAX_FRAME_LEN).expect("encode");
            let cut = cut.index(bytes.len());
            let results = drain::<ClientFrame>(&bytes[..cut], 7);
            prop_assert!(results.is_empty(), "a truncated frame must not yield a frame");
        }

        #[test]
        fn mutated_frames_never_panic(frame in server_frame(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
            let mut bytes = encode_frame(&frame, MAX_FRAME_LEN).expect("encode");
            for (index, value) in flips {
                let i = index.index(bytes.len());
                bytes[i] ^= value;
            }
            let _ = drain::<ServerFrame>(&bytes, 5);
            let _ = drain::<ClientFrame>(&bytes, 5);
        }

        #[test]
        fn huge_declared_collection_lengths_do_not_allocate(len in (MAX_FRAME_LEN as u64)..u64::MAX) {
            // A Register whose candidate count claims billions of entries.
            // variant Register, version 1, then the candidates length as a varint u64.
            let mut body = vec![0u8, 1, 253];
            body.extend_from_slice(&len.to_le_bytes());
            prop_assert!(decode_body::<ClientFrame>(&body).is_err());
        }
    }
}
