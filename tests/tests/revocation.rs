//! Node revocation, performed as the thief would: node-a's key and SVID are
//! copied from its disk, the node is revoked (`control-plane node revoke`,
//! the standalone counterpart of deleting the Node), and the stolen SVID is
//! then refused for renewal and for everything else, its open Sync stream
//! ends, every other agent flushes the auth entries node-a vouched for, and
//! a node re-attested under the same name does not bring the stolen SVID
//! back. (Before, node records were never deleted: a stolen node key renewed
//! itself forever.)

use std::time::Duration;

use keyway_tests::mesh::MeshAgent;
use keyway_tests::{InProcess, MTLS_INGRESS, Options, bin, workload_yaml};
use node_agent::control_plane::{self, ClientError, ControlPlaneClient};
use proto::keyway as pb;
use tokio::sync::watch;
use tonic::Code;

async fn client_with(cp: &InProcess, svid: &keyway_identity::Svid) -> ControlPlaneClient {
    let (b, bundle) = watch::channel(cp.bundle());
    let (c, cert) = watch::channel(Some(svid.certified_key().unwrap()));
    std::mem::forget((b, c));
    ControlPlaneClient::connect(&cp.addr, bundle, cert)
        .await
        .expect("mTLS connect")
}

fn refused(e: ClientError) -> (Code, String) {
    match e {
        ClientError::Refused(s) => (s.code(), s.message().to_owned()),
        other => panic!("expected a refusal, got {other}"),
    }
}

fn revoke(cp: &InProcess, node: &str) -> std::process::Output {
    std::process::Command::new(bin("control-plane"))
        .args(["node", "revoke", node])
        .env("KEYWAY_ADMIN_SOCKET", &cp.admin_socket)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_cannot_renew_loses_its_sync_and_its_peers_flush_its_entries() {
    let cp = InProcess::start(Options::default()).await;
    cp.apply(&format!(
        "{}---\n{}---\n{MTLS_INGRESS}",
        workload_yaml("frontend", "frontend", "node-a", "10.0.1.1"),
        workload_yaml("api", "api", "node-b", "10.0.2.1"),
    ))
    .await;
    let a = MeshAgent::start(&cp, "node-a").await;
    let b = MeshAgent::start(&cp, "node-b").await;
    let node_a = cp.cp.node("node-a").expect("node-a attested").node_id;
    b.wait_entries(
        "node-b authenticates frontend on node-a",
        Duration::from_secs(20),
        |e| e.iter().any(|r| r.key.remote_node_id == node_a),
    )
    .await;

    // The thief copies node-a's SVID and key from its disk.
    let stolen = node_agent::node_svid::load_svid(&a.agent.data_dir)
        .expect("readable")
        .expect("node-a's SVID on disk");
    let mut thief = client_with(&cp, &stolen).await;
    thief
        .renew_node_svid()
        .await
        .expect("before revocation the key works");
    let mut stream = thief
        .raw()
        .sync(pb::SyncRequest::default())
        .await
        .expect("sync")
        .into_inner();
    stream.message().await.expect("first message").expect("snapshot");

    let out = revoke(&cp, "node-a");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "node node-a revoked");

    // The open Sync stream ends with PermissionDenied.
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the revoked node's Sync stream ends");
    let status = end.expect_err("ended by the server with a status");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // Renewal and workload signing are refused.
    let (code, msg) = refused(thief.renew_node_svid().await.unwrap_err());
    assert_eq!(code, Code::PermissionDenied);
    assert!(msg.contains("node-a") && msg.contains("revoked"), "{msg}");
    let (code, _) = refused(
        thief
            .sign_workload(&format!("spiffe://{}/ns/default/sa/frontend", keyway_tests::TD))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::PermissionDenied);
    // Every peer flushes what node-a vouched for.
    b.wait_entries("node-b flushes node-a's entries", Duration::from_secs(10), |e| {
        !e.iter().any(|r| r.key.remote_node_id == node_a)
    })
    .await;
    assert!(
        !b.agent.handles.state.borrow().nodes.contains_key("node-a"),
        "node-a left every node table"
    );

    // A new registration under the same name (a new token) works, and does
    // not bring the stolen SVID back.
    let token = cp.token("node-a").await;
    let fresh = control_plane::attest_with_join_token(&cp.addr, cp.bundle(), "node-a", &token)
        .await
        .expect("re-attestation after revocation");
    assert_ne!(
        fresh.node_id,
        u32::from(node_a),
        "a revoked node id is not handed out again"
    );
    let mut legit = client_with(&cp, &fresh.svid).await;
    legit
        .renew_node_svid()
        .await
        .expect("the new registration renews");
    let mut thief = client_with(&cp, &stolen).await;
    let (code, msg) = refused(thief.renew_node_svid().await.unwrap_err());
    assert_eq!(code, Code::PermissionDenied);
    assert!(msg.contains("before the node's current registration"), "{msg}");

    // Revoking what does not exist says so.
    let out = revoke(&cp, "node-z");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no attested node named node-z"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.stop().await;
    b.stop().await;
}

/// Identities no workload uses are forgotten after a grace period, so a
/// store cannot fill up with dead identities (and stop taking the writes
/// that revoke); a number is never handed out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_identities_are_forgotten_after_the_grace_and_numbers_never_come_back() {
    let cp = InProcess::start(Options::default()).await;
    let doc = workload_yaml("batch", "batch", "node-a", "10.0.3.1");
    cp.apply(&doc).await;
    let first = cp.cp.cluster().records.identities[0].id;
    let file = cp.dir.path().join("gone.yaml");
    std::fs::write(&file, &doc).unwrap();
    let out = std::process::Command::new(bin("control-plane"))
        .args(["delete", "-f", file.to_str().unwrap()])
        .env("KEYWAY_ADMIN_SOCKET", &cp.admin_socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut unused = std::collections::HashMap::new();
    let grace = Duration::from_secs(3600);
    // Within the grace: kept (a rollout brings the pods back).
    assert_eq!(
        cp.cp.collect_unused_identities(&mut unused, grace).await.unwrap(),
        0
    );
    assert_eq!(cp.cp.cluster().records.identities.len(), 1);
    // Past it: forgotten.
    assert_eq!(
        cp.cp
            .collect_unused_identities(&mut unused, Duration::ZERO)
            .await
            .unwrap(),
        1
    );
    assert!(cp.cp.cluster().records.identities.is_empty());
    assert!(
        cp.cp.store().registry().await.unwrap().identities.is_empty(),
        "durably"
    );
    // The same workload again gets a new number, never the old one.
    cp.apply(&doc).await;
    let again = cp.cp.cluster().records.identities[0].id;
    assert!(again > first, "{again} after {first}");
    // An identity in use is never collected.
    assert_eq!(
        cp.cp
            .collect_unused_identities(&mut unused, Duration::ZERO)
            .await
            .unwrap(),
        0
    );
    assert_eq!(cp.cp.cluster().records.identities.len(), 1);
}
