//! Faults with real processes on loopback: a tracker killed and restarted, a receiver that
//! vanishes mid-transfer, a corrupt identity key.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use qpeer_node::Node;
use qpeer_tests::lab::bin_dir;
use qpeer_tests::procs::{Proc, TrackerProc};

async fn node_on(tracker: &qpeer_tracker::TrackerAddr, home: &std::path::Path) -> Result<Node> {
    let node = Node::builder()
        .home(home)
        .bind_addr(([127, 0, 0, 1], 0).into())
        .tracker(tracker.clone())
        .bind()
        .await?;
    node.registered(Duration::from_secs(10)).await?;
    Ok(node)
}

#[tokio::test]
async fn nodes_re_register_within_5_s_after_the_tracker_is_killed_and_restarted() -> Result<()> {
    qpeer_tests::init_tracing();
    let dir = tempfile::tempdir()?;
    let mut tracker = TrackerProc::start(&dir.path().join("trk"), "127.0.0.1:0", &[])?;
    let a = node_on(&tracker.tracker, &dir.path().join("a")).await?;
    let b = node_on(&tracker.tracker, &dir.path().join("b")).await?;
    assert_eq!((a.registrations(), b.registrations()), (1, 1));

    // SIGKILL: no goodbye reaches the nodes. Then the same tracker comes back.
    tracker.proc.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    tracker.restart()?;
    let restarted = Instant::now();
    while a.registrations() < 2 || b.registrations() < 2 {
        ensure!(
            restarted.elapsed() < Duration::from_secs(5),
            "not re-registered within 5 s (a: {}, b: {})\ntracker stderr:\n{}",
            a.registrations(),
            b.registrations(),
            tracker.proc.stderr.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("both nodes re-registered {:?} after the restart", restarted.elapsed());
    let conn = a.connect(b.id()).await?;
    conn.ping(1).await?;
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

#[test]
fn a_node_with_a_corrupt_key_refuses_to_start_and_leaves_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tracker = TrackerProc::start(&dir.path().join("trk"), "127.0.0.1:0", &[])?;
    let home = dir.path().join("node");
    std::fs::create_dir_all(&home)?;
    let key = home.join("identity.key");
    let garbage = b"-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n";
    std::fs::write(&key, garbage)?;
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let mut listen = Proc::start(
        &bin_dir()?.join("qpeer"),
        &[
            "listen".into(),
            "--home".into(),
            home.display().to_string(),
            "--tracker".into(),
            tracker.tracker.to_string(),
            "--bind".into(),
            "127.0.0.1:0".into(),
        ],
    )?;
    let code = listen.wait(Duration::from_secs(10))?;
    ensure!(code == 1, "exit code {code}");
    let err = listen.stderr.text();
    ensure!(err.contains("corrupt") && err.contains("left untouched"), "{err}");
    ensure!(std::fs::read(&key)? == garbage, "the key file was modified");
    Ok(())
}

/// Writes `len` bytes of a simple pattern.
fn write_pattern(path: &std::path::Path, len: usize) -> Result<()> {
    let data: Vec<u8> = (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1]).collect();
    std::fs::write(path, data)?;
    Ok(())
}

#[test]
#[ignore = "slow (waits for the 30 s idle timeout): run with --ignored, as .ci/run does"]
fn a_receiver_vanishing_mid_transfer_fails_the_sender_in_time_and_the_next_send_resumes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let bins = bin_dir()?;
    let tracker = TrackerProc::start(&dir.path().join("trk"), "127.0.0.1:0", &[])?;
    let file = dir.path().join("payload.bin");
    let size = 400 << 20;
    write_pattern(&file, size)?;
    let sender_home = dir.path().join("s").display().to_string();
    let id = Proc::start(&bins.join("qpeer"), &["id".into(), "--home".into(), sender_home.clone()])?;
    let mut id = id;
    ensure!(id.wait(Duration::from_secs(10))? == 0);
    let sender_id = id.stdout.text().lines().last().unwrap_or_default().to_string();
    let inbox = dir.path().join("inbox");
    let listen_args = vec![
        "listen".to_string(),
        "--home".into(),
        dir.path().join("r").display().to_string(),
        "--tracker".into(),
        tracker.tracker.to_string(),
        "--bind".into(),
        "127.0.0.1:0".into(),
        "--out".into(),
        inbox.display().to_string(),
        "--accept-from".into(),
        sender_id,
    ];
    let mut receiver = Proc::start(&bins.join("qpeer"), &listen_args)?;
    let registered = receiver.stdout.wait_for(Duration::from_secs(10), |l| l.starts_with("[REGISTERED]"))?;
    let receiver_id = registered.rsplit(' ').next().unwrap_or_default().to_string();
    let send_args = vec![
        "send".to_string(),
        receiver_id,
        file.display().to_string(),
        "--home".into(),
        sender_home,
        "--tracker".into(),
        tracker.tracker.to_string(),
        "--bind".into(),
        "127.0.0.1:0".into(),
    ];
    let mut sender = Proc::start(&bins.join("qpeer"), &send_args)?;
    let part = inbox.join("payload.bin.part");
    let start = Instant::now();
    while std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0) < (size / 4) as u64 {
        ensure!(start.elapsed() < Duration::from_secs(60), "the transfer never got going");
        std::thread::sleep(Duration::from_millis(10));
    }
    receiver.kill();
    let killed = Instant::now();
    let code = sender.wait(Duration::from_secs(60))?;
    let failed_after = killed.elapsed();
    eprintln!("the sender gave up {failed_after:?} after the receiver vanished");
    ensure!(code == 1, "the sender must fail: {code}\n{}", sender.stdout.text());
    ensure!(failed_after <= Duration::from_secs(35), "gave up after {failed_after:?}, past the idle timeout");
    let err = sender.stderr.text();
    ensure!(err.contains("timed out") || err.contains("lost"), "unclear error: {err}");
    let kept = std::fs::metadata(&part)?.len();
    ensure!(kept > 0, "the receiver's partial file must be kept");

    let mut receiver = Proc::start(&bins.join("qpeer"), &listen_args)?;
    receiver.stdout.wait_for(Duration::from_secs(10), |l| l.starts_with("[LISTENING]"))?;
    let mut again = Proc::start(&bins.join("qpeer"), &send_args)?;
    ensure!(again.wait(Duration::from_secs(120))? == 0, "resend failed: {}", again.stderr.text());
    let out = again.stdout.text();
    ensure!(out.contains("[RESUMED]"), "the second send must resume: {out}");
    ensure!(std::fs::read(inbox.join("payload.bin"))? == std::fs::read(&file)?, "content differs");
    receiver.kill();
    Ok(())
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()?;
        ensure!(status.success(), "mount tmpfs failed (the test needs root)");
        Ok(Self(dir.to_path_buf()))
    }

    fn resize(&self, size: &str) -> Result<()> {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()?;
        ensure!(status.success(), "remount failed");
        Ok(())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test]
