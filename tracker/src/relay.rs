//! Relay stream framing: what nodes and the tracker write on their relay streams (one
//! unidirectional QUIC stream in each direction per node). Pure; no I/O.
//!
//! Each frame is `link: u32 BE | len: u16 BE | packet: len bytes`. The packet is an opaque,
//! end-to-end encrypted QUIC packet of the two nodes' own connection.

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

/// Splits a relay byte stream into `(link, packet)` frames. Holds at most one partial frame
/// plus one read (the length field caps a frame at 64 KiB).
#[derive(Debug, Default)]
pub struct RelayDecoder {
    buffer: Vec<u8>,
    start: usize,
}

impl RelayDecoder {
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buffer.len() {
            self.buffer.clear();
            self.start = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete frame, if buffered.
    pub fn next_frame(&mut self) -> Option<(u32, &[u8])> {
        let pending = &self.buffer[self.start..];
        if pending.len() < RELAY_HEADER_LEN {
            self.compact();
            return None;
        }
        let link = u32::from_be_bytes([pending[0], pending[1], pending[2], pending[3]]);
        let len = usize::from(u16::from_be_bytes([pending[4], pending[5]]));
        if pending.len() < RELAY_HEADER_LEN + len {
            self.compact();
            return None;
        }
        let from = self.start + RELAY_HEADER_LEN;
        self.start = from + len;
        Some((link, &self.buffer[from..from + len]))
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
    }

    /// Bytes held (for memory bounds in tests).
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }
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
                while let Some((link, packet)) = decoder.next_frame() {
                    got.push((link, packet.to_vec()));
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
    fn oversized_packets_are_refused() {
        let mut out = Vec::new();
        assert_eq!(
            encode_relay_frame(1, &vec![0; MAX_RELAY_PACKET + 1], &mut out),
            Err(PacketTooLarge(MAX_RELAY_PACKET + 1))
        );
        assert!(out.is_empty());
    }
}
