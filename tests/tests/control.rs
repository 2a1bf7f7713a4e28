//! One identity, one running node: the CLI talks to a running `qpeer listen` through its
//! control socket, a second node on the same home is refused, a crash leaves nothing in the
//! way, and a node pushed off by its own NodeId elsewhere stops instead of fighting.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use qpeer_tests::lab::bin_dir;
use qpeer_tests::procs::{Proc, TrackerProc};

fn qpeer(args: &[&str]) -> Result<Proc> {
    Proc::start(&bin_dir()?.join("qpeer"), &args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
}

fn listen(home: &Path, tracker: &str, extra: &[&str]) -> Result<Proc> {
    let home = home.display().to_string();
    let mut args = vec!["listen", "--home", &home, "--tracker", tracker, "--bind", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let proc = qpeer(&args)?;
    proc.stdout.wait_for(Duration::from_secs(10), |l| l.starts_with("[LISTENING]"))?;
    Ok(proc)
}

fn id_of(home: &Path) -> Result<String> {
    let mut proc = qpeer(&["id", "--home", &home.display().to_string()])?;
    ensure!(proc.wait(Duration::from_secs(10))? == 0);
    Ok(proc.stdout.text().lines().last().context("no id")?.to_string())
}

fn registrations(tracker: &TrackerProc, id: &str) -> usize {
    tracker
        .proc
        .stdout
        .text()
        .lines()
        .filter(|l| l.starts_with("[NEW CONNECTION]") && l.ends_with(&id[..8]))
        .count()
}

/// Runs a one-shot command to completion: (exit code, stdout, stderr).
fn run(args: &[&str]) -> Result<(i32, String, String)> {
    let mut proc = qpeer(args)?;
    let code = proc.wait(Duration::from_secs(30))?;
    Ok((code, proc.stdout.text(), proc.stderr.text()))
}

#[test]
fn commands_run_inside_the_running_node_and_one_node_runs_per_home() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tracker = TrackerProc::start(&dir.path().join("trk"), "127.0.0.1:0", &[])?;
    let t = tracker.tracker.to_string();
    let (home_a, home_b) = (dir.path().join("a"), dir.path().join("b"));
    let inbox = dir.path().join("inbox");
    let a = listen(&home_a, &t, &["--out", &inbox.display().to_string(), "--accept-any"])?;
    let mut b = listen(&home_b, &t, &[])?;
    let (a_id, b_id) = (id_of(&home_a)?, id_of(&home_b)?);
    let hb = home_b.display().to_string();

    // send, ping, peers from b's home go through b's running node.
    let file = dir.path().join("note.txt");
    std::fs::write(&file, b"through the control socket")?;
    let (code, out, err) =
        run(&["send", &a_id, &file.display().to_string(), "--home", &hb, "--tracker", &t])?;
    ensure!(code == 0, "send: {out}\n{err}");
    ensure!(out.contains("[SENT] 1 files, 26 bytes"), "{out}");
    ensure!(std::fs::read(inbox.join("note.txt"))? == b"through the control socket");
    let (code, out, err) = run(&["ping", &a_id, "-c", "2", "-i", "0.1", "--home", &hb, "--tracker", &t])?;
    ensure!(code == 0 && out.contains("2 sent, 2 received"), "ping: {out}\n{err}");
    let (code, out, _) = run(&["peers", "--home", &hb, "--tracker", &t])?;
    ensure!(code == 0 && out.contains(&a_id) && out.contains(&b_id), "peers: {out}");
    let (code, out, _) = run(&["status", "--home", &hb])?;
    ensure!(
        code == 0 && out.contains(&b_id) && out.contains(&a_id) && out.contains("direct"),
        "status: {out}"
    );
    ensure!(
        registrations(&tracker, &b_id) == 1,
        "b registered more than once:\n{}",
        tracker.proc.stdout.text()
    );
    // A failing command keeps its exit code through the socket.
    let stranger = "0".repeat(64);
    let (code, _, err) = run(&["ping", &stranger, "-c", "1", "--home", &hb, "--tracker", &t])?;
    ensure!(code == 1 && err.contains("not registered"), "{err}");

    // A second node on the same home is refused.
    let (code, _, err) = run(&["listen", "--home", &hb, "--tracker", &t, "--bind", "127.0.0.1:0"])?;
    ensure!(code == 1 && err.contains("already running"), "second listen: {err}");

    // SIGKILL leaves a socket file and a lock file behind; neither is in the way.
    b.kill();
    ensure!(home_b.join("node.sock").exists(), "the killed node's socket file should still be there");
    let (code, out, _) = run(&["status", "--home", &hb])?;
    ensure!(code == 4 && out.contains("not running"), "status after kill: {out}");
    let b2 = listen(&home_b, &t, &[])?;
    let (code, out, err) = run(&["ping", &a_id, "-c", "1", "--home", &hb, "--tracker", &t])?;
    ensure!(
        code == 0,
        "ping after restart: {out}\n{err}\nA:\n{}\n{}\nB2:\n{}\n{}",
        a.stdout.text(),
        a.stderr.text(),
        b2.stdout.text(),
        b2.stderr.text()
    );
    Ok(())
}

#[test]
fn a_node_replaced_by_its_own_id_elsewhere_stops_and_says_why() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tracker = TrackerProc::start(&dir.path().join("trk"), "127.0.0.1:0", &[])?;
    let t = tracker.tracker.to_string();
    let (first_home, second_home) = (dir.path().join("first"), dir.path().join("second"));
    let mut first = listen(&first_home, &t, &[])?;
    let id = id_of(&first_home)?;
    // The same identity in another home (another machine, say).
    std::fs::create_dir_all(&second_home)?;
    std::fs::copy(first_home.join("identity.key"), second_home.join("identity.key"))?;
    let second = listen(&second_home, &t, &[])?;

    let code = first.wait(Duration::from_secs(10))?;
    ensure!(code == 3, "the replaced node must stop with exit code 3, got {code}");
    let err = first.stderr.text();
    ensure!(err.contains("registered again by another process"), "{err}");
    // No fight: the survivor stays registered, nobody re-registers in a loop.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(registrations(&tracker, &id) == 2, "registrations:\n{}", tracker.proc.stdout.text());
    let mut second = second;
    ensure!(second.child.try_wait()?.is_none(), "the newer node must keep running");
    Ok(())
}
