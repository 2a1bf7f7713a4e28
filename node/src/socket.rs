//! [`PathSocket`]: the node's one UDP socket as quinn sees it, with the path layer inside.
//!
//! Packets quinn sends to a session's virtual address go out on the session's current path
//! ([`crate::paths::PathTable::route`]): the UDP socket toward a confirmed direct address,
//! the relay stream, or a short wait while neither is ready. Packets that arrive from a
//! session's direct address or relay link reach quinn from the virtual address. Probes are
//! taken out for the prober and never reach quinn; neither do packets from addresses no
//! session or tracker knows. Tracker traffic passes unchanged.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use qpeer_certs::NodeId;
use qpeer_wire::probe::{looks_like_probe, PROBE_LEN};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::mpsc;

use crate::paths::{is_virtual, Arrival, PathTable, Route};
use crate::relay_link::{RelayHub, RelayLink};

/// A probe datagram and where it came from, for the prober.
pub type ProbeDatagram = (SocketAddr, [u8; PROBE_LEN]);

/// Probes queued for the prober; past this they are dropped (a flood of them costs nothing).
pub const PROBE_QUEUE: usize = 256;

/// What quinn receives in place of a datagram it must not see: a long header whose connection
/// id length is impossible, which quinn drops without answering (any prefix of it too).
const NEUTRAL: [u8; 6] = [0xc0, 0, 0, 0, 1, 0xff];

/// The node's UDP socket with the path layer spliced in.
#[derive(Debug)]
pub struct PathSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    hub: Arc<RelayHub>,
    table: Arc<Mutex<PathTable>>,
    probes: mpsc::Sender<ProbeDatagram>,
    ipv6: bool,
    /// Alternates which source `poll_recv` looks at first, so neither starves the other.
    relay_first: AtomicBool,
}

impl PathSocket {
    pub fn new(
        inner: Arc<dyn AsyncUdpSocket>,
        hub: Arc<RelayHub>,
        table: Arc<Mutex<PathTable>>,
        probes: mpsc::Sender<ProbeDatagram>,
    ) -> io::Result<Self> {
        let ipv6 = inner.local_addr()?.is_ipv6();
        Ok(Self { inner, hub, table, probes, ipv6, relay_first: AtomicBool::new(true) })
    }

    /// The form of an address this socket takes and gives: on an IPv6 (dual-stack) socket,
    /// IPv4 addresses are v4-mapped. The path table keeps them canonical (plain IPv4).
    pub fn for_socket(&self, addr: SocketAddr) -> SocketAddr {
        match (self.ipv6, addr.ip()) {
            (true, IpAddr::V4(v4)) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), addr.port()),
            _ => addr,
        }
    }

    /// Sends what waited for `peer`'s first path, now that it has one.
    pub fn flush(&self, peer: &NodeId) {
        let (virtual_addr, waiting) = {
            let mut table = self.table.lock();
            (table.virtual_of(peer), table.take_waiting(peer))
        };
        let Some(destination) = virtual_addr else { return };
        for (contents, segment_size) in waiting {
            let transmit =
                Transmit { destination, ecn: None, contents: &contents, segment_size, src_ip: None };
            let _ = self.try_send(&transmit);
        }
    }

    fn send_relayed(&self, link: RelayLink, transmit: &Transmit<'_>) {
        // A transmit may hold several packets (GSO): the relay carries them one by one.
        let size = transmit.segment_size.unwrap_or(transmit.contents.len()).max(1);
        for packet in transmit.contents.chunks(size) {
            self.hub.send(link, packet);
        }
    }

    /// Relayed packets, as many as are queued and fit `bufs` (one per buffer).
    fn poll_relay(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<usize> {
        let mut filled = 0;
        while filled < bufs.len().min(meta.len()) {
            let next =
                if filled == 0 { self.hub.poll_inbound(cx) } else { Poll::Ready(self.hub.try_inbound()) };
            let Poll::Ready(Some((link, frame))) = next else { break };
            // A link of no session (one that closed) has nobody to deliver to.
            let Some(addr) = self.table.lock().link_arrival(link, Instant::now()) else { continue };
            let packet = frame.packet();
            let buf = &mut bufs[filled];
            let len = packet.len().min(buf.len());
            buf[..len].copy_from_slice(&packet[..len]);
            meta[filled] =
                RecvMeta { addr: self.for_socket(addr), len, stride: len, ecn: None, dst_ip: None };
            filled += 1;
        }
        if filled == 0 {
            Poll::Pending
        } else {
            Poll::Ready(filled)
        }
    }

    /// Rewrites what the UDP socket delivered: probes out to the prober, session packets
    /// from their virtual address, the rest hidden from quinn.
    fn sort_arrivals(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta], count: usize) {
        let now = Instant::now();
        let mut table = self.table.lock();
        for (buf, meta) in bufs.iter_mut().zip(meta.iter_mut()).take(count) {
            let stride = meta.stride.max(1);
            let data = &mut buf[..meta.len];
            let mut all_probes = true;
            for segment in data.chunks_mut(stride) {
                if looks_like_probe(segment) {
                    if let Ok(probe) = <[u8; PROBE_LEN]>::try_from(&*segment) {
                        let _ = self.probes.try_send((meta.addr, probe));
                    }
                    neutralize(segment);
                } else {
                    all_probes = false;
                }
            }
            if all_probes {
                continue;
            }
            match table.arrival(meta.addr, now) {
                Arrival::Session(addr) => {
                    meta.addr = self.for_socket(addr);
                    // quinn would keep the local address this arrived at as the source of
                    // its answers; a session's paths change, so the kernel chooses instead.
                    meta.dst_ip = None;
                }
                Arrival::Pass => {}
                Arrival::Drop => data.chunks_mut(stride).for_each(neutralize),
            }
        }
    }
}

