//! The `qpeer-certs` binary: id, ca, issue, show.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn certs(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qpeer-certs")).args(args).output().expect("run qpeer-certs")
}

fn text(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn ca_issue_and_show() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = dir.path().join("ca");
    let tracker = dir.path().join("tracker");
    let path = |p: &std::path::Path| p.display().to_string();

    assert!(certs(&["ca", "--out", &path(&ca)]).status.success());
    let key_mode = std::fs::metadata(ca.join("ca.key")).expect("ca.key").permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600);
    let again = certs(&["ca", "--out", &path(&ca)]);
    assert!(!again.status.success(), "an existing CA is never overwritten");

    let issued = certs(&[
        "issue",
        "--ca",
        &path(&ca),
        "--name",
        "tracker.test",
        "--ip",
        "127.0.0.1",
        "--out",
        &path(&tracker),
    ]);
    assert!(issued.status.success(), "{}", String::from_utf8_lossy(&issued.stderr));
    assert_eq!(std::fs::metadata(tracker.join("key.pem")).expect("key").permissions().mode() & 0o777, 0o600);

    let shown = text(&certs(&["show", &path(&tracker.join("cert.pem"))]));
    assert!(shown.contains("subject:    CN=tracker.test"), "{shown}");
    assert!(shown.contains("issuer:     CN=qpeer dev CA"), "{shown}");
    assert!(shown.contains("key type:   ECDSA"), "{shown}");
    assert!(shown.contains("not after:"), "{shown}");
    assert!(shown.contains("sha256:"), "{shown}");

    let home = dir.path().join("home");
    let id = text(&certs(&["id", "--home", &path(&home)])).trim().to_string();
    assert_eq!(id.len(), 64);
    let key = text(&certs(&["show", &path(&home.join("identity.key"))]));
    assert!(key.contains(&format!("node id:  {id}")), "{key}");
}
