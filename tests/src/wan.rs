//! An emulated WAN between two namespaces, and the `wan` benchmark scenario over it (the real
//! `qpeer` and `qpeer-tracker` binaries, and a raw quinn reference). Needs root, `ip` and `tc`;
//! the lab's kernels have no `netem`, so delay and loss are done in user space.
//!
//! ```text
//!  A (sender)  198.51.100.2 ── toa ┐        ┌ tob ── 203.0.113.2  B (receiver)
//!                                  R (router, "the internet", the tracker on 198.51.100.1)
//!                   iif toa → tunab ──► forwarder (RTT/2, loss) ──► tunba → main table → tob
//!                   iif tob → tunba ──► forwarder (RTT/2, loss) ──► tunab → main table → toa
//! ```
//! Policy rules in R send everything arriving from A into `tunab` and everything from B into
//! `tunba`; threads of this process read each packet there, hold it for RTT/2 (or drop it) and
//! write it into the other TUN device, from which the kernel routes it on normally. Packets to
//! R's own addresses (the tracker) go through the forwarder too (R's local table comes after
//! those rules): a node is RTT/2 from the tracker, and a relayed path is as long as the direct
//! one. The link rate is a `tbf` on R's veths toward A and toward B.
//!
//! Every [`Wan`] uses a unique namespace prefix ([`process_prefix`]); dropping it stops the
//! forwarder, ends every process inside its namespaces and deletes them.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::lab::{bin_dir, kill_namespace_processes, leftover_namespaces, netns_exec, run, Process};

/// Prefix shared by every namespace this process creates for the WAN (for leak checks).
pub fn process_prefix() -> String {
    format!("qpw{}x", std::process::id())
}

static NEXT_WAN: AtomicU32 = AtomicU32::new(0);

/// Sender side: A's address, and R's address on A's link (A's gateway, the tracker's address).
const A_ADDR: &str = "198.51.100.2";
const R_ADDR_A: &str = "198.51.100.1";
/// Receiver side: B's address, and R's address on B's link.
const B_ADDR: &str = "203.0.113.2";
const R_ADDR_B: &str = "203.0.113.1";

/// Why this machine cannot host the WAN: a typed error, so callers can tell "skip" from "broken".
#[derive(Debug)]
pub enum WanUnavailable {
    NotRoot,
    Missing(&'static str),
}

impl std::fmt::Display for WanUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WanUnavailable::NotRoot => {
                f.write_str("the wan scenario needs root (network namespaces, TUN devices, tc)")
            }
            WanUnavailable::Missing(tool) => write!(f, "the wan scenario needs `{tool}` (iproute2)"),
        }
    }
}

impl std::error::Error for WanUnavailable {}

/// One emulated link: round-trip time, rate (each direction) and random loss (each direction).
#[derive(Debug, Clone, Copy)]
pub struct Link {
    pub rtt: Duration,
    pub rate_mbit: u64,
    pub loss_pct: f64,
}

impl Link {
    /// Bandwidth-delay product in bytes.
    pub fn bdp(&self) -> u64 {
        (self.rate_mbit as f64 * 1e6 / 8.0 * self.rtt.as_secs_f64()) as u64
    }

    /// tbf bucket size: 1 ms of the rate, at least 64 KiB. The forwarder hands packets over in
    /// batches every [`TICK`] (~25 KB at 1 Gbit/s), and a UDP GSO batch is up to 64 KB: a
    /// bucket that holds either lets it through at once on the writing thread, where a smaller
    /// one makes tbf split GSO batches and wait for its watchdog timer packet by packet. 1 ms
    /// of rate is still a short line-rate burst next to any RTT measured here. Measured (raw
    /// reference, 1 Gbit/s, 20 ms, bbr): 64, 128 and 256 KiB gave 851, 860 and 873 Mbit/s, all
    /// within the run-to-run noise on this shared 2-core machine.
    pub fn tbf_burst(&self) -> u64 {
        (self.rate_mbit * 1_000_000 / 8 / 1000).max(64 << 10)
    }

    /// tbf queue (the bottleneck buffer): [`QUEUE_BDPS`] BDPs, at least 512 KiB.
    pub fn tbf_limit(&self) -> u64 {
        ((self.bdp() as f64 * QUEUE_BDPS) as u64).max(512 << 10)
    }
}

/// The bottleneck buffer in BDPs. One BDP is the textbook buffer, but quinn's BBR overshoots it
/// in startup: at 100 Mbit/s and 100 ms the raw reference lost ~4 000 packets in the tbf queue
/// and reached 70-78 % of the rate with one BDP, 533 packets and 80 % with two; at 1 Gbit/s and
/// 100 ms, 655 drops and 773 Mbit/s against none and 799 Mbit/s. The floor keeps short RTTs
/// from a buffer of a few packets, which no real bottleneck has.
const QUEUE_BDPS: f64 = 2.0;

/// Packets forwarded and dropped by the emulator, per direction ([A→B, B→A]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub forwarded: [u64; 2],
    /// Random loss, by the forwarder.
    pub dropped: [u64; 2],
    /// Dropped by the bottleneck (the tbf queues toward B and toward A were full); a GSO batch
    /// tbf drops whole counts once.
    pub queue_dropped: [u64; 2],
}

impl Counters {
    /// What happened since `earlier`.
    pub fn since(&self, earlier: &Counters) -> Counters {
        let sub = |a: [u64; 2], b: [u64; 2]| [a[0].saturating_sub(b[0]), a[1].saturating_sub(b[1])];
        Counters {
            forwarded: sub(self.forwarded, earlier.forwarded),
            dropped: sub(self.dropped, earlier.dropped),
            queue_dropped: sub(self.queue_dropped, earlier.queue_dropped),
        }
    }
}

/// How often the forwarder wakes while packets are in flight. Waking per packet would cost a
/// core at 1 Gbit/s (~85 000 packets a second); each wake instead reads every packet waiting
/// and writes every packet due, so a packet's delay is within ±TICK of the target.
const TICK: Duration = Duration::from_micros(200);