fn neutralize(segment: &mut [u8]) {
    let n = segment.len().min(NEUTRAL.len());
    segment[..n].copy_from_slice(&NEUTRAL[..n]);
}

impl AsyncUdpSocket for PathSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        if !is_virtual(transmit.destination) {
            return self.inner.try_send(transmit);
        }
        let route = {
            let mut table = self.table.lock();
            let route = table.route(transmit.destination, Instant::now());
            if let Route::Wait(peer) = route {
                // Held under the same lock that chose the route, so a flush cannot slip in
                // between and leave the packet behind.
                table.hold(&peer, Bytes::copy_from_slice(transmit.contents), transmit.segment_size);
                return Ok(());
            }
            route
        };
        match route {
            Route::Pass => self.inner.try_send(transmit),
            // The kernel picks the source address for the path's destination, as it does for
            // probes: a source quinn remembered from an earlier packet may be gone (the node
            // moved to another network) or belong to another path.
            Route::Direct(addr) => self.inner.try_send(&Transmit {
                destination: self.for_socket(addr),
                src_ip: None,
                ..*transmit
            }),
            Route::Relay(link) => {
                self.send_relayed(link, transmit);
                Ok(())
            }
            Route::Wait(_) | Route::Drop => Ok(()),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let relay_first = self.relay_first.fetch_xor(true, Ordering::Relaxed);
        if relay_first {
            if let Poll::Ready(n) = self.poll_relay(cx, bufs, meta) {
                return Poll::Ready(Ok(n));
            }
        }
        if let Poll::Ready(result) = self.inner.poll_recv(cx, bufs, meta) {
            if let Ok(count) = result {
                self.sort_arrivals(bufs, meta, count);
            }
            return Poll::Ready(result);
        }
        if relay_first {
            return Poll::Pending;
        }
        self.poll_relay(cx, bufs, meta).map(Ok)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    // The trait's defaults would turn off GSO/GRO and path MTU discovery for the real socket.
    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_neutral_prefix_is_never_a_valid_header() {
        // Every prefix is a long header cut short or with an impossible connection id length.
        let mut segment = [0x40u8; 3];
        super::neutralize(&mut segment);
        assert_eq!(segment, [0xc0, 0, 0]);
        let mut long = [0x40u8; 1200];
        super::neutralize(&mut long);
        assert_eq!(&long[..6], &super::NEUTRAL);
    }
}
