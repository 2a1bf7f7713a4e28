//! qpeer benchmarks on loopback, one JSON line per figure (docs/PERFORMANCE.md).
//!
//! ```text
//! cargo build --release --bins
//! cargo run --release -p qpeer-tests --bin qpeer-bench -- <transfer|relay|connect|tracker|transfer-rss|dht|wan|all> [--smoke]
//! ```
//! `--smoke` runs each scenario small, for CI: it checks that they work, not how fast.
//! `wan` (an emulated WAN between namespaces, `qpeer_tests::wan`) needs root, so `all` leaves
//! it out; its options: `--rtt MS,… --rate MBIT,… --loss PCT,… --payload file|tree|both
//! --file-mib N --files N --congestion NAME --no-reference --reference-only`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use qpeer_tests::lab::bin_dir;
use qpeer_tracker::TrackerClient;

fn usage() -> ! {
    eprintln!("usage: qpeer-bench <transfer|relay|connect|tracker|transfer-rss|dht|wan|all> [--smoke] [--gib N] [--nodes N,N,...] [--in-flight N]");
    eprintln!("       qpeer-bench wan [--smoke] [--rtt MS,...] [--rate MBIT,...] [--loss PCT,...] [--payload file|tree|both] [--file-mib N] [--files N] [--congestion NAME] [--no-reference|--reference-only]");
    std::process::exit(2)
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let scenario = args.next().unwrap_or_else(|| usage());
    let mut smoke = false;
    let mut gib: Option<u64> = None;
    let mut nodes: Option<Vec<usize>> = None;
    let mut inflight = 32;
    let mut wan = qpeer_tests::wan::Options::default();
    /// A comma-separated list of numbers.
    fn list<T: std::str::FromStr>(value: Option<String>) -> Vec<T> {
        let parsed: Option<Vec<T>> = value.and_then(|v| v.split(',').map(|n| n.parse().ok()).collect());
        parsed.filter(|l| !l.is_empty()).unwrap_or_else(|| usage())
    }
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--smoke" => smoke = true,
            "--rtt" => wan.rtt_ms = list(args.next()),
            "--rate" => wan.rate_mbit = list(args.next()),
            "--loss" => wan.loss_pct = list(args.next()),
            "--payload" => wan.payload = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage()),
            "--file-mib" => {
                wan.file_mib = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage())
            }
            "--files" => wan.files = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage()),
            "--congestion" => wan.congestion = Some(args.next().unwrap_or_else(|| usage())),
            "--no-reference" => wan.reference = false,
            "--reference-only" => wan.reference_only = true,
            "--in-flight" => inflight = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage()),
            "--gib" => gib = Some(args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage())),
            "--nodes" => {
                nodes = Some(
                    args.next()
                        .map(|v| v.split(',').filter_map(|n| n.parse().ok()).collect())
                        .unwrap_or_else(|| usage()),
                )
            }
            _ => usage(),
        }
    }
    let mib =
        |default_gib: u64, smoke_mib: u64| if smoke { smoke_mib } else { gib.unwrap_or(default_gib) << 10 };
    let rounds = if smoke { 1 } else { ROUNDS };
    let levels = nodes.unwrap_or_else(|| if smoke { vec![200] } else { vec![1_000, 10_000, 100_000] });
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let run = |name: &str| -> Result<()> {
        match name {
            "transfer" => runtime.block_on(transfer(mib(1, 16), false, rounds)),
            "relay" => runtime.block_on(transfer(mib(1, 16), true, rounds)),
            "connect" => runtime.block_on(connect(if smoke { 20 } else { 200 })),
            "tracker" => runtime.block_on(tracker(&levels, inflight)),
            "transfer-rss" => transfer_rss(mib(2, 16)),
            "dht" => runtime.block_on(dht(if smoke { 2 } else { 20 })),
            "wan" => qpeer_tests::wan::bench(&qpeer_tests::wan::Options { smoke, ..wan.clone() }),
            _ => usage(),
        }
    };
    if scenario == "all" {
        for name in ["transfer", "relay", "connect", "tracker", "transfer-rss", "dht"] {
            run(name)?;
        }
        Ok(())
    } else {
        run(&scenario)
    }
}