/// Settings and counters shared with the forwarder threads.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// One-way delay in nanoseconds.
    delay_ns: AtomicU64,
    /// Drop probability scaled to 2^32.
    loss: AtomicU64,
    /// Bumped on every reconfiguration: the threads reseed their loss generator, so that
    /// each row drops the same packets in every run.
    generation: AtomicU64,
    forwarded: [AtomicU64; 2],
    dropped: [AtomicU64; 2],
}

/// A TUN device's file, non-blocking.
#[derive(Clone)]
struct Tun(Arc<File>);

/// From linux/if_tun.h (not in the libc crate): `_IOW('T', 202, int)`, `_IOW('T', 208,
/// unsigned int)` and their flags.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_VNET_HDR: libc::c_int = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_USO4: libc::c_uint = 0x20;
const TUN_F_USO6: libc::c_uint = 0x40;

/// `struct ifreq` as TUNSETIFF reads it: a name and the flags, padded to 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tun {
    /// Creates TUN device `name` (IFF_TUN, no packet information, a `virtio_net_hdr` before
    /// each packet) in the calling thread's namespace; it lives as long as the file.
    #[allow(unsafe_code)]
    fn open(name: &str) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .context("cannot open /dev/net/tun")?;
        let flags = libc::IFF_TUN | libc::IFF_NO_PI | IFF_VNET_HDR;
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: flags as _, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: `req` is a valid ifreq for TUNSETIFF and outlives the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
            return Err(std::io::Error::last_os_error()).context(format!("TUNSETIFF {name}"));
        }
        // Take UDP GSO batches whole (see `forward`; the kernel wants both USO flags); a
        // kernel without USO (before 6.2) segments them before the device, which costs CPU.
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD as _, TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6) }
            < 0
        {
            // SAFETY: as above.
            unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD as _, 0 as libc::c_uint) };
        }
        Ok(Self(Arc::new(file)))
    }

    /// Waits up to `timeout` for a packet to read.
    #[allow(unsafe_code)]
    fn wait_readable(&self, timeout: Duration) {
        let mut fd = libc::pollfd { fd: self.0.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut fd, 1, timeout.as_millis() as libc::c_int) };
    }
}

/// Moves the calling thread into namespace `netns` (its sockets and TUN devices are made there
/// from then on). Call it on a thread of its own.
#[allow(unsafe_code)]
fn enter_netns(netns: &str) -> Result<()> {
    let file =
        File::open(format!("/var/run/netns/{netns}")).with_context(|| format!("no namespace {netns}"))?;
    // SAFETY: a namespace file descriptor, valid for the call.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("setns {netns}"));
    }
    Ok(())
}

