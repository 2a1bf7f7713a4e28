//! qpeer-wire: every byte layout qpeer puts on the wire, in one place that the tracker, the
//! node and the tests depend on and that does no I/O of its own.
//!
//! # Layout
//! - [`codec`]: the length-prefixed bincode framing and a bounded pull decoder.
//! - [`tracker`]: the node ↔ tracker protocol (frames, limits, version).
//! - [`relay_frame`]: what the relay streams carry (link id + length + opaque packet).
//! - [`peer`]: the node ↔ node protocol: ALPN and stream kinds.
//! - [`transfer`]: the file transfer protocol on peer streams.
//! - [`probe`]: the signed path probe datagrams.
//! - [`record`]: home records, signed by nodes, published in the Mainline DHT.
//! - [`control`]: the local control socket between `qpeer` processes.
//! - [`close_code`]: QUIC close codes of both protocols.
//! - [`io`] (feature `io`): the thin edge that moves these bytes over tokio and quinn
//!   streams; nothing else in the crate touches a socket.
//!
//! The byte layouts are specified in docs/PROTOCOL.md.

pub mod close_code;
pub mod codec;
pub mod control;
#[cfg(feature = "io")]
pub mod io;
pub mod peer;
pub mod probe;
pub mod record;
pub mod relay_frame;
pub mod tracker;
pub mod transfer;

/// An address in the one form both ends compare: an IPv4-mapped IPv6 address (what a
/// dual-stack socket reports for IPv4 peers) becomes the IPv4 address it maps.
pub fn canonical(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Remote-supplied text made safe to print: control characters (terminal escapes) become
/// `?`, and it is cut to `max` characters.
pub fn printable(text: &str, max: usize) -> String {
    let mut out: String = text.chars().take(max).map(|c| if c.is_control() { '?' } else { c }).collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}
#[cfg(test)]
mod tests {
    #[test]
    fn printable_strips_escapes_and_cuts() {
        assert_eq!(super::printable("a\x1b[2Jb\n", 100), "a?[2Jb?");
        assert_eq!(super::printable("abcdef", 3), "abc…");
    }
}
