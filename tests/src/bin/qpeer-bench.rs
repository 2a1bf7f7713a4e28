//! qpeer benchmarks: real binaries on loopback, one JSON line per figure.
//!
//! `cargo build --release --bins && cargo run --release -p qpeer-tests --bin qpeer-bench -- transfer-rss`

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use qpeer_tests::lab::bin_dir;

fn usage() -> ! {
    eprintln!("usage: qpeer-bench transfer-rss [--gib N]");
    std::process::exit(2)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let scenario = args.next().unwrap_or_else(|| usage());
    let mut gib: u64 = 2;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--gib" => gib = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage()),
            _ => usage(),
        }
    }
    match scenario.as_str() {
        "transfer-rss" => transfer_rss(gib),
        _ => usage(),
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

fn write_random(path: &Path, bytes: u64) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..(bytes >> 20) {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        out.write_all(&block)?;
    }
    out.flush()?;
    Ok(())
}

/// Sends an N GiB file between two `qpeer` processes on loopback and reports both sides'
/// peak RSS and the throughput of the whole `qpeer send` command.
fn transfer_rss(gib: u64) -> Result<()> {
    let bins = bin_dir()?;
    let dir = tempfile::tempdir()?;
    let home = |name: &str| dir.path().join(name).display().to_string();
    let file = dir.path().join("payload.bin");
    let bytes = gib << 30;
    write_random(&file, bytes)?;

    let (_tracker, tracker_out) = start(
        &bins.join("qpeer-tracker"),
        &["--listen".into(), "127.0.0.1:0".into(), "--home".into(), home("trk")],
    )?;
    let tracker = wait_line(&tracker_out, "[TRACKER] ")?.trim_start_matches("[TRACKER] ").to_string();
    let common = |name: &str| {
        vec![
            "--home".to_string(),
            home(name),
            "--tracker".into(),
            tracker.clone(),
            "--bind".into(),
            "127.0.0.1:0".into(),
        ]
    };
    let sender_id = String::from_utf8(
        Command::new(bins.join("qpeer")).args(["id", "--home", &home("s")]).output()?.stdout,
    )?
    .lines()
    .last()
    .context("no id")?
    .to_string();
    let mut listen_args =
        vec!["listen".to_string(), "--out".into(), home("inbox"), "--accept-from".into(), sender_id];
    listen_args.extend(common("r"));
    let (receiver, receiver_out) = start(&bins.join("qpeer"), &listen_args)?;
    let registered = wait_line(&receiver_out, "[REGISTERED] ")?;
    let receiver_id = registered.rsplit(' ').next().context("no id")?.to_string();

    let mut send_args = vec!["send".to_string(), receiver_id, file.display().to_string(), "--quiet".into()];
    send_args.extend(common("s"));
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
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        (bytes as f64 / 1048576.0) / seconds,
    );
    Ok(())
}
