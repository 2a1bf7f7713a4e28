//! Everyday use of the `qpeer` binary (issue 19): peers named by id prefix, tracker name and
//! local alias; ambiguous and short prefixes refused with exit 2; one-shot options a running
//! listener cannot honour refused; `QPEER_TRACKER=` taken as unset; progress and a summary on
//! the receiving listener; `status --json`, `peers --json`, `ping --json` and `send --json`
//! parse; `status` names a one-shot command running a node of its own; no ANSI escape in any
//! output (stdout and stderr are pipes here).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use qpeer_tests::lab::bin_dir;
use qpeer_tests::procs::{Proc, TrackerProc};
use serde_json::Value;

fn qpeer_with(args: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
    let mut command = std::process::Command::new(bin_dir()?.join("qpeer"));
    command.args(args).env_remove("QPEER_TRACKER").env_remove("QPEER_HOME");
    for (key, value) in env {
        command.env(key, value);
    }
    Proc::spawn(command).context("cannot start qpeer")
}

/// All output seen, to check for escape codes at the end.
#[derive(Default)]
struct Seen(std::sync::Mutex<String>);

impl Seen {
    fn add(&self, text: &str) {
        if let Ok(mut seen) = self.0.lock() {
            seen.push_str(text);
            seen.push('\n');
        }
    }

    fn check_no_ansi(&self) -> Result<()> {
        let seen = self.0.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        if let Some(at) = seen.find('\x1b') {
            let start = seen[..at].rfind('\n').map_or(0, |n| n + 1);
            anyhow::bail!(
                "an ANSI escape in output that is not a terminal: {:?}",
                &seen[start..(at + 40).min(seen.len())]
            );
        }
        Ok(())
    }
}

/// Runs a one-shot command to completion: (exit code, stdout, stderr).
fn run_env(seen: &Seen, args: &[&str], env: &[(&str, &str)]) -> Result<(i32, String, String)> {
    let mut proc = qpeer_with(args, env)?;
    let code = proc.wait(Duration::from_secs(30))?;
    let (out, err) = (proc.stdout.text(), proc.stderr.text());
    seen.add(&out);
    seen.add(&err);
    Ok((code, out, err))
}

fn run(seen: &Seen, args: &[&str]) -> Result<(i32, String, String)> {
    run_env(seen, args, &[])
}

fn listen(home: &Path, tracker: &str, extra: &[&str]) -> Result<Proc> {
    let home = home.display().to_string();
    let mut args = vec!["listen", "--home", &home, "--tracker", tracker, "--bind", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let proc = qpeer_with(&args, &[])?;
    proc.stdout.wait_for(Duration::from_secs(15), |l| l.starts_with("[LISTENING]"))?;
    Ok(proc)
}

fn id_of(seen: &Seen, home: &Path) -> Result<String> {
    let (code, out, err) = run(seen, &["id", "--home", &home.display().to_string()])?;
    ensure!(code == 0, "qpeer id: {err}");
    Ok(out.lines().last().context("no id")?.to_string())
}

fn json_lines(out: &str) -> Result<Vec<Value>> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l:?}\nin:\n{out}")))
        .collect()
}

