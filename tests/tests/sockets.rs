//! Files and sockets that hold or guard secrets: created with their final
//! mode from the start, never by a chmod that follows a path someone else
//! can change; the CA key at rest is readable by its owner only.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn sockets_appear_with_their_final_mode_and_a_planted_symlink_is_replaced_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("secret");
    std::fs::write(&target, "keep me").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Someone who could write the directory planted a link where the socket goes.
    let path = dir.path().join("agent.sock");
    std::os::unix::fs::symlink(&target, &path).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let listener = keyway_serve::unix::bind(&path, 0o666, 0o755).expect("bind");
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(
        meta.file_type().is_socket(),
        "the link was replaced by the socket"
    );
    assert_eq!(mode(&path), 0o666);
    assert_eq!(
        mode(&target),
        0o600,
        "the link's target kept its mode (chmod did not follow it)"
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
    // No staging directory is left behind.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    // A live socket is never replaced.
    let err = keyway_serve::unix::bind(&path, 0o666, 0o755).unwrap_err();
    assert!(err.to_string().contains("already serving"), "{err}");
    drop(listener);
    // A stale one (nobody answers) is. The other test here spawns a process:
    // a fork that has not reached exec yet still holds the closed listener
    // (close-on-exec closes it only at exec), and it answers meanwhile.
    let mut stale = None;
    keyway_tests::wait_until(
        std::time::Duration::from_secs(10),
        "a stale socket is replaced",
        || {
            stale = keyway_serve::unix::bind(&path, 0o600, 0o755).ok();
            stale.is_some()
        },
    );
    assert_eq!(mode(&path), 0o600);
    // A directory it makes gets the mode asked for (admin sockets: 0700).
    let admin = dir.path().join("admin").join("agent-admin.sock");
    keyway_serve::unix::bind(&admin, 0o600, 0o700).expect("bind admin");
    assert_eq!(mode(admin.parent().unwrap()), 0o700);
    assert_eq!(mode(&admin), 0o600);
}

/// The CA key lives in the sled store in the data directory: every file
/// there is owner-only, including files an older version left 0644.
#[test]
fn the_ca_key_at_rest_is_readable_by_its_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cp");
    std::fs::create_dir_all(&data).unwrap();
    let old = data.join("left-by-an-older-version");
    std::fs::write(&old, "x").unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cp = keyway_tests::Binary::spawn(&data, &[]);
    // Issue something so the store writes.
    cp.ok(&["token", "create", "--node", "node-a"]);
    let mut files = Vec::new();
    let mut stack = vec![data.clone()];
    while let Some(d) = stack.pop() {
        assert_eq!(mode(&d) & 0o077, 0, "{} is {:o}", d.display(), mode(&d));
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                files.push(e.path());
            }
        }
    }
    assert!(files.len() >= 2, "the store wrote files: {files:?}");
    for f in &files {
        assert_eq!(mode(f) & 0o077, 0, "{} is {:o}", f.display(), mode(f));
    }
}

/// The chart runs the control plane as 65532 with its data directory on an
/// emptyDir: root's, mode 0777 (what the kubelet makes with an fsGroup). It
/// cannot chmod that directory; it must start anyway, and what it writes
/// there is still owner-only. (Found when the chart's pods first ran: the
/// control plane exited with "cannot restrict ... Operation not permitted".)
#[test]
fn a_non_root_control_plane_starts_on_an_empty_dir_it_does_not_own() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = dir.path().join("empty-dir");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
    let admin = data.join("admin.sock");
    let mut child = std::process::Command::new("setpriv")
        .args(["--reuid=65532", "--regid=65532", "--clear-groups", "--"])
        .arg(keyway_tests::bin("control-plane"))
        .args([
            "serve",
            "--trust-domain",
            keyway_tests::TD,
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&data)
        .arg("--admin-socket")
        .arg(&admin)
        .env("KEYWAY_METRICS_ADDRESS", "off")
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut exited = None;
    keyway_tests::wait_until(
        std::time::Duration::from_secs(30),
        "the control plane serves",
        || {
            exited = child.try_wait().unwrap();
            exited.is_some() || std::os::unix::net::UnixStream::connect(&admin).is_ok()
        },
    );
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(exited, None, "the control plane exited");
    assert_eq!(mode(&data), 0o777, "not ours: left as it was");
    let mut owned = 0;
    for e in std::fs::read_dir(&data).unwrap() {
        let e = e.unwrap();
        let meta = std::fs::symlink_metadata(e.path()).unwrap();
        if meta.is_file() || meta.is_dir() {
            assert_eq!(meta.uid(), 65532, "{}", e.path().display());
            assert_eq!(
                mode(&e.path()) & 0o077,
                0,
                "{} is {:o}",
                e.path().display(),
                mode(&e.path())
            );
            owned += 1;
        }
    }
    assert!(owned >= 1, "the store wrote into the data directory");
}