/// Kills the child on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `program args`, sending its stdout lines to a channel.
fn start(program: &Path, args: &[String]) -> Result<(Running, mpsc::Receiver<String>)> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok((Running(child), rx))
}

fn wait_line(rx: &mpsc::Receiver<String>, prefix: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            if line.starts_with(prefix) {
                return Ok(line);
            }
        }
    }
    bail!("no {prefix} line within 30 s")
}

/// Peak resident set size (VmHWM) of a live process, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// Writes the payload (`qpeer_tests`' generator) and puts it on disk before anything is timed:
/// writeback of the payload must not share the run.
fn write_payload(path: &Path, bytes: u64) -> Result<()> {
    qpeer_tests::write_random(path, usize::try_from(bytes)?, 0x2545_f491_4f6c_dd1d)?;
    Ok(())
}

/// Sends an N GiB file between two `qpeer` processes on loopback and reports both sides'
/// peak RSS and the throughput of the whole `qpeer send` command.
fn transfer_rss(mib: u64) -> Result<()> {
    let bins = bin_dir()?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("payload.bin");
    let bytes = mib << 20;
    write_payload(&file, bytes)?;

    let pair = Pair::start(&bins, dir.path(), &[])?;
    let receiver = &pair.receiver;

    let send_args = pair.send_args(&file);
    let started = Instant::now();
    let (mut sender, sender_out) = start(&bins.join("qpeer"), &send_args)?;
    let sender_pid = sender.0.id();
    let mut sender_peak = 0;
    let status = loop {
        if let Some(kib) = peak_rss_kib(sender_pid) {
            sender_peak = sender_peak.max(kib);
        }
        if let Some(status) = sender.0.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let seconds = started.elapsed().as_secs_f64();
    let receiver_peak = peak_rss_kib(receiver.0.id()).unwrap_or(0);
    let sent_line = sender_out.try_iter().find(|l| l.starts_with("[SENT]")).unwrap_or_default();
    if !status.success() {
        bail!("qpeer send failed ({status}); {sent_line}");
    }
    println!(
        "{{\"scenario\":\"transfer-rss\",\"cores\":{},\"bytes\":{bytes},\"seconds\":{seconds:.2},\"mib_per_s\":{:.1},\"sender_peak_rss_kib\":{sender_peak},\"receiver_peak_rss_kib\":{receiver_peak}}}",
        cores(),
        (bytes as f64 / 1048576.0) / seconds,
    );
    Ok(())
}

/// A `qpeer-tracker` and a `qpeer listen` that accepts from the sender's home, on loopback.
struct Pair {
    _tracker: Running,
    receiver: Running,
    /// Kept open: dropping it would close the receiver's stdout pipe.
    _receiver_out: mpsc::Receiver<String>,
    receiver_id: String,
    tracker: String,
    dir: std::path::PathBuf,
}

impl Pair {
    fn start(bins: &Path, dir: &Path, tracker_extra: &[&str]) -> Result<Self> {
        let home = |name: &str| dir.join(name).display().to_string();
        let mut tracker_args =
            vec!["--listen".to_string(), "127.0.0.1:0".into(), "--home".into(), home("trk")];
        tracker_args.extend(tracker_extra.iter().map(|a| a.to_string()));
        let (tracker_proc, tracker_out) = start(&bins.join("qpeer-tracker"), &tracker_args)?;
        let tracker = wait_line(&tracker_out, "[TRACKER] ")?.trim_start_matches("[TRACKER] ").to_string();
        let sender_id = String::from_utf8(
            Command::new(bins.join("qpeer")).args(["id", "--home", &home("s")]).output()?.stdout,
        )?
        .lines()
        .last()
        .context("no id")?
        .to_string();
        let mut listen_args =
            vec!["listen".to_string(), "--out".into(), home("inbox"), "--accept-from".into(), sender_id];
        listen_args.extend(common_args(dir, "r", &tracker));
        let (receiver, receiver_out) = start(&bins.join("qpeer"), &listen_args)?;
        let registered = wait_line(&receiver_out, "[REGISTERED] ")?;
        let receiver_id = registered.rsplit(' ').next().context("no id")?.to_string();
        Ok(Self {
            _tracker: tracker_proc,
            receiver,
            _receiver_out: receiver_out,
            receiver_id,
            tracker,
            dir: dir.to_path_buf(),
        })
    }

    /// Arguments of a quiet `qpeer send` of `file` from the sender's home.
    fn send_args(&self, file: &Path) -> Vec<String> {
        let mut args =
            vec!["send".to_string(), self.receiver_id.clone(), file.display().to_string(), "--quiet".into()];
        args.extend(common_args(&self.dir, "s", &self.tracker));
        args
    }
}

/// `--home DIR/NAME --tracker TRACKER --bind 127.0.0.1:0`.
fn common_args(dir: &Path, name: &str, tracker: &str) -> Vec<String> {
    vec![
        "--home".to_string(),
        dir.join(name).display().to_string(),
        "--tracker".into(),
        tracker.to_string(),
        "--bind".into(),
        "127.0.0.1:0".into(),
    ]
}

/// Rounds of each measurement in `transfer` and `relay`: this machine kind is a VM whose
/// speed drifts between runs, so the two sides alternate and the medians are compared.
const ROUNDS: usize = 3;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Sends `mib` MiB with the real binaries (direct, and through the relay when `relay`), and
/// in the same run a raw quinn bulk stream, alternating, and prints the medians' ratio.
async fn transfer(mib: u64, relay: bool, rounds: usize) -> Result<()> {
    let bins = bin_dir()?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("payload.bin");
    let bytes = mib << 20;
    write_payload(&file, bytes)?;
    let (mut base, mut measured) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        base.push(if relay {
            qpeer_send(&bins, dir.path(), &file, false)?
        } else {
            raw_quinn(bytes).await?
        });
        measured.push(qpeer_send(&bins, dir.path(), &file, relay)?);
    }
    let list = |v: &[f64]| v.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(",");
    let (base_median, measured_median) = (median(base.clone()), median(measured.clone()));
    if relay {
        println!(
            "{{\"scenario\":\"relay\",\"cores\":{},\"bytes\":{bytes},\"rounds\":{rounds},\"direct_mib_s\":{base_median:.1},\"relayed_mib_s\":{measured_median:.1},\"ratio\":{:.3},\"direct_each\":[{}],\"relayed_each\":[{}]}}",
            cores(),
            measured_median / base_median,
            list(&base),
            list(&measured)
        );
    } else {
        println!(
            "{{\"scenario\":\"transfer\",\"cores\":{},\"bytes\":{bytes},\"rounds\":{rounds},\"qpeer_mib_s\":{measured_median:.1},\"raw_quinn_mib_s\":{base_median:.1},\"ratio\":{:.3},\"qpeer_each\":[{}],\"raw_quinn_each\":[{}]}}",
            cores(),
            measured_median / base_median,
            list(&measured),
            list(&base)
        );
    }
    Ok(())
}

