//! Kill -9 at any point and restart: nothing lost, nothing duplicated, same CA.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use control_plane::store::{SledStore, Store};
use keyway_tests::{Binary, TD, bin, workload_yaml};

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_issuance_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cp");
    let cp = Binary::spawn(&data, &[]);
    let bundle_before = cp.ok(&["bundle", "show", "--format", "jwks"]);
    let yaml = dir.path().join("w.yaml");
    std::fs::write(
        &yaml,
        [
            workload_yaml("frontend", "frontend", "node-a", "10.0.0.1"),
            workload_yaml("api", "api", "node-b", "10.0.0.2"),
        ]
        .join("---\n"),
    )
    .unwrap();
    cp.ok(&["apply", "-f", yaml.to_str().unwrap()]);
    let token = cp.ok(&["token", "create", "--node", "node-a"]).trim().to_owned();
    let ids_before = cp.ok(&["identity", "list", "-o", "json"]);

    // Issue in the background and kill the server mid-stream.
    let socket = cp.admin_socket.clone();
    let out = dir.path().join("mints");
    let acks = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let mut minters = Vec::new();
    for i in 0..4 {
        let (socket, acks, killed) = (socket.clone(), acks.clone(), killed.clone());
        let out = out.join(i.to_string());
        minters.push(std::thread::spawn(move || {
            let mut acknowledged = Vec::new();
            for n in 0..40 {
                let target = out.join(n.to_string());
                let r = Command::new(bin("control-plane"))
                    .args([
                        "x509",
                        "mint",
                        "--spiffe-id",
                        &format!("spiffe://{TD}/m/{i}/{n}"),
                        "--out",
                    ])
                    .arg(&target)
                    .env("KEYWAY_ADMIN_SOCKET", &socket)
                    .output()
                    .unwrap();
                if !r.status.success() {
                    assert!(
                        killed.load(Ordering::SeqCst),
                        "mint failed before the kill: {}",
                        String::from_utf8_lossy(&r.stderr)
                    );
                    break;
                }
                acknowledged.push(target);
                acks.fetch_add(1, Ordering::SeqCst);
            }
            acknowledged
        }));
    }
    // Kill once some issuance has been acknowledged (or all of it was).
    keyway_tests::wait_until(Duration::from_secs(60), "some acknowledged mints", || {
        acks.load(Ordering::SeqCst) >= 10 || minters.iter().all(|m| m.is_finished())
    });
    killed.store(true, Ordering::SeqCst);
    cp.kill9();
    let acknowledged: Vec<_> = minters.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert!(acknowledged.len() >= 10);

    // Restart: same CA, same identities, the token still unconsumed and
    // single-use; the admin socket is private.
    let cp = Binary::spawn(&data, &[]);
    let mode = std::fs::metadata(&cp.admin_socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin socket is owner-only");
    let data_mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(data_mode, 0o700, "data dir (CA keys) is owner-only");
    let bundle_after = cp.ok(&["bundle", "show", "--format", "jwks"]);
    assert_eq!(bundle_before, bundle_after, "same CA and JWT keys after kill -9");
    assert_eq!(
        ids_before,
        cp.ok(&["identity", "list", "-o", "json"]),
        "identities stable"
    );
    // Re-applying the same documents changes nothing and allocates nothing.
    let again = cp.ok(&["apply", "-f", yaml.to_str().unwrap()]);
    assert!(again.lines().all(|l| l.contains("unchanged")), "{again}");
    // The token created before the crash still works, once.
    let bundle_pem = dir.path().join("bundle.pem");
    std::fs::write(&bundle_pem, cp.ok(&["bundle", "show"])).unwrap();
    let attest = || {
        Command::new(bin("node-agent"))
            .args([
                "attest",
                "--server",
                &cp.listen,
                "--trust-domain",
                TD,
                "--node-name",
                "node-a",
            ])
            .arg("--trust-bundle")
            .arg(&bundle_pem)
            .env("KEYWAY_JOIN_TOKEN", &token)
            .output()
            .unwrap()
    };
    assert!(attest().status.success(), "an unconsumed token survives kill -9");
    assert!(!attest().status.success(), "and is still single-use");

    // Everything acknowledged is in the issuance log, exactly once (read
    // with the server stopped: sled allows one process at a time).
    cp.kill9();
    let store = SledStore::open(&data).unwrap();
    let log = store.issuance_log().await.unwrap();
    let serials: HashSet<_> = log.iter().map(|r| r.serial.clone()).collect();
    assert_eq!(serials.len(), log.len(), "no serial logged twice");
    for dir in &acknowledged {
        let pem = std::fs::read_to_string(dir.join("svid.pem")).unwrap();
        let der = keyway_identity::pem::decode_certs(&pem).unwrap().remove(0);
        let cert = keyway_identity::x509::parse(&der).unwrap();
        let serial: String = cert.raw_serial().iter().map(|b| format!("{b:02x}")).collect();
        assert!(
            serials.contains(&serial),
            "acknowledged SVID {} missing from the log",
            dir.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn consumed_join_tokens_stay_consumed_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cp");
    let cp = Binary::spawn(&data, &[]);
    let token = cp.ok(&["token", "create", "--node", "node-a"]).trim().to_owned();
    let bundle_pem = dir.path().join("bundle.pem");
    std::fs::write(&bundle_pem, cp.ok(&["bundle", "show"])).unwrap();
    let attest = |listen: &str| {
        Command::new(bin("node-agent"))
            .args([
                "attest",
                "--server",
                listen,
                "--trust-domain",
                TD,
                "--node-name",
                "node-a",
                "--trust-bundle",
            ])
            .arg(&bundle_pem)
            .env("KEYWAY_JOIN_TOKEN", &token)
            .output()
            .unwrap()
    };
    let first = attest(&cp.listen);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(String::from_utf8_lossy(&first.stdout).contains("/keyway/node/node-a"));
    cp.kill9();
    let cp = Binary::spawn(&data, &[]);
    let second = attest(&cp.listen);
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already used"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );

    // What was issued stays queryable after the restart: the node SVID
    // (asked for by node-a), and an operator's SVID minted now.
    let out = dir.path().join("minted");
    cp.ok(&[
        "x509",
        "mint",
        "--spiffe-id",
        &format!("spiffe://{TD}/ns/default/sa/ops"),
        "--out",
        out.to_str().unwrap(),
    ]);
    let listed: Vec<serde_json::Value> = cp
        .ok(&["issuance", "list", "-o", "json"])
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON record per line"))
        .collect();
    let mut ids: Vec<(&str, &str)> = listed
        .iter()
        .map(|r| (r["spiffe_id"].as_str().unwrap(), r["requester"].as_str().unwrap()))
        // The control plane's own serving SVIDs are logged too.
        .filter(|(_, requester)| *requester != "control-plane")
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![
            (format!("spiffe://{TD}/keyway/node/node-a").as_str(), "node-a"),
            (format!("spiffe://{TD}/ns/default/sa/ops").as_str(), "admin"),
        ],
    );
    // Newest first. Issuance times have a certificate's resolution, one
    // second, so records of the same second may come in either order.
    let issued: Vec<i64> = listed
        .iter()
        .map(|r| r["issued_at"].as_i64().expect("issued_at"))
        .collect();
    assert!(
        issued.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {issued:?}"
    );
    let node_only = cp.ok(&["issuance", "list", "--requester", "node-a", "-o", "json"]);
    assert_eq!(node_only.lines().count(), 1, "{node_only}");
    let none = cp.cli(&["issuance", "list", "--spiffe-id", "spiffe://nobody"]);
    assert!(none.status.success());
    assert!(
        String::from_utf8_lossy(&none.stderr).contains("0 shown, 0 matched"),
        "{}",
        String::from_utf8_lossy(&none.stderr)
    );
}

#[test]
fn cli_errors_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    // No server running.
    let r = Command::new(bin("control-plane"))
        .args(["identity", "list"])
        .env("KEYWAY_ADMIN_SOCKET", dir.path().join("nope.sock"))
        .output()
        .unwrap();
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("is `control-plane serve` running?"));
    // Bad flags name the flag.
    let r = Command::new(bin("control-plane"))
        .args(["serve", "--trust-domain", "Bad_Domain!", "--data-dir"])
        .arg(dir.path().join("x"))
        .output()
        .unwrap();
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("--trust-domain"));
    let cp = Binary::spawn(&dir.path().join("cp"), &[]);
    // A second server on the same data dir is refused, not corrupting the first.
    let r = Command::new(bin("control-plane"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&cp.data_dir)
        .output()
        .unwrap();
    assert!(!r.status.success());
    // Bad documents: nothing applied.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        workload_yaml("ok", "ok", "node-a", "10.0.0.1")
            + "---\n"
            + &workload_yaml("bad", "bad", "node-a", "10.0.0.300"),
    )
    .unwrap();
    let r = cp.cli(&["apply", "-f", bad.to_str().unwrap()]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("spec.ips[0]"));
    assert!(!cp.ok(&["identity", "list"]).contains("/sa/ok"), "all or nothing");
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() { dir_bytes(&e.path()) } else { m.len() }
        })
        .sum()
}

