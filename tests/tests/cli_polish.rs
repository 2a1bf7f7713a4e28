//! The command line as a person meets it, with the real `qpeer` and `qpeer-tracker` binaries:
//! versions, completions, the man page, examples in `--help`, usage errors (exit 2, one
//! line), runtime errors on one line without `Caused by` or a backtrace, no ANSI escapes when
//! output is not a terminal, and SIGINT/SIGTERM stopping `send` (130/143, with a line saying
//! how to resume, and the rerun resuming) and `listen`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use qpeer_tests::lab::bin_dir;
use qpeer_tests::procs::{Proc, TrackerProc};

fn start(program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
    let mut command = std::process::Command::new(bin_dir()?.join(program));
    command.args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    Proc::spawn(command).with_context(|| format!("cannot start {program}"))
}

/// Runs a command to completion: (exit code, stdout, stderr).
fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<(i32, String, String)> {
    let mut proc = start(program, args, env)?;
    let code = proc.wait(Duration::from_secs(60))?;
    Ok((code, proc.stdout.text(), proc.stderr.text()))
}

fn qpeer(args: &[&str]) -> Result<(i32, String, String)> {
    run("qpeer", args, &[])
}

fn no_ansi(what: &str, text: &str) -> Result<()> {
    ensure!(!text.contains('\x1b'), "{what}: an ANSI escape in output that is not a terminal:\n{text:?}");
    Ok(())
}

/// Exactly one `error:` line, no cause chain, no backtrace.
fn one_error_line(what: &str, stderr: &str) -> Result<()> {
    let errors = stderr.lines().filter(|l| l.starts_with("error:")).count();
    ensure!(errors == 1, "{what}: {errors} error lines:\n{stderr}");
    ensure!(
        !stderr.contains("Caused by") && !stderr.contains("backtrace") && !stderr.contains("Backtrace"),
        "{what}: a cause chain or backtrace:\n{stderr}"
    );
    no_ansi(what, stderr)
}

fn signal(proc: &Proc, name: &str) -> Result<()> {
    let status = std::process::Command::new("kill").args([name, &proc.pid().to_string()]).status()?;
    ensure!(status.success(), "kill {name} failed");
    Ok(())
}

fn id_of(home: &Path) -> Result<String> {
    let (code, out, err) = qpeer(&["id", "--home", &home.display().to_string()])?;
    ensure!(code == 0, "qpeer id: {err}");
    Ok(out.lines().last().context("no id")?.to_string())
}

/// `len` incompressible bytes (xorshift), so no layer makes the transfer faster than it is.
fn write_file(path: &Path, len: usize) -> Result<()> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(len);
    std::fs::write(path, bytes)?;
    Ok(())
}

#[test]
fn version_completions_man_and_examples() -> Result<()> {
    let (code, out, err) = qpeer(&["--version"])?;
    ensure!(code == 0, "{err}");
    let version = out.trim();
    let numbers = version.strip_prefix("qpeer ").context(format!("--version: {version}"))?;
    let mut parts = numbers.split('.');
    ensure!(
        parts.next().is_some_and(|p| p.parse::<u32>().is_ok())
            && parts.next().is_some_and(|p| p.parse::<u32>().is_ok()),
        "--version must match ^qpeer \\d+\\.\\d+: {version}"
    );
    let (code, out, _) = run("qpeer-tracker", &["--version"], &[])?;
    ensure!(code == 0 && out.starts_with("qpeer-tracker ") && out.len() < 40, "{out}");

    for (shell, marker) in [("bash", "complete -F"), ("zsh", "#compdef qpeer"), ("fish", "complete -c qpeer")]
    {
        let (code, out, err) = qpeer(&["completions", shell])?;
        ensure!(
            code == 0 && out.contains(marker) && out.contains("send"),
            "completions {shell}: {err}\n{out}"
        );
        no_ansi(shell, &out)?;
    }
    let (code, _, err) = qpeer(&["completions", "tcsh"])?;
    ensure!(code == 2, "an unknown shell is a usage error: {code} {err}");

    let (code, out, err) = qpeer(&["man"])?;
    ensure!(code == 0 && out.contains(".TH qpeer 1") && out.contains("listen"), "man: {err}\n{out}");
    let dir = tempfile::tempdir()?;
    let (code, _, err) = qpeer(&["man", "--dir", &dir.path().display().to_string()])?;
    ensure!(code == 0, "man --dir: {err}");
    for page in ["qpeer.1", "qpeer-send.1", "qpeer-listen.1"] {
        let text = std::fs::read_to_string(dir.path().join(page)).context(page)?;
        ensure!(text.contains(".TH"), "{page}: {text}");
    }

    for command in ["listen", "send", "ping", "peers", "status", "netcheck"] {
        let (code, out, err) = qpeer(&[command, "--help"])?;
        ensure!(code == 0, "{command} --help: {err}");
        let examples =
            out.split_once("Examples:").map(|(_, e)| e).context(format!("{command}: no examples"))?;
        ensure!(
            examples.lines().filter(|l| l.trim_start().starts_with("qpeer ")).count() >= 2,
            "{command}: fewer than 2 examples:\n{out}"
        );
        no_ansi(command, &out)?;
    }
    Ok(())
}