/// Runs `f` on a thread inside `netns` and returns its result.
fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let name = netns.to_string();
    std::thread::spawn(move || {
        enter_netns(&name)?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in {netns:?} panicked"))?
}

/// `SO_SNDBUFFORCE` / `SO_RCVBUFFORCE` (asm-generic; not in the libc crate for Linux).
const SO_SNDBUFFORCE: libc::c_int = 32;
const SO_RCVBUFFORCE: libc::c_int = 33;

/// Socket buffers for the reference: 16 MiB, beyond `net.core.[rw]mem_max` (which the FORCE
/// variants ignore, as root), so that a window's worth of packets is not dropped by the
/// socket while a single-threaded endpoint catches up.
const SOCKET_BUFFER: libc::c_int = 16 << 20;

#[allow(unsafe_code)]
fn enlarge_buffers(socket: &UdpSocket) {
    let set = |name: libc::c_int| {
        // SAFETY: a c_int option value for a valid socket.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                (&SOCKET_BUFFER as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    for (force, plain) in [(SO_RCVBUFFORCE, libc::SO_RCVBUF), (SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
        if set(force) != 0 {
            set(plain);
        }
    }
}

/// A UDP socket bound to `addr` inside `netns`, with large buffers (a socket stays in the
/// namespace it was made in).
fn bind_in(netns: &str, addr: SocketAddr) -> Result<UdpSocket> {
    in_netns(netns, move || {
        let socket = UdpSocket::bind(addr).with_context(|| format!("cannot bind {addr}"))?;
        socket.set_nonblocking(true)?;
        enlarge_buffers(&socket);
        Ok(socket)
    })
}

/// xorshift64*: the loss decisions, deterministic per seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The `virtio_net_hdr` in front of every packet on a TUN device with `IFF_VNET_HDR`.
const VNET_HDR: usize = 10;
/// `VIRTIO_NET_HDR_GSO_UDP_L4`: a UDP segmentation offload batch (what quinn sends).
const GSO_UDP_L4: u8 = 5;

/// How many packets on the wire a packet read from a TUN device stands for: a UDP GSO batch
/// (header, IPv4 and UDP headers, then `gso_size` bytes per datagram) is several.
fn wire_packets(packet: &[u8]) -> Option<(usize, usize)> {
    let gso_size = usize::from(u16::from_le_bytes([*packet.get(4)?, *packet.get(5)?]));
    let ip = packet.get(VNET_HDR..)?;
    if packet[1] & 0x7f != GSO_UDP_L4 || gso_size == 0 || ip.first()? >> 4 != 4 || *ip.get(9)? != 17 {
        return None;
    }
    let payload = ip.len().checked_sub(usize::from(ip[0] & 0xf) * 4 + 8)?;
    Some((gso_size, payload.div_ceil(gso_size)))
}

/// The Internet checksum's one's-complement sum of `data`, added to `sum`.
fn ones_sum(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Splits a UDP GSO batch into its datagrams, as the kernel would, keeping those `keep`
/// says: each a packet of its own with complete IPv4 and UDP checksums (no offload).
fn split_batch(packet: &[u8], gso_size: usize, keep: &[bool], mut out: impl FnMut(Vec<u8>)) {
    let ip = &packet[VNET_HDR..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let id = u16::from_be_bytes([ip[4], ip[5]]);
    for (i, data) in ip[ihl + 8..].chunks(gso_size).enumerate() {
        if !keep.get(i).copied().unwrap_or(true) {
            continue;
        }
        let mut p = Vec::with_capacity(VNET_HDR + ihl + 8 + data.len());
        p.extend_from_slice(&[0; VNET_HDR]);
        p.extend_from_slice(&ip[..ihl + 8]);
        p.extend_from_slice(data);
        let h = &mut p[VNET_HDR..];
        let (total, udp_len) = ((ihl + 8 + data.len()) as u16, (8 + data.len()) as u16);
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
        h[10..12].fill(0);
        let ip_sum = !fold(ones_sum(0, &h[..ihl]));
        h[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        h[ihl + 4..ihl + 6].copy_from_slice(&udp_len.to_be_bytes());
        h[ihl + 6..ihl + 8].fill(0);
        let pseudo = ones_sum(ones_sum(17 + u32::from(udp_len), &h[12..16]), &h[16..20]);
        let udp_sum = match !fold(ones_sum(pseudo, &h[ihl..])) {
            0 => 0xffff,
            sum => sum,
        };
        h[ihl + 6..ihl + 8].copy_from_slice(&udp_sum.to_be_bytes());
        out(p);
    }
}

/// Largest packet read from a TUN device: a whole GSO batch and its header.
const PACKET: usize = VNET_HDR + 65536;

/// A packet held in the emulator: when it is due, how many packets on the wire it stands for.
struct Held {
    due: Instant,
    wire: u64,
    bytes: Vec<u8>,
}

/// One direction of the emulator: packets from `input` to `output`, in order, each held for
/// the configured delay (a FIFO of due times, as the delay is the same for every packet).
/// UDP GSO batches pass whole (one read, one write and one trip through routing and tbf for
/// up to 64 KB; B's quinn socket takes them with UDP GRO), which is what lets a 2-core machine
/// carry 1 Gbit/s; loss is still decided per datagram, and a batch that loses one is split.
fn forward(input: Tun, output: Tun, direction: usize, shared: Arc<Shared>) {
    let mut queue: VecDeque<Held> = VecDeque::new();
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut scratch = vec![0u8; PACKET];
    let mut keep = Vec::new();
    let mut generation = u64::MAX;
    let mut rng = Rng(1);
    let (mut delay, mut loss) = (Duration::ZERO, 0u64);
    while !shared.stop.load(Ordering::Relaxed) {
        let current = shared.generation.load(Ordering::Acquire);
        if current != generation {
            generation = current;
            rng = Rng((0x9e37_79b9_7f4a_7c15 ^ (generation << 8) ^ direction as u64) | 1);
            delay = Duration::from_nanos(shared.delay_ns.load(Ordering::Relaxed));
            loss = shared.loss.load(Ordering::Relaxed);
        }
        // Everything waiting, stamped with one due time: read late by up to a TICK, written
        // late by up to a TICK, hence the TICK taken off.
        let due = Instant::now() + delay.saturating_sub(TICK);
        while let Ok(n) = (&*input.0).read(&mut scratch) {
            let packet = &scratch[..n];
            let batch = wire_packets(packet);
            let count = batch.map_or(1, |(_, count)| count);
            keep.clear();
            keep.extend((0..count).map(|_| loss == 0 || (rng.next() >> 32) >= loss));
            let kept = keep.iter().filter(|k| **k).count();
            shared.dropped[direction].fetch_add((count - kept) as u64, Ordering::Relaxed);
            if kept == count {
                let mut bytes = pool.pop().unwrap_or_default();
                bytes.clear();
                bytes.extend_from_slice(packet);
                queue.push_back(Held { due, wire: count as u64, bytes });
            } else if let (Some((gso_size, _)), true) = (batch, kept > 0) {
                split_batch(packet, gso_size, &keep, |bytes| queue.push_back(Held { due, wire: 1, bytes }));
            }
        }
        let now = Instant::now();
        while queue.front().is_some_and(|held| held.due <= now) {
            let Some(held) = queue.pop_front() else { break };
            // A write fails only when the device is going away.
            if (&*output.0).write(&held.bytes).is_ok() {
                shared.forwarded[direction].fetch_add(held.wire, Ordering::Relaxed);
            }
            pool.push(held.bytes);
        }
        if queue.is_empty() {
            input.wait_readable(Duration::from_millis(20));
        } else {
            std::thread::sleep(TICK);
        }
    }
}

/// The forwarder threads and the TUN devices they own.
struct Forwarder {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Forwarder {
    fn start(ab: Tun, ba: Tun) -> Self {
        let shared = Arc::new(Shared::default());
        let threads = [(ab.clone(), ba.clone(), 0), (ba, ab, 1)]
            .into_iter()
            .map(|(input, output, direction)| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("wan-forward-{direction}"))
                    .spawn(move || forward(input, output, direction, shared))
                    .expect("spawn a forwarder thread")
            })
            .collect();
        Self { shared, threads }
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The emulated WAN: namespaces A, B, R and the forwarder. Removed on drop.
pub struct Wan {
    prefix: String,
    namespaces: Vec<String>,
    /// The sender's namespace (198.51.100.2).
    pub a: String,
    /// The receiver's namespace (203.0.113.2).
    pub b: String,
    /// The router's namespace (198.51.100.1, 203.0.113.1; the tracker runs here).
    pub r: String,
    forwarder: Option<Forwarder>,
}

/// Whether `program args` can run at all.
fn available(program: &str, args: &[&str]) -> bool {
    Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

impl Wan {
    /// Builds the topology with a link that does nothing yet (no delay, no loss, no rate):
    /// call [`Wan::configure`]. Fails with [`WanUnavailable`] when the machine cannot host it.
    #[allow(unsafe_code)]
    pub fn new() -> Result<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(WanUnavailable::NotRoot.into());
        }
        for tool in ["ip", "tc"] {
            if !available(tool, &["-V"]) {
                return Err(WanUnavailable::Missing(tool).into());
            }
        }
        let prefix = format!("{}{}", process_prefix(), NEXT_WAN.fetch_add(1, Ordering::Relaxed));
        let mut wan = Self {
            a: format!("{prefix}-a"),
            b: format!("{prefix}-b"),
            r: format!("{prefix}-r"),
            prefix,
            namespaces: Vec::new(),
            forwarder: None,
        };
        wan.build().context("cannot build the emulated WAN")?;
        Ok(wan)
    }

    fn build(&mut self) -> Result<()> {
        let (a, b, r) = (self.a.clone(), self.b.clone(), self.r.clone());
        for netns in [&r, &a, &b] {
            run("ip", &["netns", "add", netns])?;
            self.namespaces.push(netns.clone());
            self.ip(netns, &["link", "set", "lo", "up"])?;
            // IPv4 only: no router solicitations or MLD reports wandering through the forwarder.
            self.sysctl(
                netns,
                &["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"],
            )?;
        }
        for (host, port, host_addr, router_addr) in
            [(&a, "toa", A_ADDR, R_ADDR_A), (&b, "tob", B_ADDR, R_ADDR_B)]
        {
            self.ip(&r, &["link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host])?;
            self.ip(&r, &["addr", "add", &format!("{router_addr}/24"), "dev", port])?;
            self.ip(&r, &["link", "set", port, "up"])?;
            self.ip(host, &["addr", "add", &format!("{host_addr}/24"), "dev", "eth0"])?;
            self.ip(host, &["link", "set", "eth0", "up"])?;
            self.ip(host, &["route", "add", "default", "via", router_addr])?;
            // R answers no ARP for its own addresses once its local table comes after the
            // delay rules (below): the hosts know its MAC address instead.
            let mac = netns_exec(&r, "cat", &[&format!("/sys/class/net/{port}/address")])?;
            self.ip(
                host,
                &["neigh", "replace", router_addr, "lladdr", mac.trim(), "dev", "eth0", "nud", "permanent"],
            )?;
        }
        let (ab, ba) = in_netns(&r, || Ok((Tun::open("tunab")?, Tun::open("tunba")?)))?;
        for tun in ["tunab", "tunba"] {
            // Room for a burst that arrives between two forwarder wakes, with a plain FIFO (no
            // fq_codel dropping packets the forwarder has not read yet).
            self.ip(&r, &["link", "set", tun, "txqueuelen", "10000", "up"])?;
            netns_exec(&r, "tc", &["qdisc", "replace", "dev", tun, "root", "pfifo", "limit", "10000"])?;
        }
        // Packets re-entering from a TUN device fail strict reverse-path filtering (their source
        // is reached through a veth): off everywhere, as the effective value is the maximum.
        let mut settings = vec!["net.ipv4.ip_forward=1".to_string()];
        for dev in ["all", "default", "lo", "toa", "tob", "tunab", "tunba"] {
            settings.push(format!("net.ipv4.conf.{dev}.rp_filter=0"));
        }
        self.sysctl(&r, &settings.iter().map(String::as_str).collect::<Vec<_>>())?;
        self.ip(&r, &["rule", "add", "pref", "10", "iif", "toa", "lookup", "101"])?;
        self.ip(&r, &["route", "add", "default", "dev", "tunab", "table", "101"])?;
        self.ip(&r, &["rule", "add", "pref", "11", "iif", "tob", "lookup", "102"])?;
        self.ip(&r, &["route", "add", "default", "dev", "tunba", "table", "102"])?;
        // The local table after those rules: packets to the tracker are delayed too, so a
        // relayed path is as long as the direct one (a tracker at no distance would make the
        // relay the shortest path, and a connection that starts relayed would carry a far too
        // small RTT into its direct path).
        self.ip(&r, &["rule", "add", "pref", "100", "lookup", "local"])?;
        self.ip(&r, &["rule", "del", "pref", "0", "lookup", "local"])?;
        self.forwarder = Some(Forwarder::start(ab, ba));
        Ok(())
    }

    fn ip(&self, netns: &str, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", netns];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    fn sysctl(&self, netns: &str, settings: &[&str]) -> Result<()> {
        let mut args = vec!["-qw"];
        args.extend_from_slice(settings);
        netns_exec(netns, "sysctl", &args).map(drop)
    }

    /// Sets the link in place: the rate on both of R's veths, delay and loss in the forwarder.
    pub fn configure(&self, link: &Link) -> Result<()> {
        let (rate, burst, limit) =
            (format!("{}mbit", link.rate_mbit), link.tbf_burst().to_string(), link.tbf_limit().to_string());
        for dev in ["toa", "tob"] {
            let args = [
                "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst", &burst, "limit",
                &limit,
            ];
            netns_exec(&self.r, "tc", &args).context("cannot shape the link (tc tbf)")?;
        }
        let shared = &self.forwarder.as_ref().context("no forwarder")?.shared;
        shared.delay_ns.store((link.rtt / 2).as_nanos() as u64, Ordering::Relaxed);
        shared.loss.store((link.loss_pct / 100.0 * 4_294_967_296.0) as u64, Ordering::Relaxed);
        shared.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// The emulator's counters since it started.
    pub fn counters(&self) -> Counters {
        let mut counters = Counters::default();
        if let Some(forwarder) = &self.forwarder {
            for direction in 0..2 {
                counters.forwarded[direction] = forwarder.shared.forwarded[direction].load(Ordering::Relaxed);
                counters.dropped[direction] = forwarder.shared.dropped[direction].load(Ordering::Relaxed);
            }
        }
        for (direction, dev) in ["tob", "toa"].into_iter().enumerate() {
            counters.queue_dropped[direction] = self.qdisc_drops(dev).unwrap_or(0);
        }
        counters
    }

    /// Packets the root qdisc of R's `dev` dropped so far: `tc -s` prints
    /// ` Sent 123 bytes 45 pkt (dropped 6, overlimits 7 requeues 0)`.
    fn qdisc_drops(&self, dev: &str) -> Option<u64> {
        let stats = netns_exec(&self.r, "tc", &["-s", "qdisc", "show", "dev", dev, "root"]).ok()?;
        stats.split("(dropped ").nth(1)?.split(',').next()?.trim().parse().ok()
    }

    /// `ip netns exec NETNS program args`: `ip` execs the program, so the child's pid is the
    /// program's.
    pub fn command(&self, netns: &str, program: &Path, args: &[String]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", netns]).arg(program).args(args);
        command
    }

    /// Starts `program args` inside `netns`, collecting its output.
    pub fn spawn(&self, netns: &str, program: &Path, args: &[String]) -> Result<Process> {
        Process::spawn(self.command(netns, program, args))
            .with_context(|| format!("cannot start {} in {netns}", program.display()))
    }

    /// The prefix of every namespace of this WAN.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        if let Some(mut forwarder) = self.forwarder.take() {
            forwarder.stop();
        }
        for netns in self.namespaces.iter().rev() {
            kill_namespace_processes(netns);
        }
        for netns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", netns]).status();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The scenario.

/// Which payloads a row sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    File,
    Tree,
    Both,
}

impl std::str::FromStr for Payload {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "file" => Ok(Payload::File),
            "tree" => Ok(Payload::Tree),
            "both" => Ok(Payload::Both),
            _ => bail!("--payload is file, tree or both, not {s:?}"),
        }
    }
}

/// Options of `qpeer-bench wan`.
#[derive(Debug, Clone)]
pub struct Options {
    pub rtt_ms: Vec<u64>,
    pub rate_mbit: Vec<u64>,
    pub loss_pct: Vec<f64>,
    pub payload: Payload,
    pub file_mib: u64,
    pub files: usize,
    /// Passed to both `qpeer` processes as `--congestion`, and the reference's controller;
    /// `None`: the nodes' default, and bbr for the reference.
    pub congestion: Option<String>,
    pub reference: bool,
    /// Only the raw reference, no `qpeer` (for validating the emulator): one line per row.
    pub reference_only: bool,
    /// One small row that checks the payloads arrive identical.
    pub smoke: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            rtt_ms: vec![20, 50, 100, 150],
            rate_mbit: vec![100, 1000],
            loss_pct: vec![0.0, 1.0],
            payload: Payload::Both,
            file_mib: 1024,
            files: 10_000,
            congestion: None,
            reference: true,
            reference_only: false,
            smoke: false,
        }
    }
}

/// Size of each file of the tree payload.
const TREE_FILE: usize = 4096;

/// Writes `files` files of random bytes under `root`, spread over 16 directories, and syncs
/// once at the end (a sync per file would take longer than sending them).
#[allow(unsafe_code)]
fn write_tree(root: &Path, files: usize) -> Result<()> {
    let mut state = 0x1234_5678_9abc_def1u64;
    let mut block = vec![0u8; TREE_FILE];
    for i in 0..files {
        let dir = root.join(format!("d{:02}", i % 16));
        if i < 16 {
            std::fs::create_dir_all(&dir)?;
        }
        for chunk in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        std::fs::write(dir.join(format!("f{i:05}.bin")), &block)?;
    }
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    Ok(())
}

/// Regular files and their total size under `path` (a file or a tree); fails on a `.part`.
fn file_count_and_bytes(path: &Path) -> Result<(u64, u64)> {
    let meta = std::fs::symlink_metadata(path).with_context(|| format!("{} is missing", path.display()))?;
    if meta.is_file() {
        if path.extension().is_some_and(|e| e == "part") {
            bail!("{} is still partial", path.display());
        }
        return Ok((1, meta.len()));
    }
    let mut total = (0, 0);
    for entry in std::fs::read_dir(path)? {
        let (files, bytes) = file_count_and_bytes(&entry?.path())?;
        total = (total.0 + files, total.1 + bytes);
    }
    Ok(total)
}

/// Stdout lines of a program, each stamped when it was read.
#[derive(Clone, Default)]
struct Stamped(Arc<Mutex<Vec<(Instant, String)>>>);

impl Stamped {
    fn snapshot(&self) -> Vec<(Instant, String)> {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn len(&self) -> usize {
        self.0.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// The first line from index `from` on that starts with `prefix`, waiting up to `timeout`.
    fn wait_for(&self, from: usize, prefix: &str, timeout: Duration) -> Option<(Instant, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.snapshot().into_iter().skip(from).find(|(_, l)| l.starts_with(prefix)) {
                return Some(line);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A long-running program whose stdout lines are stamped on arrival (the receiver: its
/// `[PROGRESS]` and `[DONE]` lines time the transfer); killed on drop.
struct Listener {
    child: Child,
    stdout: Stamped,
}

impl Listener {
    fn spawn(mut command: Command) -> Result<Self> {
        let mut child = command
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = Stamped::default();
        let lines = stdout.clone();
        let pipe = child.stdout.take().context("stdout")?;
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Ok(mut l) = lines.0.lock() {
                    l.push((Instant::now(), line));
                }
            }
        });
        Ok(Self { child, stdout })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Peak resident set size (VmHWM) of process `pid` if it runs `program` (and not yet the
/// `ip netns exec` that becomes it), in KiB.
fn peak_rss_kib(pid: u32, program: &str) -> Option<u64> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    if exe.file_name()? != program {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// Resets a process's VmHWM to its current RSS (`clear_refs` 5), so that a long-running
/// receiver's peak is per payload.
fn reset_peak_rss(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// The tracker in R and the receiving `qpeer listen` in B, for the whole run.
struct Nodes {
    _tracker: Process,
    receiver: Listener,
    receiver_id: String,
    tracker: String,
    inbox: PathBuf,
    dir: PathBuf,
    congestion: Option<String>,
}

impl Nodes {
    fn start(wan: &Wan, bins: &Path, dir: &Path, congestion: Option<String>) -> Result<Self> {
        let home = |name: &str| dir.join(name).display().to_string();
        let tracker_args =
            vec!["--listen".to_string(), format!("{R_ADDR_A}:0"), "--home".into(), home("trk")];
        let tracker_proc = wan.spawn(&wan.r, &bins.join("qpeer-tracker"), &tracker_args)?;
        let tracker = tracker_proc
            .stdout
            .wait_for(Duration::from_secs(30), |l| l.starts_with("[TRACKER] "))?
            .trim_start_matches("[TRACKER] ")
            .to_string();
        let sender_id = crate::lab_run::node_id(&home("s"))?;
        let inbox = dir.join("inbox");
        let mut listen_args = vec![
            "listen".to_string(),
            "--out".into(),
            inbox.display().to_string(),
            "--accept-from".into(),
            sender_id,
        ];
        listen_args.extend(common_args(dir, &tracker, congestion.as_deref(), "r", B_ADDR));
        let receiver = Listener::spawn(wan.command(&wan.b, &bins.join("qpeer"), &listen_args))?;
        let (_, registered) = receiver
            .stdout
            .wait_for(0, "[REGISTERED] ", Duration::from_secs(30))
            .context("the receiver did not register within 30 s")?;
        let receiver_id = registered.rsplit(' ').next().context("no id")?.to_string();
        Ok(Self {
            _tracker: tracker_proc,
            receiver,
            receiver_id,
            tracker,
            inbox,
            dir: dir.to_path_buf(),
            congestion,
        })
    }

    /// Arguments of a quiet `qpeer send` of `payload` from the sender's home in A.
    fn send_args(&self, payload: &Path) -> Vec<String> {
        let mut args = vec![
            "send".to_string(),
            self.receiver_id.clone(),
            payload.display().to_string(),
            "--quiet".into(),
        ];
        args.extend(common_args(&self.dir, &self.tracker, self.congestion.as_deref(), "s", A_ADDR));
        args
    }

    /// Empties the inbox (files and `.part`s), so that nothing of a payload is already there.
    fn clear_inbox(&self) -> Result<()> {
        if !self.inbox.exists() {
            return Ok(());
        }
        for entry in std::fs::read_dir(&self.inbox)? {
            let path = entry?.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }
}

/// `--home DIR/NAME --tracker T --bind ADDR:0 [--congestion C]`.
fn common_args(dir: &Path, tracker: &str, congestion: Option<&str>, name: &str, addr: &str) -> Vec<String> {
    let mut args = vec![
        "--home".to_string(),
        dir.join(name).display().to_string(),
        "--tracker".into(),
        tracker.to_string(),
        "--bind".into(),
        format!("{addr}:0"),
    ];
    if let Some(congestion) = congestion {
        args.extend(["--congestion".to_string(), congestion.to_string()]);
    }
    args
}

/// What one `qpeer send` of a payload measured.
struct Sent {
    ttfb: Option<Duration>,
    data_seconds: Option<f64>,
    whole_seconds: f64,
    sender_peak_kib: Option<u64>,
    receiver_peak_kib: Option<u64>,
}

/// Sends `payload` from A to the receiver with a fresh `qpeer send`; checks it arrived
/// complete (and identical when `compare`).
fn send(wan: &Wan, bins: &Path, nodes: &Nodes, payload: &Path, link: &Link, compare: bool) -> Result<Sent> {
    nodes.clear_inbox()?;
    let receiver_pid = nodes.receiver.child.id();
    reset_peak_rss(receiver_pid);
    let args = nodes.send_args(payload);
    let (expected_files, expected_bytes) = file_count_and_bytes(payload)?;
    let mark = nodes.receiver.stdout.len();
    let timeout = Duration::from_secs(120 + expected_bytes * 8 * 20 / (link.rate_mbit * 1_000_000));
    let started = Instant::now();
    let mut sender = wan.spawn(&wan.a, &bins.join("qpeer"), &args)?;
    let mut sender_peak = None;
    let status = loop {
        if let Some(kib) = peak_rss_kib(sender.pid(), "qpeer") {
            sender_peak = Some(sender_peak.unwrap_or(0).max(kib));
        }
        if let Some(status) = sender.child.try_wait()? {
            break status;
        }
        if started.elapsed() > timeout {
            sender.kill();
            bail!("qpeer send still running after {timeout:?}\n{}", sender.stderr.text());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !status.success() {
        // The receiver's last lines say what it saw (paths, failures).
        let seen: Vec<String> = nodes
            .receiver
            .stdout
            .snapshot()
            .into_iter()
            .skip(mark)
            .map(|(at, line)| format!("receiver {:>8.3} s │ {line}", (at - started).as_secs_f64()))
            .collect();
        let tail = seen[seen.len().saturating_sub(30)..].join("\n");
        bail!("qpeer send failed ({status}):\n{}\n{}\n{tail}", sender.stdout.text(), sender.stderr.text());
    }
    let lines = &nodes.receiver.stdout;
    let (done_at, done) = lines
        .wait_for(mark, "[DONE]", Duration::from_secs(30))
        .context("the receiver printed no [DONE] line within 30 s of the sender's exit")?;
    let receiver_peak = peak_rss_kib(receiver_pid, "qpeer");
    // QPEER_BENCH_VERBOSE=1: both sides' lines of this send on stderr (to see paths, retries).
    if std::env::var_os("QPEER_BENCH_VERBOSE").is_some() {
        for (at, line) in lines.snapshot().into_iter().skip(mark) {
            eprintln!("receiver {:>8.3} s │ {line}", (at - started).as_secs_f64());
        }
        eprintln!("sender stdout │ {}\nsender stderr │ {}", sender.stdout.text(), sender.stderr.text());
    }
    let first_progress = lines
        .snapshot()
        .into_iter()
        .skip(mark)
        .find(|(at, l)| l.starts_with("[PROGRESS]") && *at <= done_at)
        .map(|(at, _)| at);
    let name = payload.file_name().context("payload name")?;
    let received = nodes.inbox.join(name);
    let (files, bytes) = file_count_and_bytes(&received)?;
    if (files, bytes) != (expected_files, expected_bytes) {
        bail!(
            "{} files, {bytes} bytes arrived of {expected_files} files, {expected_bytes} bytes ({done})",
            files
        );
    }
    if compare {
        crate::assert_same_tree(payload, &received)?;
    }
    Ok(Sent {
        ttfb: first_progress.map(|at| at - started),
        data_seconds: first_progress.map(|at| (done_at - at).as_secs_f64()),
        whole_seconds: (done_at - started).as_secs_f64(),
        sender_peak_kib: sender_peak,
        receiver_peak_kib: receiver_peak,
    })
}

/// A congestion controller factory by `--congestion` name (bbr when none is given).
fn controller(name: Option<&str>) -> Result<Arc<dyn quinn::congestion::ControllerFactory + Send + Sync>> {
    Ok(match name.unwrap_or("bbr") {
        "bbr" => Arc::new(quinn::congestion::BbrConfig::default()),
        "rate" => Arc::new(qpeer_node::congestion::RateControllerConfig::default()),
        "cubic" => Arc::new(quinn::congestion::CubicConfig::default()),
        "newreno" => Arc::new(quinn::congestion::NewRenoConfig::default()),
        other => bail!("no reference congestion controller {other:?} (bbr, rate, cubic, newreno)"),
    })
}

/// Raw quinn over the emulated link: one bidirectional stream of `bytes` from A to B,
/// goodput in Mbit/s from the first byte received to the last. Flow-control windows are twice
/// the BDP (at least 4 MiB), so that only the link and the controller limit it.
async fn reference(wan: &Wan, link: &Link, bytes: u64, congestion: Option<&str>) -> Result<f64> {
    let window = (2 * link.bdp()).max(4 << 20);
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(quinn::VarInt::from_u64(window)?)
        .receive_window(quinn::VarInt::from_u64(window)?)
        .send_window(window)
        .congestion_controller_factory(controller(congestion)?);
    let transport = Arc::new(transport);
    let server_id = qpeer_certs::Identity::generate()?;
    let client_id = qpeer_certs::Identity::generate()?;
    let mut server_config = qpeer_certs::server_config(&server_id, &[b"bench"])?;
    server_config.transport_config(transport.clone());
    let runtime = Arc::new(quinn::TokioRuntime);
    let server = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        bind_in(&wan.b, format!("{B_ADDR}:0").parse()?)?,
        runtime.clone(),
    )?;
    let addr = server.local_addr()?;
    let sink = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let (mut send, mut recv) = conn.accept_bi().await?;
        let (mut total, mut first, mut last) = (0u64, None, Instant::now());
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
            last = Instant::now();
            first.get_or_insert(last);
            total += chunk.bytes.len() as u64;
        }
        send.write_all(&[1]).await?;
        send.finish()?;
        let _ = conn.closed().await;
        anyhow::Ok((total, first.map(|first| last - first)))
    });
    let client = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        bind_in(&wan.a, format!("{A_ADDR}:0").parse()?)?,
        runtime,
    )?;
    let mut config = qpeer_certs::client_config(
        &client_id,
        &qpeer_certs::ServerTrust::Pinned(server_id.node_id()),
        &[b"bench"],
    )?;
    config.transport_config(transport);
    let conn = client.connect_with(config, addr, "qpeer")?.await?;
    crate::bulk_send(&conn, bytes).await?;
    conn.close(0u32.into(), b"done");
    let (received, took) = sink.await??;
    if received != bytes {
        bail!("raw quinn delivered {received} of {bytes} bytes");
    }
    client.wait_idle().await;
    let seconds = took.context("no bytes")?.as_secs_f64();
    Ok(bytes as f64 * 8.0 / seconds / 1e6)
}

/// `Some(x)` with `decimals`, or JSON null.
fn json_num(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "null".to_string(), |v| format!("{v:.decimals$}"))
}

/// Runs `qpeer-bench wan`: for each (rtt, rate, loss), the raw reference once (its figures on
/// every line of the row), then each payload with a fresh `qpeer send`; one JSON line per
/// payload per row. Checks afterwards that no namespace of the run is left.
pub fn bench(options: &Options) -> Result<()> {
    let options = if options.smoke {
        Options {
            rtt_ms: vec![20],
            rate_mbit: vec![100],
            loss_pct: vec![1.0],
            file_mib: 8,
            files: 200,
            ..options.clone()
        }
    } else {
        options.clone()
    };
    let prefix;
    {
        let wan = Wan::new()?;
        prefix = wan.prefix().to_string();
        let buffers = SocketBufferLimits::raise(qpeer_node::SOCKET_BUFFER)?;
        clean_up_on_signal(prefix.clone(), buffers.0.clone());
        bench_in(&wan, &options)?;
        drop(buffers);
    }
    let left = leftover_namespaces(&prefix);
    if !left.is_empty() {
        bail!("namespaces left behind: {left:?}");
    }
    Ok(())
}

/// On SIGINT or SIGTERM (a CI timeout, Ctrl-C): ends what runs in this run's namespaces,
/// deletes them, puts the socket buffer limits back and exits 130 / 143, since the
/// interrupted main thread never reaches its drops.
fn clean_up_on_signal(prefix: String, limits: Vec<(&'static str, String)>) {
    std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        let code = runtime.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) =
                (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
            else {
                return None;
            };
            tokio::select! {
                _ = int.recv() => Some(130),
                _ = term.recv() => Some(143),
            }
        });
        let Some(code) = code else { return };
        let left = leftover_namespaces(&prefix);
        for netns in &left {
            kill_namespace_processes(netns);
        }
        for netns in &left {
            let _ = Command::new("ip").args(["netns", "del", netns]).status();
        }
        for (path, value) in &limits {
            let _ = std::fs::write(path, value);
        }
        eprintln!("qpeer-bench wan: stopped by a signal; removed {} namespaces", left.len());
        std::process::exit(code);
    });
}

/// `net.core.rmem_max` / `wmem_max` raised (never lowered) to what a node asks for, as the
/// README tells users of fast links to do; the old values come back on drop. Without it Linux
/// gives the nodes about 208 KiB, which overflows at 1 Gbit/s.
struct SocketBufferLimits(Vec<(&'static str, String)>);

impl SocketBufferLimits {
    fn raise(bytes: usize) -> Result<Self> {
        let mut old = Vec::new();
        for path in ["/proc/sys/net/core/rmem_max", "/proc/sys/net/core/wmem_max"] {
            let current = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
            if current.trim().parse::<usize>().unwrap_or(0) < bytes {
                std::fs::write(path, bytes.to_string()).with_context(|| format!("cannot write {path}"))?;
                old.push((path, current.trim().to_string()));
            }
        }
        Ok(Self(old))
    }
}

impl Drop for SocketBufferLimits {
    fn drop(&mut self) {
        for (path, value) in &self.0 {
            let _ = std::fs::write(path, value);
        }
    }
}

fn bench_in(wan: &Wan, options: &Options) -> Result<()> {
    let bins = bin_dir()?;
    let dir = tempfile::tempdir()?;
    let payload_dir = dir.path().join("payload");
    let mut payloads = Vec::new();
    let wanted = |p: Payload| !options.reference_only && options.payload != p;
    if wanted(Payload::Tree) {
        let file = payload_dir.join("payload.bin");
        qpeer_tests_write_random(&file, options.file_mib << 20)?;
        payloads.push(("file", file));
    }
    if wanted(Payload::File) {
        let tree = payload_dir.join("tree");
        write_tree(&tree, options.files)?;
        payloads.push(("tree", tree));
    }
    let file_bytes = options.file_mib << 20;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let nodes = if options.reference_only {
        None
    } else {
        Some(Nodes::start(wan, &bins, dir.path(), options.congestion.clone())?)
    };
    let congestion = options.congestion.clone().unwrap_or_else(|| "default".into());
    for &rtt_ms in &options.rtt_ms {
        for &rate_mbit in &options.rate_mbit {
            for &loss_pct in &options.loss_pct {
                let link = Link { rtt: Duration::from_millis(rtt_ms), rate_mbit, loss_pct };
                wan.configure(&link)?;
                let before_row = wan.counters();
                let reference_bytes = file_bytes.min(rate_mbit * 1_000_000 / 8 * 8);
                let reference_mbit = if options.reference || options.reference_only {
                    let measured = runtime.block_on(reference(
                        wan,
                        &link,
                        reference_bytes,
                        options.congestion.as_deref(),
                    ));
                    Some(measured.with_context(|| format!("raw quinn reference at {link:?}"))?)
                } else {
                    None
                };
                let rate = rate_mbit as f64;
                if options.reference_only {
                    let counters = wan.counters().since(&before_row);
                    println!(
                        "{{\"scenario\":\"wan-reference\",\"rtt_ms\":{rtt_ms},\"rate_mbit\":{rate_mbit},\"loss_pct\":{loss_pct:?},\"congestion\":\"{}\",\"bytes\":{},\"reference_mbit\":{},\"reference_share\":{},\"dropped\":[{},{}],\"forwarded\":[{},{}],\"queue_dropped\":[{},{}]}}",
                        options.congestion.as_deref().unwrap_or("bbr"),
                        reference_bytes,
                        json_num(reference_mbit, 1),
                        json_num(reference_mbit.map(|r| r / rate), 3),
                        counters.dropped[0],
                        counters.dropped[1],
                        counters.forwarded[0],
                        counters.forwarded[1],
                        counters.queue_dropped[0],
                        counters.queue_dropped[1],
                    );
                    continue;
                }
                let Some(nodes) = &nodes else { continue };
                for (kind, path) in &payloads {
                    let before = wan.counters();
                    let sent = send(wan, &bins, nodes, path, &link, options.smoke)
                        .with_context(|| format!("qpeer send of the {kind} at {link:?}"))?;
                    let counters = wan.counters().since(&before);
                    let (files, bytes) = file_count_and_bytes(path)?;
                    let goodput = sent.data_seconds.map(|s| bytes as f64 * 8.0 / s / 1e6);
                    let whole = bytes as f64 * 8.0 / sent.whole_seconds / 1e6;
                    println!(
                        "{{\"scenario\":\"wan\",\"payload\":\"{kind}\",\"bytes\":{bytes},\"files\":{files},\"rtt_ms\":{rtt_ms},\"rate_mbit\":{rate_mbit},\"loss_pct\":{loss_pct:?},\"congestion\":\"{congestion}\",\"ttfb_ms\":{},\"data_seconds\":{},\"goodput_mbit\":{},\"share\":{},\"whole_seconds\":{:.3},\"whole_share\":{:.3},\"reference_mbit\":{},\"reference_share\":{},\"sender_peak_rss_kib\":{},\"receiver_peak_rss_kib\":{},\"dropped\":[{},{}],\"forwarded\":[{},{}],\"queue_dropped\":[{},{}]}}",
                        json_num(sent.ttfb.map(|t| t.as_secs_f64() * 1000.0), 0),
                        json_num(sent.data_seconds, 3),
                        json_num(goodput, 1),
                        json_num(goodput.map(|g| g / rate), 3),
                        sent.whole_seconds,
                        whole / rate,
                        json_num(reference_mbit, 1),
                        json_num(reference_mbit.map(|r| r / rate), 3),
                        json_num(sent.sender_peak_kib.map(|k| k as f64), 0),
                        json_num(sent.receiver_peak_kib.map(|k| k as f64), 0),
                        counters.dropped[0],
                        counters.dropped[1],
                        counters.forwarded[0],
                        counters.forwarded[1],
                        counters.queue_dropped[0],
                        counters.queue_dropped[1],
                    );
                }
            }
        }
    }
    Ok(())
}

/// The file payload, as the other scenarios write theirs (synced before anything is timed).
fn qpeer_tests_write_random(path: &Path, bytes: u64) -> Result<()> {
    crate::write_random(path, usize::try_from(bytes)?, 0x2545_f491_4f6c_dd1d)
}