#[ignore = "needs root (mounts a small tmpfs): run with --ignored, as .ci/run does"]
async fn a_full_disk_keeps_the_part_file_and_the_send_resumes_once_space_is_freed() -> Result<()> {
    use qpeer_node::transfer::receive::{AcceptPolicy, ReceiveConfig, Receiver};
    use qpeer_node::transfer::scan::scan;
    use qpeer_node::transfer::send::send;
    use qpeer_node::transfer::TransferError;
    use qpeer_node::Events;

    let dir = tempfile::tempdir()?;
    let disk = Tmpfs::mount(&dir.path().join("disk"), "8m")?;
    let tracker = TrackerProc::start(&dir.path().join("trk"), "127.0.0.1:0", &[])?;
    let sender = node_on(&tracker.tracker, &dir.path().join("s")).await?;
    let receiver_node = node_on(&tracker.tracker, &dir.path().join("r")).await?;
    let receiver = Receiver::new(ReceiveConfig {
        out: Some(disk.0.clone()),
        policy: AcceptPolicy::Only([sender.id()].into_iter().collect()),
        events: Events::new(),
    });
    let accepting = receiver_node.accept_handle();
    tokio::spawn(async move {
        while let Some(conn) = accepting.accept().await {
            tokio::spawn(receiver.clone().serve(conn));
        }
    });
    let file = dir.path().join("big.bin");
    let size = 16 << 20;
    write_pattern(&file, size)?;
    let send_once = || async {
        let paths = vec![file.clone()];
        let plan = tokio::task::spawn_blocking(move || scan(&paths)).await.expect("scan")?;
        let conn = sender.connect(receiver_node.id()).await?;
        send(&conn, plan, &Events::new()).await
    };

    match send_once().await {
        Err(TransferError::FilesFailed { failures, .. }) => {
            ensure!(failures[0].1.contains("disk is full"), "unclear: {failures:?}")
        }
        other => bail!("expected a disk-full failure, got {other:?}"),
    }
    let part = disk.0.join("big.bin.part");
    let kept = std::fs::metadata(&part)?.len();
    ensure!(kept > 0 && kept < size as u64, "the .part must hold what fit: {kept}");

    disk.resize("64m")?;
    let report = send_once().await?;
    ensure!(report.sent_bytes <= size as u64 - kept, "resumed: sent {} with {kept} kept", report.sent_bytes);
    ensure!(std::fs::read(disk.0.join("big.bin"))? == std::fs::read(&file)?, "content differs");
    ensure!(!part.exists());
    sender.shutdown().await;
    receiver_node.shutdown().await;
    Ok(())
}

/// A listener killed with SIGKILL comes back (same home, new port) while a peer still holds
/// the old, half-open connection: the peer's next connect must give a working connection at
/// once, not the dead one (nor wait for its 30 s idle timeout).
#[tokio::test]
async fn a_peer_killed_and_restarted_is_reached_at_once_through_its_new_process() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tracker = TrackerProc::start(&dir.path().join("trk"), "127.0.0.1:0", &[])?;
    let a = node_on(&tracker.tracker, &dir.path().join("a")).await?;
    let bins = bin_dir()?;
    let home = dir.path().join("b").display().to_string();
    let args: Vec<String> =
        ["listen", "--home", &home, "--tracker", &tracker.tracker.to_string(), "--bind", "127.0.0.1:0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let registered =
        |p: &Proc| p.stdout.wait_for(Duration::from_secs(10), |l| l.starts_with("[REGISTERED] observed "));
    let mut b = Proc::start(&bins.join("qpeer"), &args)?;
    let line = registered(&b)?;
    let b_id: qpeer_certs::NodeId = line.rsplit(' ').next().unwrap_or_default().parse()?;
    a.connect(b_id).await?.ping(1).await?;

    b.kill();
    let b = Proc::start(&bins.join("qpeer"), &args)?;
    registered(&b)?;
    // Past the moment in which a live connection is handed out without asking the tracker.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    let conn = a.connect(b_id).await?;
    let rtt = tokio::time::timeout(Duration::from_secs(3), conn.ping(2)).await;
    ensure!(
        matches!(rtt, Ok(Ok(_))),
        "the ping after the restart failed: {rtt:?}\n{}\n{}",
        b.stdout.text(),
        b.stderr.text()
    );
    ensure!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    eprintln!("reached the restarted peer in {:?}, path {}", started.elapsed(), conn.path());
    a.shutdown().await;
    Ok(())
}
