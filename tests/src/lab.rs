//! The NAT lab: real kernel NATs in Linux network namespaces, for testing hole punching with
//! the real `qpeer-tracker` and `qpeer` binaries. Needs root, `ip` (iproute2) and `nft`.
//!
//! "The internet" is a bridge in its own namespace on 198.51.100.0/24. A home router is a
//! namespace that masquerades on its WAN interface and drops unsolicited inbound packets there
//! (input and forward chains accept only established/related from the WAN), like a real home
//! router; `masquerade random` makes it a symmetric NAT. A carrier NAT is the same on
//! 100.64.x.0/24. Home LANs are 10.x.1.0/24 bridges.
//!
//! IPv6, where a test asks for it ([`Stack`]): the internet also carries 2001:db8::/64, with
//! the internet namespace as the router between it and the homes (2001:db8::ffff); a home's
//! LAN is 2001:db8:x::/64, forwarded without NAT through the same stateful firewall
//! (established and related packets from the WAN pass, other packets from it are dropped, the
//! LAN may send anything). Homes can be IPv4-only (every home without a [`Stack`]), IPv6-only
//! or dual-stack (IPv4 behind NAT, IPv6 through the firewall). Addresses are static and
//! without duplicate address detection, so they work at once; no router advertisements. No
//! address outside these ranges is used.
//!
//! A test can also change a router while nodes run behind it: [`Router::rebind`] makes it
//! forget its mappings and map from another port range, as a rebooted router does (needs
//! `conntrack`); [`Router::block_udp_except`] cuts UDP to everyone but one address;
//! [`Lab::shape`] slows its uplink down (`tc`). A host can move too: [`Lab::move_host`] carries
//! it to another router's LAN while its programs run, as a laptop taken to another network.
//! `qpeer-lab-send` ([`lab_send_bin`]) sends raw UDP datagrams from inside a namespace, and
//! [`Lab::capture_internet`] records the internet.
//!
//! Every [`Lab`] uses a unique namespace prefix; dropping it ends every process it started,
//! then every process still inside its namespaces, then deletes the namespaces, also when a
//! test panics.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Prefix shared by every namespace this process creates (for the end-of-suite leak check).
pub fn process_prefix() -> String {
    format!("qpl{}x", std::process::id())
}

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Where a node sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// On the internet, no NAT.
    Public,
    /// Behind a home router (endpoint-independent mapping, port-restricted filtering).
    Cone,
    /// Behind a symmetric NAT (`masquerade random`).
    Symmetric,
    /// Behind a home router behind a carrier-grade NAT.
    Cgnat,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Place::Public => "public",
            Place::Cone => "cone",
            Place::Symmetric => "symmetric",
            Place::Cgnat => "cgnat",
        };
        f.write_str(name)
    }
}

/// Which address families a home (or a public host) has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stack {
    /// IPv4 only (behind NAT in a home): every place without a `Stack`.
    #[default]
    V4,
    /// IPv6 only: global addresses, through the home router's firewall without NAT.
    V6,
    /// Both: IPv4 behind the home router's NAT, IPv6 through its firewall.
    Dual,
}

impl Stack {
    pub fn has_v4(self) -> bool {
        self != Stack::V6
    }

    pub fn has_v6(self) -> bool {
        self != Stack::V4
    }
}

/// The lab internet's IPv6 router (the internet namespace's address on its bridge).
const INTERNET6_ROUTER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xffff);

/// The IPv6 address on the internet of the host whose IPv4 address ends in `octet`.
fn public6(octet: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(octet))
}

/// Host `host` of the IPv6 LAN number `subnet`: 2001:db8:subnet::host.
fn lan6_addr(subnet: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, u16::from(subnet), 0, 0, 0, 0, u16::from(host))
}

/// A namespace that runs programs.
#[derive(Debug, Clone)]
pub struct Host {
    pub netns: String,
    /// Its IPv4 address; `0.0.0.0` on an IPv6-only host.
    pub addr: Ipv4Addr,
    /// Its global IPv6 address, if it has IPv6.
    pub addr6: Option<Ipv6Addr>,
}

