//! The `qpeer` binary's identity handling.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn qpeer_id(home: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qpeer"))
        .arg("id")
        .env("QPEER_HOME", home)
        .output()
        .expect("run qpeer id")
}

fn last_line(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).lines().last().unwrap_or_default().to_string()
}

#[test]
fn qpeer_id_is_stable_per_home_and_refuses_an_open_key() {
    let home = tempfile::tempdir().expect("home");
    let other = tempfile::tempdir().expect("home");
    let first = qpeer_id(home.path());
    let again = qpeer_id(home.path());
    assert!(first.status.success() && again.status.success());
    let id = last_line(&first);
    assert_eq!(id.len(), 64, "{id}");
    assert!(id.parse::<qpeer_certs::NodeId>().is_ok());
    assert_eq!(id, last_line(&again), "same home, same id");
    assert_ne!(id, last_line(&qpeer_id(other.path())), "another home, another id");

    let key = home.path().join("identity.key");
    let before = std::fs::read(&key).expect("key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let refused = qpeer_id(home.path());
    assert!(!refused.status.success(), "a 0644 key must be refused");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("chmod 600"), "{stderr}");
    assert_eq!(std::fs::read(&key).expect("key"), before, "the key file is untouched");
}

#[test]
fn a_corrupt_key_is_refused_without_touching_it() {
    let home = tempfile::tempdir().expect("home");
    let key = home.path().join("identity.key");
    std::fs::write(&key, b"not a key").expect("write");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let out = qpeer_id(home.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("corrupt"));
    assert_eq!(std::fs::read(&key).expect("key"), b"not a key");
}

#[test]
fn send_refuses_a_missing_tracker_clearly() {
    let home = tempfile::tempdir().expect("home");
    let file = home.path().join("f");
    std::fs::write(&file, b"x").expect("write");
    let peer = "a".repeat(64);
    let out = Command::new(env!("CARGO_BIN_EXE_qpeer"))
        .args(["send", &peer])
        .arg(&file)
        .env("QPEER_HOME", home.path())
        .env_remove("QPEER_TRACKER")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--tracker"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