#[test]
fn two_listeners_name_each_other_by_prefix_alias_and_name() -> Result<()> {
    let seen = Seen::default();
    let dir = tempfile::tempdir()?;
    let tracker = TrackerProc::start(&dir.path().join("trk"), "127.0.0.1:0", &[])?;
    let t = tracker.tracker.to_string();
    let (home_a, home_b) = (dir.path().join("a"), dir.path().join("b"));
    let (ha, hb) = (home_a.display().to_string(), home_b.display().to_string());
    let inbox_b = dir.path().join("inbox-b");
    let (a_id, b_id) = (id_of(&seen, &home_a)?, id_of(&seen, &home_b)?);

    // B accepts files from A by a local alias.
    let (code, out, err) = run(&seen, &["alias", "alice-laptop", &a_id, "--home", &hb])?;
    ensure!(code == 0, "alias: {out}\n{err}");
    let (code, _, err) = run(&seen, &["alias", "alice-laptop", &b_id, "--home", &hb])?;
    ensure!(code == 2 && err.contains("--force"), "an alias is not silently replaced: {code} {err}");
    let (code, out, _) = run(&seen, &["alias", "--home", &hb])?;
    ensure!(code == 0 && out.contains(&format!("alice-laptop {a_id}")), "alias list: {out}");

    let a = listen(&home_a, &t, &["--name", "alice"])?;
    let b = listen(
        &home_b,
        &t,
        &["--name", "bob-node", "--out", &inbox_b.display().to_string(), "--accept-from", "alice-laptop"],
    )?;

    // B pings A by the 8 characters every line prints.
    let (code, out, err) =
        run(&seen, &["ping", &a_id[..8], "-c", "2", "-i", "0.1", "--home", &hb, "--tracker", &t])?;
    ensure!(
        code == 0 && out.contains("2 sent, 2 received") && out.contains(&a_id),
        "ping by prefix: {out}\n{err}"
    );
    // ... and by the name A registered with; QPEER_TRACKER= (empty) is unset, so the
    // listener's tracker applies.
    let (code, out, err) =
        run_env(&seen, &["ping", "alice", "-c", "1", "--home", &hb], &[("QPEER_TRACKER", "")])?;
    ensure!(code == 0 && out.contains("1 sent, 1 received"), "ping by tracker name: {out}\n{err}");
    // JSON: one object per reply, then a summary.
    let (code, out, err) =
        run(&seen, &["ping", &a_id[..10], "-c", "2", "-i", "0.1", "--json", "--home", &hb])?;
    ensure!(code == 0, "ping --json: {out}\n{err}");
    let objects = json_lines(&out)?;
    ensure!(objects.len() == 3, "{out}");
    ensure!(objects[0]["type"] == "reply" && objects[0]["rtt_ms"].is_number(), "{out}");
    ensure!(objects[2]["type"] == "summary" && objects[2]["received"] == 2, "{out}");

    // A sends to B by an alias, through A's listener; B shows the offer, the file and a summary.
    ensure!(run(&seen, &["alias", "bob", &b_id, "--home", &ha])?.0 == 0);
    let file = dir.path().join("hello.txt");
    std::fs::write(&file, vec![b'q'; 300_000])?;
    let started = Instant::now();
    let (code, out, err) = run(&seen, &["send", "bob", &file.display().to_string(), "--home", &ha])?;
    ensure!(code == 0 && out.contains("[SENT] 1 files, 300000 bytes"), "send by alias: {out}\n{err}");
    ensure!(started.elapsed() < Duration::from_secs(30));
    ensure!(std::fs::read(inbox_b.join("hello.txt"))?.len() == 300_000, "the file did not arrive");
    let done = b.stdout.wait_for(Duration::from_secs(10), |l| l.starts_with("[DONE] from "))?;
    ensure!(done.contains("1 files") && done.contains("/s"), "{done}");
    ensure!(b.stdout.text().contains("[OFFER] from"), "{}", b.stdout.text());

    // send --json: one summary object.
    let other = dir.path().join("other.txt");
    std::fs::write(&other, b"json")?;
    let (code, out, err) =
        run(&seen, &["send", &b_id[..12], &other.display().to_string(), "--json", "--home", &ha])?;
    ensure!(code == 0, "send --json: {out}\n{err}");
    let objects = json_lines(&out)?;
    ensure!(objects.len() == 1 && objects[0]["ok"] == true && objects[0]["total_bytes"] == 4, "{out}");

    // status --json and peers --json parse and list the peer.
    let (code, out, err) = run(&seen, &["status", "--json", "--home", &ha])?;
    ensure!(code == 0, "status --json: {out}\n{err}");
    let status: Value = serde_json::from_str(out.trim()).with_context(|| out.clone())?;
    ensure!(status["state"] == "listening" && status["id"] == a_id.as_str(), "{out}");
    let peers = status["peers"].as_array().context("peers")?;
    ensure!(peers.iter().any(|p| p["id"] == b_id.as_str()), "status lists no B: {out}");
    ensure!(status["transfers"].is_array(), "{out}");
    let (code, out, err) = run(&seen, &["peers", "--json", "--home", &ha])?;
    ensure!(code == 0, "peers --json: {out}\n{err}");
    let list: Value = serde_json::from_str(out.trim()).with_context(|| out.clone())?;
    let bob =
        list.as_array().context("an array")?.iter().find(|p| p["id"] == b_id.as_str()).context("B")?.clone();
    ensure!(
        bob["name"] == "bob-node" && bob["aliases"][0] == "bob" && bob["registered_at"].is_u64(),
        "{out}"
    );
    let (code, out, _) = run(&seen, &["peers", "--home", &ha])?;
    ensure!(code == 0 && out.contains(" UTC (") && !out.contains("registered_at="), "peers text: {out}");

    // Ambiguous and short prefixes are usage errors naming the rule or the candidates.
    for (name, fill) in [("twin-one", '0'), ("twin-two", '1')] {
        let fake = format!("abcdef{}", fill.to_string().repeat(58));
        ensure!(run(&seen, &["alias", name, &fake, "--home", &ha])?.0 == 0);
    }
    let (code, _, err) = run(&seen, &["ping", "abcdef", "-c", "1", "--home", &ha])?;
    ensure!(
        code == 2 && err.contains("matches 2 nodes") && err.contains("twin-one"),
        "ambiguous: {code} {err}"
    );
    ensure!(err.lines().filter(|l| l.starts_with("error:")).count() == 1, "one error: {err}");
    let (code, _, err) = run(&seen, &["ping", &a_id[..4], "-c", "1", "--home", &hb])?;
    ensure!(code == 2 && err.contains("at least 6"), "short prefix: {code} {err}");
    let (code, _, err) = run(&seen, &["ping", "nobody-here", "-c", "1", "--home", &hb])?;
    ensure!(code == 2 && err.contains("nobody-here"), "unknown name: {code} {err}");

    // Options the running listener cannot honour are refused, saying why.
    let (code, _, err) =
        run(&seen, &["send", "--relay-only", "alice-laptop", &file.display().to_string(), "--home", &hb])?;
    ensure!(code == 2 && err.contains("--relay-only") && err.contains("own settings"), "{code} {err}");
    let (code, _, err) = run(&seen, &["ping", &a_id, "--tracker", "127.0.0.1:9", "--home", &hb])?;
    ensure!(code == 2 && err.contains("--tracker"), "{code} {err}");

    drop(a);
    drop(b);
    seen.add(&tracker.proc.stdout.text());
    seen.check_no_ansi()
}