/// A router namespace with a LAN bridge hosts can join.
#[derive(Debug, Clone)]
pub struct Router {
    pub netns: String,
    /// The address of its `wan` interface: on the internet, or on a carrier NAT's LAN;
    /// `0.0.0.0` on an IPv6-only router.
    pub wan: Ipv4Addr,
    /// Its IPv6 address on the internet, if its home has IPv6.
    pub wan6: Option<Ipv6Addr>,
    /// The IPv4 LAN prefix's first three octets, e.g. 10.3.1 (none in an IPv6-only home).
    lan: Option<[u8; 3]>,
    /// The IPv6 LAN's number x in 2001:db8:x::/64 (none in an IPv4-only home).
    lan6: Option<u8>,
    next_host: u8,
    /// Maps every new flow to a random port (`masquerade random`).
    symmetric: bool,
}

/// Output lines of a program, collected by a reader thread.
#[derive(Debug, Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    pub fn snapshot(&self) -> Vec<String> {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn text(&self) -> String {
        self.snapshot().join("\n")
    }

    /// Waits for a line matching `pred` and returns it.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.snapshot().into_iter().find(|l| pred(l)) {
                return Ok(line);
            }
            if Instant::now() > deadline {
                bail!("no matching line within {timeout:?}; output so far:\n{}", self.text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Appends a line.
    pub fn push(&self, line: String) {
        if let Ok(mut lines) = self.0.lock() {
            lines.push(line);
        }
    }
}

/// A program started in a lab namespace.
pub type Process = crate::procs::Proc;

/// A set of namespaces: the internet plus whatever a test adds. Removed on drop.
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    internet: String,
    next_public: u8,
    next_subnet: u8,
    next_link: u32,
    /// The internet carries IPv6 (set up on first use).
    ipv6: bool,
    pub dir: tempfile::TempDir,
}

/// Runs `program args` and waits for it; fails with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<()> {
    run_output(program, args).map(drop)
}

