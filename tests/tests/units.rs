//! The systemd units run what they say: each unit's `ExecStart` line, as written (with `%h`
//! and the binary's install path replaced by a test home and the built binary), starts a
//! working service, and stopping it with SIGTERM (what `systemctl stop` sends) ends it with an
//! exit code the unit counts as success. `systemd-analyze verify` checks the files too where
//! systemd is installed (the test says when it is not).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use qpeer_tests::lab::bin_dir;
use qpeer_tests::procs::{Proc, TrackerProc};

/// The `[Service]` settings of a unit file (the last value of each key).
fn service(unit: &Path) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(unit).with_context(|| format!("cannot read {}", unit.display()))?;
    let mut in_service = false;
    let mut keys = HashMap::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.starts_with('#') {
            if let Some((key, value)) = line.split_once('=') {
                keys.insert(key.trim().to_string(), value.trim().to_string());
            }
        }
    }
    Ok(keys)
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The unit's ExecStart as a command: `%h` is `home`, the program is the built binary.
fn exec_start(unit: &HashMap<String, String>, home: &Path) -> Result<Command> {
    let line = unit.get("ExecStart").context("no ExecStart")?;
    let mut words = line.split_whitespace().map(|w| w.replace("%h", &home.display().to_string()));
    let program = words.next().context("an empty ExecStart")?;
    let name = Path::new(&program).file_name().context("no program name")?;
    let mut command = Command::new(bin_dir()?.join(name));
    command.args(words).env("HOME", home).env_remove("QPEER_HOME").env_remove("QPEER_TRACKER");
    Ok(command)
}

fn sigterm(proc: &Proc) -> Result<()> {
    let status = Command::new("kill").args(["-TERM", &proc.pid().to_string()]).status()?;
    ensure!(status.success(), "kill -TERM failed");
    Ok(())
}

fn success_codes(unit: &HashMap<String, String>) -> Vec<i32> {
    let mut codes = vec![0];
    if let Some(list) = unit.get("SuccessExitStatus") {
        codes.extend(list.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
    }
    codes
}

fn verify_with_systemd(unit: &Path) -> Result<()> {
    match Command::new("systemd-analyze").arg("--version").output() {
        Ok(out) if out.status.success() => {}
        _ => {
            eprintln!("systemd-analyze is not installed here: {} checked by running it only", unit.display());
            return Ok(());
        }
    }
    // The binary the unit names need not exist here; everything else must be clean.
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(unit).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let problems: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains("is not executable") && !l.contains("No such file") && !l.trim().is_empty())
        .collect();
    ensure!(problems.is_empty(), "systemd-analyze verify {}:\n{}", unit.display(), problems.join("\n"));
    Ok(())
}

#[test]
fn the_listen_user_unit_starts_a_node_and_stops_cleanly() -> Result<()> {
    let path = repo("node/systemd/qpeer-listen.service");
    verify_with_systemd(&path)?;
    let unit = service(&path)?;
    let dir = tempfile::tempdir()?;
    let tracker = TrackerProc::start(&dir.path().join("trk"), "127.0.0.1:0", &[])?;
    let home = dir.path().join("user");
    std::fs::create_dir_all(&home)?;
    // What EnvironmentFile=%h/.config/qpeer/env would hold.
    ensure!(unit.get("EnvironmentFile").is_some_and(|f| f.contains("%h/.config/qpeer/env")), "{unit:?}");
    let mut command = exec_start(&unit, &home)?;
    command.env("QPEER_TRACKER", tracker.tracker.to_string());
    let mut node = Proc::spawn(command)?;
    node.stdout.wait_for(Duration::from_secs(15), |l| l.starts_with("[LISTENING]")).with_context(|| {
        format!("the unit's command did not start:\n{}\n{}", node.stdout.text(), node.stderr.text())
    })?;
    ensure!(home.join("inbox").is_dir(), "--out %h/inbox was not made");
    ensure!(home.join(".local/share/qpeer/identity.key").is_file(), "the node's home is not the default one");
    sigterm(&node)?;
    let code = node.wait(Duration::from_secs(15))?;
    ensure!(success_codes(&unit).contains(&code), "stopped with {code}, which the unit counts as a failure");
    Ok(())
}

#[test]
fn the_tracker_unit_starts_a_tracker_and_stops_cleanly() -> Result<()> {
    let path = repo("tracker/systemd/qpeer-tracker.service");
    verify_with_systemd(&path)?;
    let unit = service(&path)?;
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    // StateDirectory= makes /var/lib/qpeer-tracker; the test's own stands in for it.
    let line = unit
        .get("ExecStart")
        .context("no ExecStart")?
        .replace("/var/lib/qpeer-tracker", &state.display().to_string());
    let mut edited = unit.clone();
    edited.insert("ExecStart".into(), line);
    let mut tracker = Proc::spawn(exec_start(&edited, dir.path())?)?;
    let started = tracker.stdout.wait_for(Duration::from_secs(15), |l| l.starts_with("[TRACKER]"));
    if started.is_err() {
        let err = tracker.stderr.text();
        if err.contains("in use") {
            bail!("port 4433, which the unit listens on, is in use here: {err}");
        }
        bail!("the unit's command did not start:\n{}\n{err}", tracker.stdout.text());
    }
    ensure!(state.join("identity.key").is_file(), "the identity is not kept in the state directory");
    sigterm(&tracker)?;
    let code = tracker.wait(Duration::from_secs(15))?;
    ensure!(success_codes(&unit).contains(&code), "stopped with {code}");
    Ok(())
}
