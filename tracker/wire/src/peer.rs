//! The node-to-node protocol's framing (ALPN `qpeer/1`): every stream starts with one byte
//! naming its kind. What follows on a transfer stream is in [`crate::transfer`].

/// ALPN of node-to-node connections.
pub const ALPN: &[u8] = b"qpeer/1";

/// The first byte of every node-to-node stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StreamKind {
    /// Retired (protocol 1 raced one connection per candidate address and marked the winner
    /// with it); never sent now, and refused like an unknown kind.
    Select = 1,
    /// Bi: 8-byte probes echoed back.
    Ping = 2,
    /// Bi: a file transfer's control stream (offer, decision, summary).
    Transfer = 3,
    /// Bi: one file's data and its verification.
    FileData = 4,
}

impl StreamKind {
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Select),
            2 => Some(Self::Ping),
            3 => Some(Self::Transfer),
            4 => Some(Self::FileData),
            _ => None,
        }
    }
}