/// Runs `program args`, waits for it and returns its stdout; fails with its stderr.
fn run_output(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !output.status.success() {
        bail!("`{program} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `program args` inside `netns`, waits for it and returns its stdout; fails with its
/// stderr.
pub fn netns_exec(netns: &str, program: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["netns", "exec", netns, program];
    full.extend_from_slice(args);
    run_output("ip", &full)
}

fn run_stdin(program: &str, args: &[&str], input: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed: {}\ninput:\n{input}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The directory holding the `qpeer` and `qpeer-tracker` binaries: `QPEER_BIN_DIR`, else the
/// cargo target directory this test binary was built into.
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("QPEER_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    // A binary sits in target/<profile>/, a test binary in target/<profile>/deps/.
    let exe = std::env::current_exe()?;
    let candidates: Vec<PathBuf> = exe.ancestors().skip(1).take(2).map(Path::to_path_buf).collect();
    for dir in &candidates {
        if ["qpeer", "qpeer-tracker"].iter().all(|bin| dir.join(bin).exists()) {
            return Ok(dir.clone());
        }
    }
    bail!(
        "qpeer and qpeer-tracker are not in {}: build the binaries first (cargo build --bins, \
         with --release for benchmarks) or set QPEER_BIN_DIR",
        candidates.first().map(|d| d.display().to_string()).unwrap_or_default()
    )
}

/// The `qpeer-lab-send` binary (raw UDP datagrams from inside a namespace), next to `qpeer` in
/// [`bin_dir`].
pub fn lab_send_bin() -> Result<PathBuf> {
    let path = bin_dir()?.join("qpeer-lab-send");
    if !path.exists() {
        bail!(
            "{} is missing: build it with `cargo build -p qpeer-tests --bins` (or set QPEER_BIN_DIR)",
            path.display()
        );
    }
    Ok(path)
}

impl Lab {
    /// Creates the internet namespace. Fails with a clear reason when the machine cannot host
    /// the lab (not root, no `ip` or `nft`).
    pub fn new() -> Result<Self> {
        run("ip", &["-V"]).context("the NAT lab needs iproute2 (`ip`)")?;
        run("nft", &["--version"]).context("the NAT lab needs nftables (`nft`)")?;
        let prefix = format!("{}{}", process_prefix(), NEXT_LAB.fetch_add(1, Ordering::Relaxed));
        let mut lab = Self {
            internet: format!("{prefix}-inet"),
            prefix,
            namespaces: Vec::new(),
            next_public: 10,
            next_subnet: 1,
            next_link: 0,
            ipv6: false,
            dir: tempfile::tempdir()?,
        };
        let internet = lab.internet.clone();
        lab.add_netns(&internet).context("cannot create network namespaces (the lab needs root)")?;
        lab.ip(&internet, &["link", "add", "br0", "type", "bridge"])?;
        lab.ip(&internet, &["link", "set", "br0", "up"])?;
        Ok(lab)
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        run("ip", &["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        self.ip(name, &["link", "set", "lo", "up"])
    }

    fn ip(&self, netns: &str, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", netns];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    fn sysctl(&self, netns: &str, setting: &str) -> Result<()> {
        run("ip", &["netns", "exec", netns, "sysctl", "-qw", setting])
    }

    fn link_name(&mut self, stem: &str) -> String {
        self.next_link += 1;
        format!("{stem}{}", self.next_link)
    }

    /// Turns duplicate address detection off in `netns` for interfaces made from now on, so
    /// that IPv6 addresses (link-local ones too) work at once.
    fn no_dad(&self, netns: &str) -> Result<()> {
        self.sysctl(netns, "net.ipv6.conf.all.accept_dad=0")?;
        self.sysctl(netns, "net.ipv6.conf.default.accept_dad=0")
    }

    /// Makes the internet namespace the IPv6 router of 2001:db8::/64, once.
    fn ipv6_internet(&mut self) -> Result<()> {
        if self.ipv6 {
            return Ok(());
        }
        let internet = self.internet.clone();
        self.no_dad(&internet)?;
        self.sysctl(&internet, "net.ipv6.conf.br0.accept_dad=0")?;
        self.sysctl(&internet, "net.ipv6.conf.all.forwarding=1")?;
        self.ip(&internet, &["-6", "addr", "add", &format!("{INTERNET6_ROUTER}/64"), "dev", "br0", "nodad"])?;
        self.ipv6 = true;
        Ok(())
    }

    /// Connects `netns` to the internet bridge as `wan` with the next public address: IPv4
    /// 198.51.100.n, IPv6 2001:db8::n (hex), or both, as `stack` says.
    fn attach_to_internet(&mut self, netns: &str, stack: Stack) -> Result<(Ipv4Addr, Option<Ipv6Addr>)> {
        let octet = self.next_public;
        self.next_public += 1;
        if stack.has_v6() {
            self.ipv6_internet()?;
            self.no_dad(netns)?;
        }
        let port = self.link_name("v");
        let internet = self.internet.clone();
        self.ip(&internet, &["link", "add", &port, "type", "veth", "peer", "name", "wan", "netns", netns])?;
        self.ip(&internet, &["link", "set", &port, "master", "br0", "up"])?;
        let mut addr = Ipv4Addr::UNSPECIFIED;
        if stack.has_v4() {
            addr = Ipv4Addr::new(198, 51, 100, octet);
            self.ip(netns, &["addr", "add", &format!("{addr}/24"), "dev", "wan"])?;
        }
        let addr6 = stack.has_v6().then(|| public6(octet));
        if let Some(addr6) = addr6 {
            self.ip(netns, &["-6", "addr", "add", &format!("{addr6}/64"), "dev", "wan", "nodad"])?;
        }
        self.ip(netns, &["link", "set", "wan", "up"])?;
        if addr6.is_some() {
            let via = INTERNET6_ROUTER.to_string();
            self.ip(netns, &["-6", "route", "add", "default", "via", &via, "dev", "wan"])?;
        }
        Ok((addr, addr6))
    }

    /// A host on the internet with the given last octet (e.g. 1 for the tracker), or the next free one.
    pub fn public_host(&mut self, name: &str, last_octet: Option<u8>) -> Result<Host> {
        self.public_host_with(name, last_octet, Stack::V4)
    }

    /// A host on the internet with the families of `stack`: 198.51.100.n and (or) 2001:db8::n,
    /// n the given last octet or the next free one.
    pub fn public_host_with(&mut self, name: &str, last_octet: Option<u8>, stack: Stack) -> Result<Host> {
        let netns = format!("{}-{name}", self.prefix);
        self.add_netns(&netns)?;
        let saved = self.next_public;
        if let Some(octet) = last_octet {
            self.next_public = octet;
        }
        let attached = self.attach_to_internet(&netns, stack);
        if last_octet.is_some() {
            self.next_public = saved;
        }
        let (addr, addr6) = attached?;
        Ok(Host { netns, addr, addr6 })
    }

    /// Masquerade on `wan` (random port mapping when `symmetric`) when the home has IPv4, and
    /// drop unsolicited packets arriving on `wan` (IPv4 and IPv6 alike: the `inet` table).
    /// IPv6 neighbour discovery is untracked, so it is let in by name, or the router could not
    /// be found on the internet.
    fn nat_rules(&self, netns: &str, symmetric: bool, stack: Stack) -> Result<()> {
        let masquerade = if symmetric { "masquerade random" } else { "masquerade" };
        let nat = if stack.has_v4() {
            format!(
                "table ip qpeer_nat {{\n\
                   chain postrouting {{ type nat hook postrouting priority srcnat; policy accept; oifname \"wan\" {masquerade}; }}\n\
                 }}\n"
            )
        } else {
            String::new()
        };
        let rules = format!(
            "{nat}\
             table inet qpeer_filter {{\n\
               chain input {{ type filter hook input priority filter; policy accept; iifname \"wan\" ct state established,related accept; \
                 iifname \"wan\" icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept; iifname \"wan\" drop; }}\n\
               chain forward {{ type filter hook forward priority filter; policy accept; iifname \"wan\" ct state established,related accept; iifname \"wan\" drop; }}\n\
             }}\n"
        );
        run_stdin("ip", &["netns", "exec", netns, "nft", "-f", "-"], &rules)
    }

    fn router_lan(&mut self, netns: &str, lan: Option<[u8; 3]>, lan6: Option<u8>) -> Result<()> {
        self.ip(netns, &["link", "add", "lan0", "type", "bridge"])?;
        self.ip(netns, &["link", "set", "lan0", "up"])?;
        if let Some(lan) = lan {
            let gateway = format!("{}.{}.{}.1/24", lan[0], lan[1], lan[2]);
            self.ip(netns, &["addr", "add", &gateway, "dev", "lan0"])?;
            self.sysctl(netns, "net.ipv4.ip_forward=1")?;
        }
        if let Some(subnet) = lan6 {
            let gateway = format!("{}/64", lan6_addr(subnet, 1));
            self.ip(netns, &["-6", "addr", "add", &gateway, "dev", "lan0", "nodad"])?;
            self.sysctl(netns, "net.ipv6.conf.all.forwarding=1")?;
        }
        Ok(())
    }

    /// A home router on the internet (or behind `carrier`), cone or symmetric.
    pub fn home_router(
        &mut self,
        name: &str,
        symmetric: bool,
        carrier: Option<&mut Router>,
    ) -> Result<Router> {
        self.router(name, symmetric, carrier, Stack::V4)
    }

    /// A home router on the internet with the families of `stack`: IPv4 behind NAT (cone, or
    /// symmetric when `symmetric`), IPv6 on 2001:db8:x::/64 through its firewall.
    pub fn home_router_with(&mut self, name: &str, symmetric: bool, stack: Stack) -> Result<Router> {
        self.router(name, symmetric, None, stack)
    }

    fn router(
        &mut self,
        name: &str,
        symmetric: bool,
        carrier: Option<&mut Router>,
        stack: Stack,
    ) -> Result<Router> {
        let netns = format!("{}-{name}", self.prefix);
        self.add_netns(&netns)?;
        let (wan, wan6) = match carrier {
            None => self.attach_to_internet(&netns, stack)?,
            Some(_) if stack.has_v6() => bail!("the lab has no IPv6 behind a carrier NAT"),
            Some(carrier) => {
                let wan = carrier.next_addr();
                self.join_lan(carrier, &netns, "wan", Some(wan), None)?;
                let gateway = carrier.gateway().to_string();
                self.ip(&netns, &["route", "add", "default", "via", &gateway])?;
                (wan, None)
            }
        };
        let subnet = self.next_subnet;
        self.next_subnet += 1;
        let lan = stack.has_v4().then_some([10, subnet, 1]);
        let lan6 = wan6.map(|_| subnet);
        self.router_lan(&netns, lan, lan6)?;
        self.nat_rules(&netns, symmetric, stack)?;
        if let Some(wan6) = wan6 {
            // The internet's router sends the home's prefix to the home router.
            let (prefix, via) = (format!("{}/64", lan6_addr(subnet, 0)), wan6.to_string());
            let internet = self.internet.clone();
            self.ip(&internet, &["-6", "route", "add", &prefix, "via", &via])?;
        }
        Ok(Router { netns, wan, wan6, lan, lan6, next_host: 2, symmetric })
    }

    /// A carrier-grade NAT on the internet whose customers sit on 100.64.x.0/24.
    pub fn carrier_nat(&mut self, name: &str) -> Result<Router> {
        let netns = format!("{}-{name}", self.prefix);
        self.add_netns(&netns)?;
        let (wan, _) = self.attach_to_internet(&netns, Stack::V4)?;
        let subnet = self.next_subnet;
        self.next_subnet += 1;
        let lan = [100, 64, subnet];
        self.router_lan(&netns, Some(lan), None)?;
        self.nat_rules(&netns, false, Stack::V4)?;
        Ok(Router { netns, wan, wan6: None, lan: Some(lan), lan6: None, next_host: 2, symmetric: false })
    }

    /// Plugs `netns` into `router`'s LAN bridge as interface `ifname` with `addr` and (or)
    /// `addr6`.
    fn join_lan(
        &mut self,
        router: &Router,
        netns: &str,
        ifname: &str,
        addr: Option<Ipv4Addr>,
        addr6: Option<Ipv6Addr>,
    ) -> Result<()> {
        if addr6.is_some() {
            self.no_dad(netns)?;
        }
        let port = self.link_name("h");
        self.ip(
            &router.netns,
            &["link", "add", &port, "type", "veth", "peer", "name", ifname, "netns", netns],
        )?;
        self.ip(&router.netns, &["link", "set", &port, "master", "lan0", "up"])?;
        if let Some(addr) = addr {
            self.ip(netns, &["addr", "add", &format!("{addr}/24"), "dev", ifname])?;
        }
        if let Some(addr6) = addr6 {
            self.ip(netns, &["-6", "addr", "add", &format!("{addr6}/64"), "dev", ifname, "nodad"])?;
        }
        self.ip(netns, &["link", "set", ifname, "up"])
    }

    /// Plugs `netns` into `router`'s LAN as `ifname` with the next address of each family the
    /// LAN has, and the router as its default gateway for each.
    fn join_lan_routed(&mut self, router: &mut Router, netns: &str, ifname: &str) -> Result<Host> {
        let (addr, addr6) = router.next_addrs();
        self.join_lan(router, netns, ifname, addr, addr6)?;
        if let Some(gateway) = router.gateway4() {
            self.ip(netns, &["route", "add", "default", "via", &gateway.to_string()])?;
        }
        if let Some(gateway) = router.gateway6() {
            self.ip(netns, &["-6", "route", "add", "default", "via", &gateway.to_string(), "dev", ifname])?;
        }
        Ok(Host { netns: netns.to_string(), addr: addr.unwrap_or(Ipv4Addr::UNSPECIFIED), addr6 })
    }

    /// A host on `router`'s LAN, with the router as its default gateway (of each family the
    /// LAN has).
    pub fn host_behind(&mut self, router: &mut Router, name: &str) -> Result<Host> {
        let netns = format!("{}-{name}", self.prefix);
        self.add_netns(&netns)?;
        self.join_lan_routed(router, &netns, "eth0")
    }

    /// A host behind a home router of its own on the internet (a symmetric NAT when
    /// `symmetric`), and that router, for tests that rebind, block or shape it.
    pub fn home_host(&mut self, name: &str, symmetric: bool) -> Result<(Host, Router)> {
        self.home_host_with(name, symmetric, Stack::V4)
    }

    /// [`Lab::home_host`] in a home with the families of `stack` (see [`Lab::home_router_with`]).
    pub fn home_host_with(&mut self, name: &str, symmetric: bool, stack: Stack) -> Result<(Host, Router)> {
        let mut router = self.home_router_with(&format!("{name}r"), symmetric, stack)?;
        let host = self.host_behind(&mut router, name)?;
        Ok((host, router))
    }

    /// Limits what `router` sends on its `wan` to `rate` (a `tc` rate such as `80mbit`) with a
    /// token bucket (`tbf`; the lab's kernels may lack `netem`): slows a transfer through it
    /// down so that something can happen in the middle of it.
    pub fn shape(&self, router: &Router, rate: &str) -> Result<()> {
        let args =
            ["qdisc", "add", "dev", "wan", "root", "tbf", "rate", rate, "burst", "64kb", "latency", "400ms"];
        netns_exec(&router.netns, "tc", &args).map(drop).context("cannot shape the router's wan (tc tbf)")
    }

    /// Moves `host` to `to`'s LAN while its programs keep running, as a laptop carried from one
    /// network to another: every interface the host has but `lo` goes away (its veths are
    /// deleted, and with them their ports on the old router's bridge), then a new one,
    /// `eth<n>`, joins `to`'s LAN with the next address there (10.x, like every LAN) and `to` as
    /// the default gateway. A socket bound to `0.0.0.0` stays bound, with its port, and sends
    /// from the new address from then on (a send that names the old one as its source, with
    /// `IP_PKTINFO`, fails with `ENETUNREACH`); for the few milliseconds in between the host has
    /// no route. `host.addr` becomes the new address. Mappings the old router holds for the
    /// host stay until they expire, unused. Only a host of this lab can move, and only within
    /// it: dropping the lab removes the new link with the namespaces.
    pub fn move_host(&mut self, host: &mut Host, to: &mut Router) -> Result<()> {
        if !self.namespaces.contains(&host.netns) || !self.namespaces.contains(&to.netns) {
            bail!("{} or {} is not a namespace of this lab", host.netns, to.netns);
        }
        // `ip -o link show` prints one line per link: `7: eth0@if8: <BROADCAST,...> ...`.
        let links = run_output("ip", &["-n", &host.netns, "-o", "link", "show"])?;
        let old: Vec<&str> = links
            .lines()
            .filter_map(|line| line.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name))
            .filter(|name| *name != "lo")
            .collect();
        for link in &old {
            self.ip(&host.netns, &["link", "del", link])
                .with_context(|| format!("cannot take {link} away from {}", host.netns))?;
        }
        let ifname = self.link_name("eth");
        *host = self.join_lan_routed(to, &host.netns.clone(), &ifname)?;
        Ok(())
    }

    /// A host placed as `place` describes, with whatever routers that takes.
    pub fn node_host(&mut self, name: &str, place: Place) -> Result<Host> {
        match place {
            Place::Public => self.public_host(name, None),
            Place::Cone | Place::Symmetric => Ok(self.home_host(name, place == Place::Symmetric)?.0),
            Place::Cgnat => {
                let mut carrier = self.carrier_nat(&format!("{name}c"))?;
                let mut router = self.home_router(&format!("{name}r"), false, Some(&mut carrier))?;
                self.host_behind(&mut router, name)
            }
        }
    }

    /// Starts `program args` inside `host`'s namespace, collecting its output.
    pub fn spawn(&self, host: &Host, program: &Path, args: &[String]) -> Result<Process> {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &host.netns]).arg(program).args(args);
        Process::spawn(command)
            .with_context(|| format!("cannot start {} in {}", program.display(), host.netns))
    }

    /// Starts capturing every packet on the internet bridge into `file` (tcpdump).
    pub fn capture_internet(&self, file: &Path) -> Result<Capture> {
        run("tcpdump", &["--version"]).context("the capture test needs tcpdump")?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.internet, "tcpdump", "-i", "br0", "-s", "0", "-U", "-w"])
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start tcpdump")?;
        let mut capture = Capture { child, file: file.to_path_buf() };
        // tcpdump says "listening on br0" once the capture runs.
        let stderr = capture.child.stderr.take().context("stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        match lines.next() {
            Some(Ok(line)) if line.contains("listening") => {}
            other => bail!("tcpdump did not start: {other:?}"),
        }
        std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
        Ok(capture)
    }

    /// Every namespace of this lab.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }
}

impl Host {
    /// Runs `program args` in this host's namespace, waits for it and returns its stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        netns_exec(&self.netns, program, args)
    }
}