/// Whole `qpeer send` command (start, register, connect, hash, transfer, verify), MiB/s.
fn qpeer_send(bins: &Path, dir: &Path, file: &Path, relay: bool) -> Result<f64> {
    let run = tempfile::tempdir_in(dir)?;
    // The path's capacity is measured, not the tracker's default per-node relay limit.
    let limit = u32::MAX.to_string();
    let pair =
        Pair::start(bins, run.path(), &["--relay-bytes-per-sec", &limit, "--relay-packets-per-sec", &limit])?;
    let mut send_args = pair.send_args(file);
    if relay {
        send_args.push("--relay-only".into());
    }
    let started = Instant::now();
    let status = Command::new(bins.join("qpeer")).args(&send_args).stdout(Stdio::null()).status()?;
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("qpeer send failed ({status})");
    }
    let bytes = std::fs::metadata(file)?.len();
    Ok(bytes as f64 / 1048576.0 / seconds)
}

/// A minimal raw quinn bulk stream on loopback with qpeer's crypto provider: MiB/s from the
/// start of the handshake to the receiver's acknowledgement of the last byte.
async fn raw_quinn(bytes: u64) -> Result<f64> {
    let server_id = qpeer_certs::Identity::generate()?;
    let client_id = qpeer_certs::Identity::generate()?;
    let server = quinn::Endpoint::server(
        qpeer_certs::server_config(&server_id, &[b"bench"])?,
        "127.0.0.1:0".parse()?,
    )?;
    let addr = server.local_addr()?;
    let sink = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let (mut send, mut recv) = conn.accept_bi().await?;
        let mut total = 0u64;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
            total += chunk.bytes.len() as u64;
        }
        send.write_all(&[1]).await?;
        send.finish()?;
        let _ = conn.closed().await;
        anyhow::Ok(total)
    });
    let client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let config = qpeer_certs::client_config(
        &client_id,
        &qpeer_certs::ServerTrust::Pinned(server_id.node_id()),
        &[b"bench"],
    )?;
    let started = Instant::now();
    let conn = client.connect_with(config, addr, "qpeer")?.await?;
    qpeer_tests::bulk_send(&conn, bytes).await?;
    let seconds = started.elapsed().as_secs_f64();
    conn.close(0u32.into(), b"done");
    let received = sink.await??;
    if received != bytes {
        bail!("raw quinn delivered {received} of {bytes} bytes");
    }
    Ok(bytes as f64 / 1048576.0 / seconds)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

