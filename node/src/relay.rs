//! The relay path: when no hole can be punched, the nodes' own QUIC connection (same TLS,
//! same NodeId pinning) travels through the tracker as opaque packets.
//!
//! The node's one UDP socket is wrapped in a [`RelaySocket`]. Each relay link the tracker
//! opens gets a placeholder address in 240.0.0.0/8 (reserved, never routed). Packets quinn
//! sends to a placeholder go on the node's relay stream to the tracker instead of the socket;
//! packets the tracker relays to us are handed to quinn as if they came from the placeholder.
//! Everything else (the tracker connection, direct peers) uses the socket unchanged. So there
//! is still one endpoint, one socket, and end-to-end QUIC between the nodes.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use qpeer_certs::NodeId;
use qpeer_tracker::relay::{gather_frames, RelayDecoder, RelayFrame};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::mpsc;

/// First octet of placeholder addresses.
const PLACEHOLDER_OCTET: u8 = 240;
/// Port of placeholder addresses (any non-zero value; quinn refuses port 0).
const PLACEHOLDER_PORT: u16 = 9;
/// Packets queued toward the tracker, and from it; past this, packets drop as UDP would.
const QUEUE: usize = 1024;

/// The placeholder address quinn uses for relay link `link` (a 24-bit id).
pub fn placeholder(link: u32) -> SocketAddr {
    let [_, a, b, c] = link.to_be_bytes();
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(PLACEHOLDER_OCTET, a, b, c)), PLACEHOLDER_PORT)
}

/// The relay link a placeholder address stands for.
pub fn link_of(addr: SocketAddr) -> Option<u32> {
    match addr.ip().to_canonical() {
        IpAddr::V4(v4) if v4.octets()[0] == PLACEHOLDER_OCTET && addr.port() == PLACEHOLDER_PORT => {
            let [_, a, b, c] = v4.octets();
            Some(u32::from_be_bytes([0, a, b, c]))
        }
        _ => None,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Queues between the socket wrapper and the tasks that talk to the tracker.
#[derive(Debug)]
pub struct RelayHub {
    inbound_tx: mpsc::Sender<RelayFrame>,
    inbound_rx: Mutex<mpsc::Receiver<RelayFrame>>,
    /// Encoded relay frames, ready for the relay stream.
    outbound_tx: mpsc::Sender<Bytes>,
    /// Taken by the relay pump of the current tracker connection.
    pub(crate) outbound_rx: tokio::sync::Mutex<mpsc::Receiver<Bytes>>,
    /// Links the tracker opened for us, and the peer at the other end.
    links: Mutex<HashMap<u32, NodeId>>,
    link_opened: tokio::sync::Notify,
}

impl RelayHub {
    pub fn new() -> Arc<Self> {
        let (inbound_tx, inbound_rx) = mpsc::channel(QUEUE);
        let (outbound_tx, outbound_rx) = mpsc::channel(QUEUE);
        Arc::new(Self {
            inbound_tx,
            inbound_rx: Mutex::new(inbound_rx),
            outbound_tx,
            outbound_rx: tokio::sync::Mutex::new(outbound_rx),
            links: Mutex::default(),
            link_opened: tokio::sync::Notify::new(),
        })
    }

    /// Records a link the tracker opened.
    pub fn add_link(&self, peer: NodeId, link: u32) {
        lock(&self.links).insert(link, peer);
        self.link_opened.notify_waiters();
    }

    /// Forgets every link (the tracker connection that carried them is gone).
    pub fn clear_links(&self) {
        lock(&self.links).clear();
    }

    /// The link to `peer`, if one is open.
    pub fn link_to(&self, peer: &NodeId) -> Option<u32> {
        lock(&self.links).iter().find(|(_, p)| *p == peer).map(|(link, _)| *link)
    }

    /// Waits until a link to `peer` is open.
    pub async fn wait_link(&self, peer: &NodeId) -> u32 {
        loop {
            let opened = self.link_opened.notified();
            if let Some(link) = self.link_to(peer) {
                return link;
            }
            opened.await;
        }
    }

    /// A frame the tracker relayed to us; dropped unless its link is ours.
    pub fn deliver(&self, frame: RelayFrame) -> bool {
        if !lock(&self.links).contains_key(&frame.link()) {
            return false;
        }
        self.inbound_tx.try_send(frame).is_ok()
    }
}

/// The node's UDP socket with the relay path spliced in.
#[derive(Debug)]
pub struct RelaySocket {
    inner: Arc<dyn AsyncUdpSocket>,
    hub: Arc<RelayHub>,
    ipv6: bool,
    /// Alternates which source `poll_recv` looks at first, so neither starves the other.
    relay_first: AtomicBool,
}

impl RelaySocket {
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, hub: Arc<RelayHub>) -> io::Result<Self> {
        let ipv6 = inner.local_addr()?.is_ipv6();
        Ok(Self { inner, hub, ipv6, relay_first: AtomicBool::new(true) })
    }

    /// Relayed packets, as many as are queued and fit `bufs` (one per buffer).
    fn poll_relay(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<usize> {
        let mut inbound = lock(&self.hub.inbound_rx);
        let mut filled = 0;
        for (buf, slot) in bufs.iter_mut().zip(meta.iter_mut()) {
            let next = if filled == 0 { inbound.poll_recv(cx) } else { Poll::Ready(inbound.try_recv().ok()) };
            let Poll::Ready(Some(frame)) = next else { break };
            let packet = frame.packet();
            let len = packet.len().min(buf.len());
            buf[..len].copy_from_slice(&packet[..len]);
            let mut addr = placeholder(frame.link());
            if self.ipv6 {
                if let IpAddr::V4(v4) = addr.ip() {
                    addr = SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), addr.port());
                }
            }
            *slot = RecvMeta { addr, len, stride: len, ecn: None, dst_ip: None };
            filled += 1;
        }
        if filled == 0 {
            Poll::Pending
        } else {
            Poll::Ready(filled)
        }
    }
}

