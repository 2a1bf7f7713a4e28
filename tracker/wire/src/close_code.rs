//! QUIC application close codes of both protocols (docs/PROTOCOL.md). Tracker connections use
//! 0–8, peer connections 0 and 0x10–0x14: the values never overlap (but for `NORMAL`), so one
//! [`name`] serves both and a log line never has to know which protocol a code came from.

/// Normal close (a node leaving, a peer done).
pub const NORMAL: u32 = 0;

// Tracker connections.

/// The node broke the tracker protocol: undecodable frame, unexpected frame, bad field.
pub const PROTOCOL_VIOLATION: u32 = 1;
/// A frame's length prefix exceeded the maximum frame size.
pub const FRAME_TOO_LARGE: u32 = 2;
/// `Register.version` is not one the tracker speaks.
pub const UNSUPPORTED_VERSION: u32 = 3;
/// The same NodeId registered again over another connection; this one was replaced.
pub const REPLACED: u32 = 4;
/// The tracker holds its maximum number of registered nodes.
pub const TRACKER_FULL: u32 = 5;
/// Too many connections from this source IP.
pub const TOO_MANY_CONNECTIONS: u32 = 6;
/// No `Register` arrived in time, or a frame was left incomplete for too long.
pub const TIMEOUT: u32 = 7;
/// The tracker is shutting down.
pub const SHUTDOWN: u32 = 8;

// Peer connections.

/// Retired with the candidate race of peer protocol 1 (kept so the value is not reused).
pub const PEER_NOT_SELECTED: u32 = 0x10;
/// A newer connection to the same peer replaced this one.
pub const PEER_REPLACED: u32 = 0x11;
/// The peer broke the node protocol (unknown stream kind, bad ping).
pub const PEER_PROTOCOL_VIOLATION: u32 = 0x12;
/// The node is shutting down.
pub const PEER_SHUTDOWN: u32 = 0x13;
/// Retired with the candidate race of peer protocol 1 (kept so the value is not reused).
pub const PEER_SELECT_TIMEOUT: u32 = 0x14;

/// A short name for a close code of either protocol, for logs and console lines.
pub fn name(code: u64) -> &'static str {
    match u32::try_from(code).unwrap_or(u32::MAX) {
        NORMAL => "normal",
        PROTOCOL_VIOLATION | PEER_PROTOCOL_VIOLATION => "protocol violation",
        FRAME_TOO_LARGE => "frame too large",
        UNSUPPORTED_VERSION => "unsupported version",
        REPLACED => "replaced by a newer registration",
        TRACKER_FULL => "tracker full",
        TOO_MANY_CONNECTIONS => "too many connections from this address",
        TIMEOUT => "timeout",
        SHUTDOWN => "tracker shutting down",
        PEER_REPLACED => "replaced by a newer connection",
        PEER_SHUTDOWN => "node shutting down",
        PEER_NOT_SELECTED | PEER_SELECT_TIMEOUT => "retired code",
        _ => "unknown",
    }
}