/// The nftables table of [`Router::block_udp_except`].
const BLOCK_TABLE: &str = "qpeer_block";

impl Router {
    /// Runs `program args` in the router's namespace, waits for it and returns its stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        netns_exec(&self.netns, program, args)
    }

    /// Forgets every mapping and maps UDP from the port range `ports` (e.g. `20000-20999`)
    /// from now on, as a rebooted home router does: UDP leaving `wan` is masqueraded
    /// `to :<ports>` (still `random` for a symmetric NAT; other protocols as before) and the
    /// connection tracking table is flushed. A flow that kept its source port before now gets
    /// a port in the range, later flows from the same source share that port (a cone stays a
    /// cone), and packets sent to an old mapping are dropped as unsolicited.
    pub fn rebind(&self, ports: &str) -> Result<()> {
        let random = if self.symmetric { " random" } else { "" };
        let rules = format!(
            "flush chain ip qpeer_nat postrouting\n\
             add rule ip qpeer_nat postrouting oifname \"wan\" meta l4proto udp masquerade to :{ports}{random}\n\
             add rule ip qpeer_nat postrouting oifname \"wan\" masquerade{random}\n"
        );
        run_stdin("ip", &["netns", "exec", &self.netns, "nft", "-f", "-"], &rules)
            .context("cannot replace the masquerade rule")?;
        // `conntrack -F` reports the number of deleted entries on stderr; only failure matters.
        self.run("conntrack", &["-F"]).context("cannot flush the router's connections (conntrack)")?;
        Ok(())
    }

    /// Drops every UDP packet forwarded between the router's LAN and any address beyond its
    /// `wan` except `allowed` (say, the tracker), in both directions: a network that lets
    /// nodes reach their tracker but no peer directly. [`Router::unblock`] lifts it.
    pub fn block_udp_except(&self, allowed: Ipv4Addr) -> Result<()> {
        let rules = format!(
            "table inet {BLOCK_TABLE} {{\n\
               chain forward {{ type filter hook forward priority filter - 10; policy accept; \
                 oifname \"wan\" meta l4proto udp ip daddr != {allowed} drop; \
                 iifname \"wan\" meta l4proto udp ip saddr != {allowed} drop; }}\n\
             }}\n"
        );
        run_stdin("ip", &["netns", "exec", &self.netns, "nft", "-f", "-"], &rules)
    }

    /// Lifts [`Router::block_udp_except`].
    pub fn unblock(&self) -> Result<()> {
        self.run("nft", &["delete", "table", "inet", BLOCK_TABLE]).map(drop)
    }

    /// The router's IPv4 address on its LAN (of a router with an IPv4 LAN).
    fn gateway(&self) -> Ipv4Addr {
        self.gateway4().unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    fn gateway4(&self) -> Option<Ipv4Addr> {
        self.lan.map(|lan| Ipv4Addr::new(lan[0], lan[1], lan[2], 1))
    }

    fn gateway6(&self) -> Option<Ipv6Addr> {
        self.lan6.map(|subnet| lan6_addr(subnet, 1))
    }

    /// The next host's IPv4 address (of a router with an IPv4 LAN).
    fn next_addr(&mut self) -> Ipv4Addr {
        self.next_addrs().0.unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    /// The next host's addresses: 10.x.1.n and 2001:db8:x::n, of the families the LAN has.
    fn next_addrs(&mut self) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
        let n = self.next_host;
        self.next_host += 1;
        (
            self.lan.map(|lan| Ipv4Addr::new(lan[0], lan[1], lan[2], n)),
            self.lan6.map(|subnet| lan6_addr(subnet, n)),
        )
    }
}

/// A running packet capture.
pub struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    /// The pcap file's bytes so far; the capture goes on. tcpdump writes each packet as it
    /// gets it (`-U`), but the kernel hands packets over in batches, up to about a second late.
    pub fn snapshot(&self) -> Result<Vec<u8>> {
        Ok(std::fs::read(&self.file)?)
    }

    /// Stops the capture and returns the pcap file's bytes.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        Ok(std::fs::read(&self.file)?)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Ends every process inside `netns` (deleting a namespace does not).
pub fn kill_namespace_processes(netns: &str) {
    let Ok(output) = Command::new("ip").args(["netns", "pids", netns]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
        let _ = Command::new("kill").args(["-9", pid]).status();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for netns in self.namespaces.iter().rev() {
            kill_namespace_processes(netns);
        }
        for netns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", netns]).status();
        }
    }
}

/// Namespaces whose name starts with `prefix` (for leak checks).
pub fn leftover_namespaces(prefix: &str) -> Vec<String> {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with(prefix))
        .map(str::to_string)
        .collect()
}