impl AsyncUdpSocket for RelaySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let Some(link) = link_of(transmit.destination) else {
            return self.inner.try_send(transmit);
        };
        // A relayed transmit may hold several packets (GSO): the relay carries them one by one,
        // each framed in one allocation. A full queue drops the packet, like a congested link,
        // and QUIC recovers.
        let size = transmit.segment_size.unwrap_or(transmit.contents.len()).max(1);
        for packet in transmit.contents.chunks(size) {
            if let Ok(frame) = RelayFrame::new(link, packet) {
                let _ = self.hub.outbound_tx.try_send(frame.into_bytes());
            }
        }
        Ok(())
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
            self.inner.poll_recv(cx, bufs, meta)
        } else {
            if let Poll::Ready(result) = self.inner.poll_recv(cx, bufs, meta) {
                return Poll::Ready(result);
            }
            self.poll_relay(cx, bufs, meta).map(Ok)
        }
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

/// Moves packets between the hub and the tracker connection until it closes: our relayed
/// packets out on a uni stream we open, the tracker's relayed packets in from the uni stream
/// it opens.
pub async fn pump(hub: Arc<RelayHub>, tracker: quinn::Connection) {
    let outbound = async {
        let mut queue = hub.outbound_rx.lock().await;
        let mut send: Option<quinn::SendStream> = None;
        while let Some(first) = queue.recv().await {
            if send.is_none() {
                send = tracker.open_uni().await.ok();
            }
            let Some(stream) = send.as_mut() else { return };
            if stream.write_chunk(gather_frames(first, &mut queue)).await.is_err() {
                return;
            }
        }
    };
    let inbound = async {
        let Ok(mut recv) = tracker.accept_uni().await else { return };
        let mut decoder = RelayDecoder::default();
        while let Ok(Some(chunk)) = recv.read_chunk(64 * 1024, true).await {
            decoder.extend(&chunk.bytes);
            while let Some(frame) = decoder.next_frame() {
                if !hub.deliver(frame) {
                    tracing::trace!("dropping a relayed packet for an unknown link or a full queue");
                }
            }
        }
    };
    // Ends with the tracker connection, releasing the outbound queue for the next one.
    tokio::select! {
        _ = async { tokio::join!(outbound, inbound) } => {}
        _ = tracker.closed() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_roundtrip_and_are_recognized() {
        for link in [1u32, 255, 65_536, 0x00ff_ffff] {
            let addr = placeholder(link);
            assert_eq!(link_of(addr), Some(link));
            let mapped = SocketAddr::new(
                match addr.ip() {
                    IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
                    other => other,
                },
                addr.port(),
            );
            assert_eq!(link_of(mapped), Some(link));
        }
        assert_eq!(link_of("198.51.100.1:9".parse().expect("addr")), None);
        assert_eq!(link_of("240.0.0.1:4433".parse().expect("addr")), None);
    }
}