/// Simulated days of rotations: 500 identities renewed every 30 min with a
/// 1 h TTL, pruned every simulated 10 minutes as the leader does. Once the
/// window (TTL + the 1 h margin) is full, the log holds the same number of
/// records, and the sled directory stops growing: after four days it is
/// within sled's segment slack of its size after the first (it moves by a
/// few 512 KiB segments as sled reclaims them lazily; a log that kept
/// everything would be four times as big). Then the caps: count, then bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_issuance_log_keeps_its_window_and_stops_growing() {
    use control_plane::model::IssuanceRecord;
    use control_plane::store::IssuanceRetention;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sled");
    let store = SledStore::open(&data).unwrap();
    let keep = IssuanceRetention::default();
    let (identities, every, ttl) = (500, 1800, 3600);
    let day = 86_400;
    let start = 1_800_000_000;
    let mut serial = 0u64;
    let mut kept_at = Vec::new();
    let mut size_after_day = Vec::new();
    let days = 4;
    for now in (start..start + days * day).step_by(600) {
        if (now - start) % every == 0 {
            for i in 0..identities {
                serial += 1;
                store
                    .log_issuance(&IssuanceRecord {
                        serial: format!("{serial:040x}"),
                        spiffe_id: format!("spiffe://example.org/ns/default/sa/sa-{i}"),
                        requester: "node-a".into(),
                        ca_id: "3f2a9c0d1e7b4a55".into(),
                        issued_at: now,
                        not_after: now + ttl,
                    })
                    .await
                    .unwrap();
            }
        }
        let out = store.prune_issuance(&keep, now).await.unwrap();
        kept_at.push(out.kept);
        if (now - start + 600) % day == 0 {
            size_after_day.push(dir_bytes(&data));
        }
    }
    // Issued at now-2h+ε .. now: every record whose certificate expired less
    // than an hour ago, i.e. issued in the last 2 h: 4 renewals (5 just
    // after one) of every identity.
    let steady = &kept_at[kept_at.len() / 4..];
    assert!(
        steady
            .iter()
            .all(|&k| (4 * identities..=5 * identities).contains(&k)),
        "records kept once the window is full: {:?}",
        &steady[..12]
    );
    assert_eq!(
        store.issuance_log().await.unwrap().len(),
        *kept_at.last().unwrap()
    );
    let (first, last) = (size_after_day[0], size_after_day[days as usize - 1]);
    println!(
        "issued {serial} records over {days} simulated days; kept {}..{}; sled directory by day: {size_after_day:?} B (last/first {:.2})",
        steady.iter().min().unwrap(),
        steady.iter().max().unwrap(),
        last as f64 / first as f64
    );
    assert!(
        last as f64 <= first as f64 * 2.0,
        "the sled directory keeps growing at steady state: {size_after_day:?} B after each day"
    );

    // The caps: the records that expire first go first.
    let now = start + days * day;
    let out = store
        .prune_issuance(
            &IssuanceRetention {
                max_records: 1000,
                ..keep
            },
            now,
        )
        .await
        .unwrap();
    assert_eq!(out.kept, 1000);
    let log = store.issuance_log().await.unwrap();
    let oldest_kept = log.iter().map(|r| r.not_after).min().unwrap();
    assert!(
        oldest_kept >= now - 1800,
        "the newest renewals stay: {oldest_kept}"
    );
    let one = out.kept_bytes / out.kept;
    let out = store
        .prune_issuance(
            &IssuanceRetention {
                max_bytes: 100 * one,
                ..keep
            },
            now,
        )
        .await
        .unwrap();
    assert!(out.kept_bytes <= 100 * one && out.kept >= 99, "{out:?}");
}

/// The `Store` contract (tests/support/store_contract.rs), on the sled store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_contract_holds_for_the_sled_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    keyway_tests::store_contract::run(&store).await;
}
