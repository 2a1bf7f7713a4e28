//! Running the real binaries in a [`Lab`]: a scenario wrapper that checks the lab's
//! namespaces are gone afterwards, a `qpeer-tracker` on the lab's internet, `qpeer listen`
//! nodes and one-shot commands, and readers for their console lines. Shared by the NAT lab
//! test files (`nat_lab.rs`, `paths.rs`, `ipv6.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::lab::{bin_dir, leftover_namespaces, Host, Lab, Lines, Process, Stack};

/// Runs one scenario in a fresh lab, checks that none of its namespaces survive it, and
/// panics with `name` and the scenario's error (which should carry every process's output).
pub fn scenario(name: &str, check: impl FnOnce(&mut Lab) -> Result<()>) {
    let mut lab = Lab::new().expect("the NAT lab cannot be built here (it needs root, ip and nft)");
    let namespaces = lab.namespaces().to_vec();
    let prefix = namespaces[0].trim_end_matches("-inet").to_string();
    let result = check(&mut lab);
    drop(lab);
    let left = leftover_namespaces(&format!("{prefix}-"));
    assert!(left.is_empty(), "{name}: namespaces left behind: {left:?}");
    if let Err(e) = result {
        panic!("{name}: {e:#}");
    }
}

/// The id and observed address from a node's `[REGISTERED] observed ADDR as ID` line.
pub fn registration(process: &Process) -> Result<(SocketAddr, String)> {
    let line =
        process.stdout.wait_for(Duration::from_secs(10), |l| l.starts_with("[REGISTERED] observed "))?;
    let rest = line.trim_start_matches("[REGISTERED] observed ");
    let (addr, id) = rest.split_once(" as ").context("malformed [REGISTERED] line")?;
    Ok((addr.parse()?, id.trim().to_string()))
}

/// The port of the socket in a listener's `[LISTENING] node ID on ADDR; …` line.
pub fn listening_port(process: &Process) -> Result<u16> {
    let listening = process.stdout.wait_for(Duration::from_secs(5), |l| l.starts_with("[LISTENING] "))?;
    let addr = listening
        .split_whitespace()
        .find_map(|w| w.strip_suffix(';').and_then(|a| a.parse::<SocketAddr>().ok()))
        .context("no bound address in [LISTENING] line")?;
    Ok(addr.port())
}

/// `home` inside the lab's temporary directory, as a command-line argument.
pub fn home(lab: &Lab, name: &str) -> String {
    lab.dir.path().join(name).display().to_string()
}

