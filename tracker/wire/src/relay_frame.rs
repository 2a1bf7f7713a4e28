//! Relay stream framing: what nodes and the tracker write on their relay streams (one
//! unidirectional QUIC stream in each direction per node). Pure; no I/O.
//!
//! Each frame is `link: u32 BE | len: u16 BE | packet: len bytes`. The packet is an opaque,
//! end-to-end encrypted QUIC packet of the two nodes' own connection.

use bytes::{Bytes, BytesMut};

/// Bytes before each packet.
pub const RELAY_HEADER_LEN: usize = 6;

/// Largest packet a frame can carry (the u16 length).
pub const MAX_RELAY_PACKET: usize = u16::MAX as usize;

/// Why a relay frame could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("relay packet of {0} bytes exceeds {MAX_RELAY_PACKET}")]
pub struct PacketTooLarge(pub usize);

/// Appends one frame to `out`.
pub fn encode_relay_frame(link: u32, packet: &[u8], out: &mut Vec<u8>) -> Result<(), PacketTooLarge> {
    let len = u16::try_from(packet.len()).map_err(|_| PacketTooLarge(packet.len()))?;
    out.extend_from_slice(&link.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(packet);
    Ok(())
}

/// One whole relay frame (header and packet) in a shared buffer: forwarded as it is, without
/// copying, since both ends of a link use the same link id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayFrame(Bytes);

impl RelayFrame {
    /// Builds a frame in one allocation.
    pub fn new(link: u32, packet: &[u8]) -> Result<Self, PacketTooLarge> {
        let mut out = Vec::with_capacity(RELAY_HEADER_LEN + packet.len());
        encode_relay_frame(link, packet, &mut out)?;
        Ok(Self(out.into()))
    }

    pub fn link(&self) -> u32 {
        u32::from_be_bytes([self.0[0], self.0[1], self.0[2], self.0[3]])
    }

    pub fn packet(&self) -> &[u8] {
        &self.0[RELAY_HEADER_LEN..]
    }

    /// The encoded frame, ready to write to a relay stream.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

/// Splits a relay byte stream into frames. Holds at most one partial frame plus one read (the
/// length field caps a frame at 64 KiB); the frames it returns share its buffer.
#[derive(Debug, Default)]
pub struct RelayDecoder {
    buffer: BytesMut,
}

impl RelayDecoder {
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete frame, if buffered.
    pub fn next_frame(&mut self) -> Option<RelayFrame> {
        let len = frame_len(&self.buffer)?;
        Some(RelayFrame(self.buffer.split_to(len).freeze()))
    }

    /// Bytes held (for memory bounds in tests).
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }
}

/// The length of the whole frame at the start of `pending`, if all of it is there.
fn frame_len(pending: &[u8]) -> Option<usize> {
    if pending.len() < RELAY_HEADER_LEN {
        return None;
    }
    let len = RELAY_HEADER_LEN + usize::from(u16::from_be_bytes([pending[4], pending[5]]));
    (pending.len() >= len).then_some(len)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn frames_roundtrip_across_any_split(
            frames in prop::collection::vec((any::<u32>(), prop::collection::vec(any::<u8>(), 0..1500)), 0..20),
            chunk in 1usize..4000,
        ) {
            let mut bytes = Vec::new();
            for (link, packet) in &frames {
                encode_relay_frame(*link, packet, &mut bytes).expect("encode");
            }
            let mut decoder = RelayDecoder::default();
            let mut got = Vec::new();
            for piece in bytes.chunks(chunk) {
                decoder.extend(piece);
                while let Some(frame) = decoder.next_frame() {
                    got.push((frame.link(), frame.packet().to_vec()));
                }
                prop_assert!(decoder.buffered() <= RELAY_HEADER_LEN + MAX_RELAY_PACKET + chunk);
            }
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..5000), chunk in 1usize..700) {
            let mut decoder = RelayDecoder::default();
            for piece in bytes.chunks(chunk) {
                decoder.extend(piece);
                while decoder.next_frame().is_some() {}
            }
        }
    }

    #[test]
    fn a_frame_built_whole_decodes_to_itself() {
        let frame = RelayFrame::new(0x00ab_cdef, b"packet").expect("frame");
        assert_eq!((frame.link(), frame.packet()), (0x00ab_cdef, &b"packet"[..]));
        let mut decoder = RelayDecoder::default();
        decoder.extend(&frame.clone().into_bytes());
        assert_eq!(decoder.next_frame(), Some(frame));
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn oversized_packets_are_refused() {
        let mut out = Vec::new();
        assert_eq!(
            encode_relay_frame(1, &vec![0; MAX_RELAY_PACKET + 1], &mut out),
            Err(PacketTooLarge(MAX_RELAY_PACKET + 1))
        );
        assert!(out.is_empty());
    }
}