#[test]
fn status_names_a_one_shot_command_and_receiving_shows_progress_lines() -> Result<()> {
    let seen = Seen::default();
    let dir = tempfile::tempdir()?;
    let tracker = TrackerProc::start(&dir.path().join("trk"), "127.0.0.1:0", &[])?;
    let t = tracker.tracker.to_string();
    let (home_r, home_s) = (dir.path().join("r"), dir.path().join("s"));
    let (hr, hs) = (home_r.display().to_string(), home_s.display().to_string());
    let inbox = dir.path().join("inbox");
    let s_id = id_of(&seen, &home_s)?;
    let receiver = listen(&home_r, &t, &["--out", &inbox.display().to_string(), "--accept-from", &s_id])?;
    let r_id = id_of(&seen, &home_r)?;

    // Nothing runs on the sender's home: exit 4.
    let (code, out, _) = run(&seen, &["status", "--home", &hs])?;
    ensure!(code == 4 && out.contains("not running"), "{code} {out}");
    let (code, out, _) = run(&seen, &["status", "--json", "--home", &hs])?;
    let object: Value = serde_json::from_str(out.trim()).with_context(|| out.clone())?;
    ensure!(code == 4 && object["state"] == "not running", "{out}");

    // A one-shot ping runs a node of its own there: status says so, with its pid.
    let mut ping = qpeer_with(
        &[
            "ping",
            &r_id[..8],
            "-c",
            "30",
            "-i",
            "0.2",
            "--home",
            &hs,
            "--tracker",
            &t,
            "--bind",
            "127.0.0.1:0",
        ],
        &[],
    )?;
    ping.stdout.wait_for(Duration::from_secs(15), |l| l.starts_with("reply from"))?;
    let (code, out, err) = run(&seen, &["status", "--home", &hs])?;
    ensure!(
        code == 0 && out.contains("one-shot `qpeer ping`") && out.contains(&ping.pid().to_string()),
        "{code} {out}\n{err}"
    );
    let (code, out, _) = run(&seen, &["status", "--json", "--home", &hs])?;
    let object: Value = serde_json::from_str(out.trim()).with_context(|| out.clone())?;
    ensure!(code == 0 && object["state"] == "one-shot" && object["pid"] == ping.pid(), "{out}");
    // Another command on that home cannot share its node, and is told what runs there.
    let (code, _, err) = run(&seen, &["peers", "--home", &hs, "--tracker", &t])?;
    ensure!(code == 1 && err.contains("one-shot `qpeer ping`"), "{code} {err}");
    ping.kill();
    seen.add(&ping.stdout.text());
    seen.add(&ping.stderr.text());

    // A one-shot send of a few MiB through the relay: plain progress lines on a pipe on the
    // receiving side too, and summaries on both.
    let file = dir.path().join("big.bin");
    let data: Vec<u8> = (0..24u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&file, &data)?;
    let file_arg = file.display().to_string();
    let send_args =
        ["send", &r_id, &file_arg, "--home", &hs, "--tracker", &t, "--bind", "127.0.0.1:0", "--relay-only"];
    let mut sender = qpeer_with(&send_args, &[])?;
    // While it runs, both homes' status show it with bytes so far (the receiver's through its
    // listener, the sender's from the one-shot status file).
    let started = Instant::now();
    let (mut seen_receiving, mut seen_sending) = (false, false);
    while sender.child.try_wait()?.is_none() && started.elapsed() < Duration::from_secs(60) {
        let (_, out, _) = run(&seen, &["status", "--home", &hr])?;
        seen_receiving |= out.contains(&format!("receiving from {s_id}: ")) && out.contains(" bytes)");
        let (_, out, _) = run(&seen, &["status", "--home", &hs])?;
        seen_sending |= out.contains(&format!("sending to {r_id}: "));
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = started.elapsed();
    eprintln!(
        "the send took {took:?}; status showed it receiving: {seen_receiving}, sending: {seen_sending}"
    );
    let code = sender.wait(Duration::from_secs(60))?;
    let (out, err) = (sender.stdout.text(), sender.stderr.text());
    seen.add(&out);
    seen.add(&err);
    ensure!(code == 0, "send: {out}\n{err}");
    if took > Duration::from_secs(3) {
        ensure!(
            seen_receiving && seen_sending,
            "status showed no transfer ({seen_receiving}, {seen_sending})"
        );
    }
    let sent = out.lines().find(|l| l.starts_with("[SENT] 1 files")).context("no [SENT] line")?;
    ensure!(sent.contains(" in ") && sent.contains("/s"), "{sent}");
    ensure!(std::fs::read(inbox.join("big.bin"))? == data, "the file differs");
    receiver.stdout.wait_for(Duration::from_secs(10), |l| l.starts_with("[DONE] from "))?;
    let received = receiver.stdout.text();
    for line in received.lines().filter(|l| l.starts_with("[PROGRESS]")) {
        ensure!(line.starts_with("[PROGRESS] from ") && line.contains('%'), "{line}");
        let percent: f64 =
            line.split('(').nth(1).and_then(|r| r.split('%').next()).context(line.to_string())?.parse()?;
        ensure!(percent <= 100.0, "{line}");
    }
    seen.add(&received);
    seen.add(&receiver.stderr.text());
    ensure!(
        !home_s.join("oneshot.json").exists(),
        "a one-shot command's status file is removed when it ends"
    );
    seen.check_no_ansi()
}

#[test]
fn a_sent_tree_keeps_modes_times_and_inner_links_and_the_allowlist_reloads() -> Result<()> {
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::time::{SystemTime, UNIX_EPOCH};

    let seen = Seen::default();
    let dir = tempfile::tempdir()?;
    let tracker = TrackerProc::start(&dir.path().join("trk"), "127.0.0.1:0", &[])?;
    let t = tracker.tracker.to_string();
    let (home_a, home_b) = (dir.path().join("a"), dir.path().join("b"));
    let ha = home_a.display().to_string();
    let inbox = dir.path().join("inbox");
    let (a_id, _) = (id_of(&seen, &home_a)?, id_of(&seen, &home_b)?);
    // B allows nobody yet: its allowlist is empty.
    let b = listen(&home_b, &t, &["--out", &inbox.display().to_string()])?;

    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("bin"))?;
    let script = tree.join("bin/run.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n")?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    let when = UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    std::fs::File::options().write(true).open(&script)?.set_modified(when)?;
    let private = tree.join("notes.txt");
    std::fs::write(&private, "mine")?;
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o640))?;
    symlink("bin/run.sh", tree.join("run"))?;
    symlink("../../etc/passwd", tree.join("escape"))?;
    let send =
        ["send", "--home", &ha, "--tracker", &t, &b_prefix(&home_b, &seen)?, &tree.display().to_string()];

    let (code, out, err) = run(&seen, &send)?;
    ensure!(code == 1 && !inbox.join("tree").exists(), "a sender not allowed yet: {code}\n{out}\n{err}");
    // Allowed by editing the allowlist while B runs: no restart.
    std::fs::write(home_b.join("allowlist"), format!("# alice\n{a_id}\n"))?;
    let started = SystemTime::now();
    let (code, out, err) = run(&seen, &send)?;
    ensure!(code == 0, "send after the allowlist changed: {out}\n{err}");
    ensure!(started.elapsed()? < Duration::from_secs(30), "slow send");

    let got = inbox.join("tree");
    let mode = |p: &Path| -> Result<u32> { Ok(std::fs::metadata(p)?.permissions().mode() & 0o7777) };
    ensure!(mode(&got.join("bin/run.sh"))? == 0o755, "mode {:o}", mode(&got.join("bin/run.sh"))?);
    ensure!(mode(&got.join("notes.txt"))? == 0o640, "mode {:o}", mode(&got.join("notes.txt"))?);
    ensure!(std::fs::metadata(got.join("bin/run.sh"))?.modified()? == when, "the mtime was not kept");
    let link = got.join("run");
    ensure!(std::fs::symlink_metadata(&link)?.file_type().is_symlink(), "run is not a symlink");
    ensure!(std::fs::read_link(&link)? == Path::new("bin/run.sh"), "{:?}", std::fs::read_link(&link)?);
    ensure!(std::fs::read_to_string(&link)? == "#!/bin/sh\necho hi\n", "the link does not resolve inside");
    ensure!(std::fs::symlink_metadata(got.join("escape")).is_err(), "an escaping link arrived");
    ensure!(out.contains("escape"), "the sender says it skipped the escaping link:\n{out}\n{err}");
    drop(b);
    seen.check_no_ansi()
}

/// B's id as an 8-character prefix, as a user copies it from a console line.
fn b_prefix(home: &Path, seen: &Seen) -> Result<String> {
    Ok(id_of(seen, home)?[..8].to_string())
}