/// Time from the introduction request to a usable connection, `rounds` times.
async fn connect(rounds: usize) -> Result<()> {
    let tracker = qpeer_tests::TestTracker::start_with(qpeer_tracker::Limits {
        introductions_per_sec: 10_000,
        introduction_burst: 10_000,
        ..qpeer_tracker::Limits::default()
    })?;
    let a = qpeer_tests::node(&tracker).await?;
    let b = qpeer_tests::node(&tracker).await?;
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        let conn = a.connect(b.id()).await?;
        conn.ping(1).await?;
        times.push(started.elapsed());
        conn.close(0, "next round");
        // Wait until both sides dropped it, so the next round connects afresh.
        let deadline = Instant::now() + Duration::from_secs(5);
        while (!a.peers().is_empty() || !b.peers().is_empty()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    times.sort();
    println!(
        "{{\"scenario\":\"connect\",\"cores\":{},\"rounds\":{rounds},\"p50_ms\":{:.2},\"p99_ms\":{:.2}}}",
        cores(),
        percentile(&times, 0.5),
        percentile(&times, 0.99)
    );
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

/// Across trackers: three trackers in a private DHT on loopback; b lives on tracker 2; a
/// fresh node on tracker 1 (nothing cached) resolves b's record and connects, `rounds` times.
/// Also what b's record costs the DHT.
async fn dht(rounds: usize) -> Result<()> {
    use qpeer_node::NodeEvent;
    use qpeer_tests::dht::{node_on, published, trackers};
    use qpeer_wire::record::{HomeRecord, RECORD_TTL_SECS, REPUBLISH_SECS};

    let mut trackers = trackers(3)?;
    let b_home = tempfile::tempdir()?;
    let started = Instant::now();
    let b = node_on(&[&trackers[1]], b_home.path(), false).await?;
    published(&b, 0).await?;
    let publish_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (mut resolve, mut connect) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let home = tempfile::tempdir()?;
        let a = node_on(&[&trackers[0]], home.path(), false).await?;
        let mut events = a.events().subscribe();
        let started = Instant::now();
        a.connect(b.id()).await?.ping(1).await?;
        connect.push(started.elapsed());
        while let Ok(event) = events.try_recv() {
            if let NodeEvent::PeerResolved { took, .. } = event {
                resolve.push(took);
            }
        }
        a.shutdown().await;
    }
    anyhow::ensure!(
        resolve.len() == rounds,
        "every round resolved b's record ({} of {rounds})",
        resolve.len()
    );
    resolve.sort();
    connect.sort();
    // b's record as published: its tracker's one address.
    let home = b.home_tracker().ok_or_else(|| anyhow::anyhow!("b is not registered"))?;
    let record = HomeRecord {
        tracker: home.id.ok_or_else(|| anyhow::anyhow!("no tracker id"))?,
        addrs: vec![home.addr],
        issued_at: 0,
        ttl_secs: RECORD_TTL_SECS,
    };
    let value = record.encode()?.len();
    println!(
        "{{\"scenario\":\"dht\",\"cores\":{},\"rounds\":{rounds},\"publish_ms\":{publish_ms:.1},\"resolve_p50_ms\":{:.1},\"resolve_max_ms\":{:.1},\"connect_p50_ms\":{:.1},\"connect_max_ms\":{:.1},\"record_value_bytes\":{value},\"bep44_item_bytes\":{},\"republish_s\":{REPUBLISH_SECS},\"ttl_s\":{RECORD_TTL_SECS}}}",
        cores(),
        percentile(&resolve, 0.5),
        percentile(&resolve, 1.0),
        percentile(&connect, 0.5),
        percentile(&connect, 1.0),
        // What a DHT node stores: key, signature, sequence number, value (salt: 10 bytes).
        32 + 64 + 8 + 10 + value,
    );
    b.shutdown().await;
    for tracker in &mut trackers {
        tracker.stop().await;
    }
    Ok(())
}

/// N simulated nodes register with a real tracker process and stay registered.
async fn tracker(levels: &[usize], inflight: usize) -> Result<()> {
    use qpeer_tracker::client::RegisterInfo;
    let bins = bin_dir()?;
    let dir = tempfile::tempdir()?;
    let max = levels.iter().copied().max().unwrap_or(0);
    let (tracker, tracker_out) = start(
        &bins.join("qpeer-tracker"),
        &[
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--home".into(),
            dir.path().join("trk").display().to_string(),
            "--max-nodes".into(),
            (max + 10).to_string(),
            "--max-connections-per-ip".into(),
            (max + 10).to_string(),
            "--introductions-per-sec".into(),
            "100000".into(),
            "--introduction-burst".into(),
            "100000".into(),
        ],
    )?;
    let line = wait_line(&tracker_out, "[TRACKER] ")?;
    let tracker_addr: qpeer_tracker::TrackerAddr = line.trim_start_matches("[TRACKER] ").parse()?;
    let addr: std::net::SocketAddr = format!("{}:{}", tracker_addr.host, tracker_addr.port).parse()?;
    let trust = qpeer_certs::ServerTrust::Pinned(tracker_addr.node_id.context("pinned")?);
    let pid = tracker.0.id();
    std::thread::sleep(Duration::from_millis(300));
    let base_rss = rss_kib(pid).context("tracker RSS")?;
    // A few client endpoints carry all simulated nodes.
    // They get the tracker's receive buffer size: a burst of answers must not overflow them.
    let endpoints: Vec<quinn::Endpoint> = (0..4)
        .map(|_| {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
            qpeer_tracker::server::enlarge_receive_buffer(&socket);
            quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                socket,
                std::sync::Arc::new(quinn::TokioRuntime),
            )
        })
        .collect::<Result<_, _>>()?;
    let mut clients: Vec<TrackerClient> = Vec::new();
    let mut ids: Vec<qpeer_certs::NodeId> = Vec::new();
    let mut introducers = Vec::new();
    for &level in levels {
        let want = level - clients.len();
        // Each simulated node's identity and TLS config (with its certificate) exist before the
        // clock starts, as a real node's do before it registers.
        let configs = (0..want)
            .map(|_| {
                let identity = qpeer_certs::Identity::generate()?;
                let config = TrackerClient::config(&identity, &trust)?;
                anyhow::Ok((identity.node_id(), config))
            })
            .collect::<Result<Vec<_>>>()?;
        // `inflight` handshakes at once (32 by default: enough to keep both cores busy).
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(inflight));
        let started = Instant::now();
        let (tracker_cpu, bench_cpu) = (cpu_seconds(Some(pid)), cpu_seconds(None));
        let mut tasks = tokio::task::JoinSet::new();
        let retries = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for (i, (id, config)) in configs.into_iter().enumerate() {
            let endpoint = endpoints[i % endpoints.len()].clone();
            let trust = trust.clone();
            let permit = permits.clone().acquire_owned().await?;
            let retries = retries.clone();
            tasks.spawn(async move {
                let _permit = permit;
                let began = Instant::now();
                // Like a real node, a simulated one tries again (with backoff) when a
                // registration fails; every retry is counted and reported.
                let mut backoff = Duration::from_millis(250);
                let mut attempt = 0;
                let (client, events) = loop {
                    match TrackerClient::connect_with_config(
                        &endpoint,
                        config.clone(),
                        addr,
                        "qpeer",
                        &trust,
                        RegisterInfo::default(),
                    )
                    .await
                    {
                        Ok(registered) => break registered,
                        Err(e) if attempt == 4 => return Err(e.into()),
                        Err(_) => {
                            attempt += 1;
                            retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                        }
                    }
                };
                anyhow::Ok((client, events, id, began.elapsed()))
            });
        }
        let mut failure = None;
        let mut register_times = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined? {
                Ok((client, events, id, took)) => {
                    register_times.push(took);
                    clients.push(client);
                    introducers.push(events);
                    ids.push(id);
                }
                Err(e) => {
                    failure.get_or_insert(e.to_string());
                }
            }
        }
        if let Some(error) = failure {
            println!(
                "{{\"scenario\":\"tracker\",\"cores\":{},\"target_nodes\":{level},\"nodes_reached\":{},\"tracker_rss_kib\":{},\"error\":{:?}}}",
                cores(),
                clients.len(),
                rss_kib(pid).unwrap_or(0),
                error
            );
            bail!("{} of {level} simulated nodes could not register: {error}", level - clients.len());
        }
        let seconds = started.elapsed().as_secs_f64();
        let tracker_cpu_us = (cpu_seconds(Some(pid)) - tracker_cpu) * 1e6 / want.max(1) as f64;
        let nodes_cpu_us = (cpu_seconds(None) - bench_cpu) * 1e6 / want.max(1) as f64;
        register_times.sort();
        std::thread::sleep(Duration::from_millis(500));
        let rss = rss_kib(pid).context("tracker RSS")?;
        // Introductions under this load: between two registered simulated nodes.
        let mut times = Vec::new();
        for i in 0..200 {
            let (from, to) = (i % clients.len(), (i * 7919 + 1) % clients.len());
            if from == to {
                continue;
            }
            let (from, to) = (&clients[from], ids[to]);
            let started = Instant::now();
            from.introduce(to).await?;
            times.push(started.elapsed());
        }
        times.sort();
        println!(
            "{{\"scenario\":\"tracker\",\"cores\":{},\"nodes\":{},\"registrations_per_s\":{:.0},\"tracker_rss_kib\":{rss},\"tracker_base_rss_kib\":{base_rss},\"rss_per_node_kib\":{:.2},\"introduce_p50_ms\":{:.2},\"introduce_p99_ms\":{:.2},\"in_flight\":{inflight},\"registration_retries\":{},\"register_p50_ms\":{:.1},\"register_p99_ms\":{:.1},\"register_max_ms\":{:.1},\"tracker_cpu_us_per_registration\":{tracker_cpu_us:.0},\"simulated_nodes_cpu_us_per_registration\":{nodes_cpu_us:.0}}}",
            cores(),
            clients.len(),
            want as f64 / seconds,
            (rss.saturating_sub(base_rss)) as f64 / clients.len() as f64,
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            retries.load(std::sync::atomic::Ordering::Relaxed),
            percentile(&register_times, 0.5),
            percentile(&register_times, 0.99),
            percentile(&register_times, 1.0),
        );
        // Drain events so queues do not grow.
        for events in &mut introducers {
            while events.try_recv().is_ok() {}
        }
    }
    Ok(())
}

/// CPU time (user + system) a process has used so far, in seconds; `None` for this process.
fn cpu_seconds(pid: Option<u32>) -> f64 {
    let path = pid.map_or_else(|| "/proc/self/stat".to_string(), |pid| format!("/proc/{pid}/stat"));
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks: u64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<u64>().ok()).sum();
    // Linux reports these in USER_HZ, 100 per second on every supported architecture.
    ticks as f64 / 100.0
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}