#[test]
fn usage_errors_exit_2_with_one_line() -> Result<()> {
    let id = "ab".repeat(32);
    for args in [
        vec!["ping", "-c", "0", &id],
        vec!["ping", "-i", "nan", &id],
        vec!["ping", "-i", "inf", &id],
        vec!["ping", "--interval=-1", &id],
        vec!["send", &id],
        vec!["frobnicate"],
    ] {
        let (code, out, err) = qpeer(&args)?;
        ensure!(code == 2, "{args:?}: exit {code}, want 2\n{out}\n{err}");
        one_error_line(&format!("{args:?}"), &err)?;
    }
    let (code, _, err) = run("qpeer-tracker", &["--frame-timeout", "nan"], &[])?;
    ensure!(code == 2, "qpeer-tracker --frame-timeout nan: {code}\n{err}");
    one_error_line("qpeer-tracker --frame-timeout nan", &err)
}

#[test]
fn runtime_errors_are_one_line_without_backtraces() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tracker = TrackerProc::start(&dir.path().join("trk"), "127.0.0.1:0", &[])?;
    let t = tracker.tracker.to_string();
    let backtrace = [("RUST_BACKTRACE", "1")];

    // A tracker on a busy port.
    let home = dir.path().join("trk2").display().to_string();
    let (code, out, err) = run("qpeer-tracker", &["--listen", &tracker.addr, "--home", &home], &backtrace)?;
    ensure!(code == 1, "busy port: {code}\n{out}\n{err}");
    one_error_line("qpeer-tracker on a busy port", &err)?;
    ensure!(err.matches("Address already in use").count() == 1, "{err}");

    // A node on a busy port.
    let home = dir.path().join("a").display().to_string();
    let (code, _, err) =
        run("qpeer", &["listen", "--home", &home, "--tracker", &t, "--bind", &tracker.addr], &backtrace)?;
    ensure!(code == 1, "{err}");
    one_error_line("qpeer listen on a busy port", &err)?;
    ensure!(err.matches("Address already in use").count() == 1, "{err}");

    // --out naming a file.
    let not_a_dir = dir.path().join("a-file");
    std::fs::write(&not_a_dir, b"x")?;
    let not_a_dir = not_a_dir.display().to_string();
    let (code, _, err) = run(
        "qpeer",
        &["listen", "--home", &home, "--tracker", &t, "--bind", "127.0.0.1:0", "--out", &not_a_dir],
        &backtrace,
    )?;
    ensure!(code == 1 || code == 2, "listen --out FILE: {code}\n{err}");
    one_error_line("listen --out FILE", &err)?;

    // A wrong pinned tracker id: said once, without colour codes.
    let wrong = format!("{}@{}", "0".repeat(63) + "1", tracker.addr);
    let (code, out, err) = run("qpeer", &["peers", "--home", &home, "--tracker", &wrong], &backtrace)?;
    ensure!(code == 1, "{err}");
    one_error_line("a wrong pinned tracker id", &err)?;
    ensure!(format!("{out}{err}").matches("was expected").count() == 1, "{out}\n{err}");
    no_ansi("a wrong pinned tracker id", &out)?;

    // A tracker that is down: reported within the register timeout (and a little).
    let silent = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let down = format!(
        "{}@{}",
        tracker.tracker.to_string().split('@').next().unwrap_or_default(),
        silent.local_addr()?
    );
    let started = Instant::now();
    let (code, out, err) =
        run("qpeer", &["peers", "--home", &home, "--tracker", &down, "--register-timeout", "2"], &backtrace)?;
    let took = started.elapsed();
    ensure!(code == 1, "{out}\n{err}");
    ensure!(took < Duration::from_millis(4000), "a down tracker took {took:?} with a 2 s timeout");
    one_error_line("a tracker that is down", &err)?;
    Ok(())
}

