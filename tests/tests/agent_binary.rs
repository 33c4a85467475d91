//! The real `node-agent` binary: `run`, `svid fetch --write` feeding openssl's
//! s_server/s_client mTLS handshake, `healthcheck`, and caller attestation by
//! network namespace (privileged: needs root, which CI has).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keyway_tests::{AgentBinary, Binary, TD, bin, wait_until};

fn start_agent(cp: &Binary, dir: &Path, node: &str) -> AgentBinary {
    AgentBinary::spawn(cp, dir, node, &[])
}

fn apply(cp: &Binary, dir: &Path, yaml: &str) {
    let f = dir.join(format!("doc-{}.yaml", yaml.len()));
    std::fs::write(&f, yaml).unwrap();
    cp.ok(&["apply", "-f", f.to_str().unwrap()]);
}

fn fetch(socket: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(bin("node-agent"))
        .args(["svid", "fetch", "--socket"])
        .arg(socket)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn svid_fetch_write_gives_files_openssl_uses_for_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let cp = Binary::spawn(&dir.path().join("cp"), &[]);
    apply(
        &cp,
        dir.path(),
        &keyway_tests::workload_for_me("web", "web", "node-a", None),
    );
    let agent = start_agent(&cp, dir.path(), "node-a");
    let out = dir.path().join("files");
    let mut fetched = fetch(&agent.socket, &["--write", out.to_str().unwrap(), "-o", "json"]);
    wait_until(Duration::from_secs(20), "an SVID for the caller", || {
        if fetched.status.success() {
            return true;
        }
        fetched = fetch(&agent.socket, &["--write", out.to_str().unwrap(), "-o", "json"]);
        false
    });
    let line: serde_json::Value = serde_json::from_slice(&fetched.stdout).unwrap();
    assert_eq!(line["spiffe_id"], format!("spiffe://{TD}/ns/default/sa/web"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(out.join("key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // openssl s_server requiring a client certificate, s_client presenting one.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let f = |n: &str| out.join(n).to_str().unwrap().to_owned();
    let mut server = Command::new("openssl")
        .args([
            "s_server",
            "-accept",
            &format!("127.0.0.1:{port}"),
            "-naccept",
            "1",
            "-www",
            "-Verify",
            "1",
        ])
        .args([
            "-verify_return_error",
            "-cert",
            &f("svid.pem"),
            "-key",
            &f("key.pem"),
            "-CAfile",
            &f("bundle.pem"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // s_server prints ACCEPT once it listens (a probe connection would use
    // up its single accept).
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(server.stdout.take().unwrap()));
    let ready = lines
        .by_ref()
        .take(5)
        .map_while(Result::ok)
        .any(|l| l.contains("ACCEPT"));
    assert!(ready, "s_server did not start");
    let client = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | openssl s_client -connect 127.0.0.1:{port} -brief -ign_eof -verify_return_error \
             -cert {} -key {} -CAfile {} 2>&1",
            f("svid.pem"),
            f("key.pem"),
            f("bundle.pem")
        ))
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let text = String::from_utf8_lossy(&client.stdout);
    assert!(
        text.contains("Verification: OK"),
        "s_client verified the server: {text}"
    );
    assert!(
        text.contains("TLSv1.3") || text.contains("Protocol version"),
        "{text}"
    );
    assert!(
        text.contains("HTTP/1.0 200 ok"),
        "the mTLS session carried a request: {text}"
    );
}

/// A network namespace for the test, removed by name on drop (even on failure).
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Self {
        assert!(
            nix_is_root(),
            "this privileged test needs root (CI runs as root); it does not skip"
        );
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {name}");
        Netns(name.to_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

#[test]
fn ep10_callers_are_recognised_by_network_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new(&format!("kwt-{}", std::process::id()));
    let cp = Binary::spawn(&dir.path().join("cp"), &[]);
    apply(
        &cp,
        dir.path(),
        &format!(
            "apiVersion: keyway.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: pod, namespace: default }}\n\
             spec:\n  serviceAccount: pod\n  node: node-a\n  selectors: [\"netns:{}\"]\n",
            ns.0
        ),
    );
    let agent = start_agent(&cp, dir.path(), "node-a");
    // From inside the namespace: the SVID of the Workload that names it.
    let inside = || {
        Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(bin("node-agent"))
            .args(["svid", "fetch", "-o", "json", "--socket"])
            .arg(&agent.socket)
            .output()
            .unwrap()
    };
    let mut out = inside();
    wait_until(Duration::from_secs(20), "SVID inside the namespace", || {
        if out.status.success() {
            return true;
        }
        out = inside();
        false
    });
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["spiffe_id"], format!("spiffe://{TD}/ns/default/sa/pod"));
    // From the host namespace: denied, with the reason.
    let host = fetch(&agent.socket, &[]);
    assert!(!host.status.success());
    let err = String::from_utf8_lossy(&host.stderr);
    assert!(err.contains("no identity issued"), "{err}");
}

async fn uds_client(
    socket: &Path,
) -> proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<tonic::transport::Channel> {
    keyway_tests::raw_workload_client(socket).await.unwrap()
}

fn request() -> tonic::Request<proto::workload::X509svidRequest> {
    keyway_tests::with_security_header(proto::workload::X509svidRequest {})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_unread_streams_neither_stall_others_nor_grow_agent_memory() {
    let dir = tempfile::tempdir().unwrap();
    let cp = Binary::spawn(&dir.path().join("cp"), &["--ca-ttl", "60s"]);
    apply(
        &cp,
        dir.path(),
        &keyway_tests::workload_for_me("web", "web", "node-a", Some("3s")),
    );
    let agent = start_agent(&cp, dir.path(), "node-a");
    // A reader that sees every rotation.
    let mut watcher = uds_client(&agent.socket)
        .await
        .fetch_x509svid(request())
        .await
        .unwrap()
        .into_inner();
    watcher.message().await.unwrap().unwrap();
    // 1000 streams over 10 connections, opened and never read.
    let mut held = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..10 {
        let mut c = uds_client(&agent.socket).await;
        for _ in 0..100 {
            held.push(c.fetch_x509svid(request()).await.unwrap().into_inner());
        }
        clients.push(c);
    }
    let pid = agent.child.id();
    let before = keyway_tests::rss_kib(pid);
    // Four rotations (3s SVIDs renew about every 1.5s) while nobody reads.
    for _ in 0..4 {
        tokio::time::timeout(Duration::from_secs(15), watcher.message())
            .await
            .expect("rotation")
            .unwrap()
            .unwrap();
    }
    let after = keyway_tests::rss_kib(pid);
    // A well-behaved client is served at once.
    let mut fresh = uds_client(&agent.socket).await;
    let mut s = fresh.fetch_x509svid(request()).await.unwrap().into_inner();
    tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("not stalled by the unread streams")
        .unwrap()
        .unwrap();
    let growth_mib = after.saturating_sub(before) / 1024;
    assert!(
        growth_mib < 16,
        "agent RSS grew {growth_mib} MiB over four rotations with 1000 unread streams"
    );
    drop((held, clients));
}

/// The README's example Workload: `selectors: ["netns:frontend",
/// "unix:uid:1000"]`. Every selector must match (SPIRE's rule): uid 1000 in
/// the namespace gets the SVID; uid 1000 elsewhere, or another uid in the
/// namespace, gets PermissionDenied. (Any one selector used to be enough,
/// which handed frontend's key to every uid-1000 process on the node.)
#[test]
fn wl_selectors_all_match_as_in_the_readme_example() {
    let dir = tempfile::tempdir().unwrap();
    // uid 1000 must reach the socket.
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let ns = Netns::new(&format!("kwf-{}", std::process::id()));
    let cp = Binary::spawn(&dir.path().join("cp"), &[]);
    apply(
        &cp,
        dir.path(),
        &format!(
            "apiVersion: keyway.dev/v1alpha1\nkind: Workload\n\
             metadata: {{ name: frontend, namespace: default, labels: {{ app: frontend }} }}\n\
             spec:\n  serviceAccount: frontend\n  node: node-a\n  ips: [\"10.244.1.10\"]\n  \
             selectors: [\"netns:{}\", \"unix:uid:1000\"]\n",
            ns.0
        ),
    );
    let agent = start_agent(&cp, dir.path(), "node-a");
    let fetch_as = |uid: u32, in_ns: bool| agent.fetch_svid_as(uid, in_ns.then_some(ns.0.as_str()));
    let mut ok = fetch_as(1000, true);
    wait_until(
        Duration::from_secs(20),
        "uid 1000 in the namespace gets the SVID",
        || {
            if ok.status.success() {
                return true;
            }
            ok = fetch_as(1000, true);
            false
        },
    );
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(v["spiffe_id"], format!("spiffe://{TD}/ns/default/sa/frontend"));
    for (uid, in_ns, who) in [
        (1000, false, "uid 1000 in the host namespace"),
        (0, true, "uid 0 in the namespace"),
    ] {
        let out = fetch_as(uid, in_ns);
        assert!(!out.status.success(), "{who} must not get frontend's SVID");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no identity issued"), "{who}: {err}");
    }
}

/// Receives one file descriptor sent with SCM_RIGHTS on `sock`.
fn recv_fd(sock: &std::os::unix::net::UnixStream) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut cmsg = [0u64; 8];
    #[allow(unsafe_code, reason = "SCM_RIGHTS has no std equivalent")]
    // SAFETY: the buffers outlive the call; the header points into them.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg);
        let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, 0);
        assert!(n >= 0, "recvmsg: {}", std::io::Error::last_os_error());
        let c = libc::CMSG_FIRSTHDR(&msg);
        assert!(
            !c.is_null() && (*c).cmsg_type == libc::SCM_RIGHTS,
            "no fd received"
        );
        let fd = *(libc::CMSG_DATA(c) as *const libc::c_int);
        std::os::fd::OwnedFd::from_raw_fd(fd)
    }
}

/// Starts a process with pid `pid` inside network namespace `ns` (root:
/// `/proc/sys/kernel/ns_last_pid`), retrying while other processes race for
/// it. Returns `None` if the pid could not be had.
fn spawn_with_pid(pid: u32, ns: &str) -> Option<Child> {
    for _ in 0..200 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let mut c = Command::new("ip")
            .args(["netns", "exec", ns, "sleep", "120"])
            .spawn()
            .unwrap();
        if c.id() == pid {
            return Some(c);
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    None
}

/// PID reuse: a process connects to the Workload API, hands the connection
/// to another process and exits, and its pid is given to a process in the
/// victim's network namespace. The caller is identified once, at connect,
/// and pinned by a pidfd (SO_PEERPIDFD): the handed-over connection gets
/// PermissionDenied, never the victim's SVID and key. (When the agent read
/// `/proc/<pid>` on every call, this handed out the victim's identity.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ep10_a_handed_over_connection_and_a_reused_pid_get_permission_denied() {
    let dir = tempfile::tempdir().unwrap();
    let victim_ns = Netns::new(&format!("kwv-{}", std::process::id()));
    let attacker_ns = Netns::new(&format!("kwa-{}", std::process::id()));
    let cp = Binary::spawn(&dir.path().join("cp"), &[]);
    apply(
        &cp,
        dir.path(),
        &format!(
            "apiVersion: keyway.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: victim, namespace: default }}\n\
             spec:\n  serviceAccount: victim\n  node: node-a\n  selectors: [\"netns:{}\"]\n",
            victim_ns.0
        ),
    );
    let agent = start_agent(&cp, dir.path(), "node-a");

    // The attacker: connect from its own namespace, pass the connection on
    // (SCM_RIGHTS), wait to be told, exit.
    let handoff_path = dir.path().join("handoff.sock");
    let handoff = std::os::unix::net::UnixListener::bind(&handoff_path).unwrap();
    let script = format!(
        "import socket,sys\n\
         s=socket.socket(socket.AF_UNIX); s.connect({agent:?})\n\
         h=socket.socket(socket.AF_UNIX); h.connect({handoff:?})\n\
         socket.send_fds(h,[b'x'],[s.fileno()])\n\
         h.recv(1)\n",
        agent = agent.socket.to_str().unwrap(),
        handoff = handoff_path.to_str().unwrap(),
    );
    let mut attacker = Command::new("ip")
        .args(["netns", "exec", &attacker_ns.0, "python3", "-c", &script])
        .spawn()
        .unwrap();
    let attacker_pid = attacker.id();
    let (control, _) = handoff.accept().unwrap();
    let fd = recv_fd(&control);
    let stream = std::os::unix::net::UnixStream::from(fd);
    stream.set_nonblocking(true).unwrap();
    let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(
        tokio::net::UnixStream::from_std(stream).unwrap(),
    )));
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let s = slot.lock().unwrap().take();
            async move {
                s.map(hyper_util::rt::TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the handed-over connection is used once"))
            }
        }))
        .await
        .unwrap();
    let mut client = proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
    let ask = |c: &mut proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<_>| {
        let mut c = c.clone();
        async move {
            match c.fetch_x509svid(request()).await {
                Ok(r) => Ok(r.into_inner().message().await),
                Err(s) => Err(s),
            }
        }
    };
    // While the attacker lives: it is itself, with no identity.
    let err = ask(&mut client).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    // The attacker exits; its pid goes to a process in the victim's namespace.
    std::io::Write::write_all(&mut &control, b"x").unwrap();
    attacker.wait().unwrap();
    let mut reused = spawn_with_pid(attacker_pid, &victim_ns.0)
        .unwrap_or_else(|| panic!("could not get pid {attacker_pid} reused"));
    // The victim itself is served: its SVID exists.
    let victim_fetch = || {
        Command::new("ip")
            .args(["netns", "exec", &victim_ns.0])
            .arg(bin("node-agent"))
            .args(["svid", "fetch", "-o", "json", "--socket"])
            .arg(&agent.socket)
            .output()
            .unwrap()
    };
    let mut v = victim_fetch();
    wait_until(Duration::from_secs(20), "the victim's SVID", || {
        if v.status.success() {
            return true;
        }
        v = victim_fetch();
        false
    });
    // The handed-over connection, whose connecting pid now names a process
    // in the victim's namespace, is refused.
    let err = match ask(&mut client).await {
        Err(e) => e,
        Ok(r) => panic!(
            "the handed-over connection was given {:?} (SVIDs and keys)",
            r.ok()
                .flatten()
                .map(|r| r.svids.into_iter().map(|s| s.spiffe_id).collect::<Vec<_>>())
        ),
    };
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("has exited"), "{}", err.message());
    let _ = reused.kill();
    let _ = reused.wait();
}