/// The NodeId of the identity in `home` (`qpeer id`, creating it on first use).
pub fn node_id(home: &str) -> Result<String> {
    let output =
        std::process::Command::new(bin_dir()?.join("qpeer")).args(["id", "--home", home]).output()?;
    ensure!(output.status.success(), "qpeer id failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(String::from_utf8(output.stdout)?.lines().last().context("qpeer id printed nothing")?.to_string())
}

/// A `qpeer-tracker` on the lab's internet.
pub struct LabTracker {
    pub process: Process,
    pub host: Host,
    /// `ID@IP:PORT`, as nodes take it with `--tracker` (its IPv4 address).
    pub addr: String,
    /// `ID@[IPv6]:PORT`, for a tracker with IPv6 ([`start_dual_tracker`]).
    pub addr6: Option<String>,
}

/// Starts `qpeer-tracker` on a new public host at 198.51.100.1:4433 (home `trk`) and waits
/// for its `[TRACKER]` line.
pub fn start_tracker(lab: &mut Lab) -> Result<LabTracker> {
    let host = lab.public_host("trk", Some(1))?;
    let args = ["--listen".into(), format!("{}:4433", host.addr), "--home".into(), home(lab, "trk")];
    let process = lab.spawn(&host, &bin_dir()?.join("qpeer-tracker"), &args)?;
    let line = process.stdout.wait_for(Duration::from_secs(10), |l| l.starts_with("[TRACKER] "))?;
    let addr = line.trim_start_matches("[TRACKER] ").to_string();
    Ok(LabTracker { process, host, addr, addr6: None })
}

/// Starts `qpeer-tracker` on a new public host with both families, 198.51.100.1 and
/// 2001:db8::1, listening on one dual-stack socket (`[::]:4433`), and waits for its
/// `[TRACKER]` line. Nodes reach it at [`LabTracker::addr`] over IPv4 and at
/// [`LabTracker::addr6`] over IPv6.
pub fn start_dual_tracker(lab: &mut Lab) -> Result<LabTracker> {
    let host = lab.public_host_with("trk", Some(1), Stack::Dual)?;
    let addr6 = host.addr6.context("the tracker's host has no IPv6 address")?;
    let args = ["--listen".into(), "[::]:4433".into(), "--home".into(), home(lab, "trk")];
    let process = lab.spawn(&host, &bin_dir()?.join("qpeer-tracker"), &args)?;
    let line = process.stdout.wait_for(Duration::from_secs(10), |l| l.starts_with("[TRACKER] "))?;
    let tracker = line.trim_start_matches("[TRACKER] ");
    let (id, _) = tracker.split_once('@').context("malformed [TRACKER] line")?;
    let (addr, addr6) = (format!("{id}@{}:4433", host.addr), format!("{id}@[{addr6}]:4433"));
    Ok(LabTracker { process, host, addr, addr6: Some(addr6) })
}

/// Starts `qpeer <args> --home <home> --tracker <tracker>` in `host`'s namespace.
pub fn spawn_qpeer(lab: &Lab, host: &Host, home: &str, tracker: &str, args: &[String]) -> Result<Process> {
    let mut all = args.to_vec();
    all.extend(["--home".into(), home.into(), "--tracker".into(), tracker.into()]);
    lab.spawn(host, &bin_dir()?.join("qpeer"), &all)
}

/// A running `qpeer listen` that registered.
pub struct Listener {
    pub process: Process,
    pub id: String,
    /// Where the tracker saw it.
    pub observed: SocketAddr,
    /// The port its socket is bound to.
    pub port: u16,
}

/// Starts `qpeer listen <extra>` on `home` in `host`'s namespace and waits until it
/// registered and listens.
pub fn start_listener(
    lab: &Lab,
    host: &Host,
    home: &str,
    tracker: &str,
    extra: &[String],
) -> Result<Listener> {
    let mut args = vec!["listen".to_string()];
    args.extend_from_slice(extra);
    let process = spawn_qpeer(lab, host, home, tracker, &args)?;
    let (observed, id) = registration(&process)?;
    let port = listening_port(&process)?;
    Ok(Listener { process, id, observed, port })
}

/// The path of the session with `peer` as a node's console last reported it: from
/// `[PEER CONNECTED] <peer> <path> rtt …` or a later `[PATH] <peer> <path> (was …)`.
pub fn final_path(output: &str, peer: &str) -> Option<String> {
    let connected = format!("[PEER CONNECTED] {peer} ");
    let changed = format!("[PATH] {peer} ");
    output
        .lines()
        .rev()
        .find_map(|line| {
            if let Some(rest) = line.strip_prefix(&connected) {
                rest.split(" rtt ").next()
            } else if let Some(rest) = line.strip_prefix(&changed) {
                rest.split(" (was ").next()
            } else {
                None
            }
        })
        .map(str::to_string)
}

/// Waits until the session with `peer` is direct (see [`final_path`]) and returns the
/// peer's address on that path.
pub fn wait_direct(lines: &Lines, peer: &str, timeout: Duration) -> Result<SocketAddr> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(addr) = final_path(&lines.text(), peer).as_deref().and_then(|p| p.strip_prefix("direct "))
        {
            return addr.parse().with_context(|| format!("bad address in path `direct {addr}`"));
        }
        if Instant::now() > deadline {
            bail!("the session with {peer} was not direct within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `[PATH] …` lines of a node's console.
pub fn path_changes(output: &str) -> Vec<&str> {
    output.lines().filter(|l| l.starts_with("[PATH] ")).collect()
}

/// The `[PATH] … direct …` lines of a node's console: a session that must stay relayed has none.
pub fn upgrades_to_direct(output: &str) -> Vec<&str> {
    path_changes(output)
        .into_iter()
        .filter(|l| l.split(" (was ").next().is_some_and(|p| p.contains(" direct ")))
        .collect()
}

/// One `reply from <short id> seq=<n> path=<path> rtt=<x> ms` line of `qpeer ping`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub seq: u64,
    /// `direct <addr>` or `relayed via tracker`.
    pub path: String,
    pub rtt_ms: f64,
}

impl Reply {
    /// Parses one `reply from …` line.
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix("reply from ")?;
        let seq = rest.split(" seq=").nth(1)?.split_whitespace().next()?.parse().ok()?;
        let (path, rtt) = rest.split_once(" path=")?.1.rsplit_once(" rtt=")?;
        let rtt_ms = rtt.trim_end_matches(" ms").trim().parse().ok()?;
        Some(Self { seq, path: path.to_string(), rtt_ms })
    }
}

/// Every ping reply in `output`, in order.
pub fn replies(output: &str) -> Vec<Reply> {
    output.lines().filter_map(Reply::parse).collect()
}

/// The processes of one scenario, by name, so that a failure can show all their output.
#[derive(Default)]
pub struct Logs(Vec<(String, Lines, Lines)>);

impl Logs {
    /// Records `process`'s output under `name`.
    pub fn watch(&mut self, name: &str, process: &Process) {
        self.0.push((name.to_string(), process.stdout.clone(), process.stderr.clone()));
    }

    /// Every recorded process's stdout and stderr.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for (name, stdout, stderr) in &self.0 {
            out.push_str(&format!(
                "--- {name} stdout\n{}\n--- {name} stderr\n{}\n",
                stdout.text(),
                stderr.text()
            ));
        }
        out
    }
}