#[test]
fn interrupted_send_resumes_and_listen_stops_cleanly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // A slow relay, so that the send is still running when interrupted.
    let tracker =
        TrackerProc::start(&dir.path().join("trk"), "127.0.0.1:0", &["--relay-bytes-per-sec", "3000000"])?;
    let t = tracker.tracker.to_string();
    let (home_r, home_s) = (dir.path().join("r"), dir.path().join("s"));
    let inbox = dir.path().join("inbox");
    let (hr, hs, out_dir) =
        (home_r.display().to_string(), home_s.display().to_string(), inbox.display().to_string());
    let mut receiver = start(
        "qpeer",
        &[
            "listen",
            "--home",
            &hr,
            "--tracker",
            &t,
            "--bind",
            "127.0.0.1:0",
            "--out",
            &out_dir,
            "--accept-any",
        ],
        &[],
    )?;
    receiver.stdout.wait_for(Duration::from_secs(15), |l| l.starts_with("[LISTENING]"))?;
    let receiver_id = id_of(&home_r)?;
    let file = dir.path().join("big.bin");
    write_file(&file, 48 << 20)?;
    let file_arg = file.display().to_string();
    let relayed = [
        "send",
        "--home",
        &hs,
        "--tracker",
        &t,
        "--bind",
        "127.0.0.1:0",
        "--relay-only",
        &receiver_id,
        &file_arg,
    ];

    for (name, code) in [("-INT", 130), ("-TERM", 143)] {
        let mut sender = start("qpeer", &relayed, &[])?;
        // Interrupted once it has carried something (the .part grew by 2 MiB).
        let part = inbox.join("big.bin.part");
        let before = std::fs::metadata(&part).map_or(0, |m| m.len());
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::fs::metadata(&part).map_or(0, |m| m.len()) < before + (2 << 20) {
            ensure!(
                Instant::now() < deadline,
                "the send did not start:\n{}\n{}",
                sender.stdout.text(),
                sender.stderr.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        signal(&sender, name)?;
        let got = sender.wait(Duration::from_secs(15))?;
        let (out, err) = (sender.stdout.text(), sender.stderr.text());
        ensure!(got == code, "send after kill {name}: exit {got}, want {code}\n{out}\n{err}");
        let hints: Vec<&str> =
            err.lines().filter(|l| l.contains("run the same command again to resume")).collect();
        ensure!(
            hints.len() == 1 && hints[0].contains("qpeer send") && hints[0].contains(&receiver_id),
            "{err}"
        );
        ensure!(!err.contains("error:"), "a signal is not an error:\n{err}");
        no_ansi("interrupted send", &format!("{out}{err}"))?;
        ensure!(inbox.join("big.bin.part").exists(), "the receiver's .part must stay");
        ensure!(!inbox.join("big.bin").exists(), "the file cannot be whole yet");
    }

    // The rerun (direct this time, quicker) resumes and completes.
    let (code, out, err) =
        qpeer(&relayed.iter().copied().filter(|a| *a != "--relay-only").collect::<Vec<_>>())?;
    ensure!(code == 0, "rerun: {out}\n{err}");
    ensure!(out.contains("[RESUMED]"), "the rerun must say it resumed:\n{out}");
    ensure!(std::fs::read(inbox.join("big.bin"))? == std::fs::read(&file)?, "the received file differs");

    signal(&receiver, "-INT")?;
    let code = receiver.wait(Duration::from_secs(15))?;
    ensure!(code == 130, "listen after SIGINT: {code}\n{}", receiver.stderr.text());
    ensure!(receiver.stdout.text().contains("[STOPPED]"), "{}", receiver.stdout.text());
    no_ansi("listen", &format!("{}{}", receiver.stdout.text(), receiver.stderr.text()))?;

    let mut other =
        start("qpeer", &["listen", "--home", &hr, "--tracker", &t, "--bind", "127.0.0.1:0"], &[])?;
    other.stdout.wait_for(Duration::from_secs(15), |l| l.starts_with("[LISTENING]"))?;
    signal(&other, "-TERM")?;
    let code = other.wait(Duration::from_secs(15))?;
    ensure!(code == 143, "listen after SIGTERM: {code}\n{}", other.stderr.text());
    Ok(())
}