/// A lab with a tracker running, and every process a scenario starts recorded in [`Logs`].
pub struct World {
    pub tracker: LabTracker,
    pub logs: Logs,
    pub dir: PathBuf,
}

impl World {
    /// Starts the tracker (see [`start_tracker`]).
    pub fn start(lab: &mut Lab) -> Result<Self> {
        let tracker = start_tracker(lab)?;
        Self::with_tracker(lab, tracker)
    }

    /// Starts a tracker with both families (see [`start_dual_tracker`]).
    pub fn start_dual(lab: &mut Lab) -> Result<Self> {
        let tracker = start_dual_tracker(lab)?;
        Self::with_tracker(lab, tracker)
    }

    fn with_tracker(lab: &Lab, tracker: LabTracker) -> Result<Self> {
        let mut logs = Logs::default();
        logs.watch("tracker", &tracker.process);
        Ok(Self { tracker, logs, dir: lab.dir.path().to_path_buf() })
    }

    /// `home` inside the lab's directory.
    pub fn home(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// [`start_listener`] on home `name`, recorded as `name`.
    pub fn listen(&mut self, lab: &Lab, host: &Host, name: &str, extra: &[String]) -> Result<Listener> {
        let listener = start_listener(lab, host, &self.home(name), &self.tracker.addr, extra)
            .with_context(|| format!("listener {name} did not start\n{}", self.logs.dump()))?;
        self.logs.watch(&format!("listener {name}"), &listener.process);
        Ok(listener)
    }

    /// `qpeer <args>` on home `name` in `host`'s namespace, recorded as `label`.
    pub fn qpeer(
        &mut self,
        lab: &Lab,
        host: &Host,
        name: &str,
        label: &str,
        args: &[String],
    ) -> Result<Process> {
        let process = spawn_qpeer(lab, host, &self.home(name), &self.tracker.addr, args)?;
        self.logs.watch(label, &process);
        Ok(process)
    }

    /// Every recorded process's output.
    pub fn dump(&self) -> String {
        self.logs.dump()
    }
}

/// Starts one `qpeer-tracker --listen <IP>:4433 --home <name> <extra>` per entry, each on its
/// (public) host, all before waiting for any of them (trackers that name each other, as DHT
/// bootstrap nodes, come up together), then waits for each one's `[TRACKER]` line.
pub fn start_trackers_on(lab: &Lab, trackers: Vec<(Host, String, Vec<String>)>) -> Result<Vec<LabTracker>> {
    let mut started = Vec::new();
    for (host, name, extra) in trackers {
        let mut args =
            vec!["--listen".into(), format!("{}:4433", host.addr), "--home".into(), home(lab, &name)];
        args.extend(extra);
        let process = lab.spawn(&host, &bin_dir()?.join("qpeer-tracker"), &args)?;
        started.push((process, host, name));
    }
    let mut ready = Vec::new();
    for (process, host, name) in started {
        let line = process
            .stdout
            .wait_for(Duration::from_secs(10), |l| l.starts_with("[TRACKER] "))
            .with_context(|| format!("tracker {name} did not start\nstderr:\n{}", process.stderr.text()))?;
        let addr = line.trim_start_matches("[TRACKER] ").to_string();
        ready.push(LabTracker { process, host, addr, addr6: None });
    }
    Ok(ready)
}

/// Starts `qpeer <args> --home <home>` with one `--tracker` per entry of `trackers`, in that
/// order, in `host`'s namespace.
pub fn spawn_qpeer_trackers(
    lab: &Lab,
    host: &Host,
    home: &str,
    trackers: &[String],
    args: &[String],
) -> Result<Process> {
    let mut all = args.to_vec();
    all.extend(["--home".into(), home.into()]);
    for tracker in trackers {
        all.extend(["--tracker".into(), tracker.clone()]);
    }
    lab.spawn(host, &bin_dir()?.join("qpeer"), &all)
}
