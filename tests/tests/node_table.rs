//! What mutual authentication needs from Sync, end to end in-process: two
//! node agents that advertise their mutual-auth addresses each see every
//! node's name, node id and addresses, and every workload identity's SPIFFE
//! ID, while workloads and SVIDs stay on their own node; a bad address is
//! refused; `control-plane delete -f` removes a workload from every agent's
//! state and applying it again brings back the same numeric identity.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use keyway_tests::{Agent, InProcess, Options, TD, bin, workload_yaml};
use node_agent::agent::AgentHandles;
use node_agent::control_plane::{self, ClientError, ControlPlaneClient};
use node_agent::state::NodeState;
use proto::keyway::update::Kind;
use tokio::sync::watch;
use tonic::Code;

/// An in-process agent that advertises `auth_addresses`.
struct NodeAgent {
    agent: Agent,
    handles: AgentHandles,
}

impl NodeAgent {
    /// Starts an agent for `node`; attests with a fresh join token unless
    /// `dir` holds the node SVID of an earlier run.
    async fn start(cp: &InProcess, node: &str, addrs: &[&str], dir: Option<tempfile::TempDir>) -> Self {
        let token = match dir {
            Some(_) => None,
            None => Some(cp.token(node).await),
        };
        let addrs = addrs.iter().map(|a| a.to_string()).collect();
        let agent = Agent::start_full(&cp.addr, &cp.bundle().to_pem(), node, token, dir, addrs).await;
        let handles = agent.handles.clone();
        Self { agent, handles }
    }

    /// Stops the agent, keeping its directory (and node SVID) for a restart.
    async fn stop(self) -> tempfile::TempDir {
        self.agent.stop().await
    }

    /// Waits until the agent's published state satisfies `cond`.
    async fn wait_state(&self, what: &str, cond: impl Fn(&NodeState) -> bool) -> Arc<NodeState> {
        let mut rx = self.handles.state.clone();
        let state = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| cond(s)))
            .await
            .unwrap_or_else(|_| {
                let s = self.handles.state.borrow().clone();
                panic!(
                    "timed out waiting for {what}; nodes {:?}, identities {:?}, workloads {:?}, ipcache {:?}",
                    s.nodes.values().collect::<Vec<_>>(),
                    s.identities.keys().collect::<Vec<_>>(),
                    s.workloads.keys().collect::<Vec<_>>(),
                    s.ipcache.keys().collect::<Vec<_>>(),
                )
            })
            .expect("agent running");
        state.clone()
    }

    async fn wait_svids(&self, what: &str, cond: impl Fn(&[&str]) -> bool) {
        let mut rx = self.handles.svids.clone();
        tokio::time::timeout(
            Duration::from_secs(20),
            rx.wait_for(|s| cond(&s.keys().map(String::as_str).collect::<Vec<_>>())),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "timed out waiting for {what}; SVIDs held: {:?}",
                self.handles.svids.borrow().keys().collect::<Vec<_>>()
            )
        })
        .expect("agent running");
    }
}

fn spiffe(sa: &str) -> String {
    format!("spiffe://{TD}/ns/default/sa/{sa}")
}

fn identity_of(cp: &InProcess, name: &str) -> u32 {
    cp.cp
        .cluster()
        .records
        .workloads
        .iter()
        .find(|w| w.name == name)
        .unwrap_or_else(|| panic!("no workload {name}"))
        .identity
}

fn node_id_of(cp: &InProcess, node: &str) -> u32 {
    u32::from(cp.cp.node(node).expect("attested").node_id)
}

/// The node table entry for `name`, as (node id, addresses).
fn node_entry(s: &NodeState, name: &str) -> Option<(u32, Vec<String>)> {
    s.nodes.get(name).map(|n| (n.node_id, n.addresses.clone()))
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_sees_every_node_and_identity_but_only_its_own_workloads() {
    let cp = InProcess::start(Options::default()).await;
    cp.apply(&format!(
        "{}---\n{}",
        workload_yaml("web", "web", "node-a", "10.244.1.10"),
        workload_yaml("db", "db", "node-b", "10.244.2.10"),
    ))
    .await;
    let (web, db) = (identity_of(&cp, "web"), identity_of(&cp, "db"));
    let a_addrs = ["192.0.2.1:4250", "[2001:db8::1]:4250"];
    let b_addrs = ["192.0.2.2:4250"];
    let a = NodeAgent::start(&cp, "node-a", &a_addrs, None).await;
    let b = NodeAgent::start(&cp, "node-b", &b_addrs, None).await;
    let (id_a, id_b) = (node_id_of(&cp, "node-a"), node_id_of(&cp, "node-b"));
    assert_ne!(id_a, id_b);

    let table_ok = |s: &NodeState| {
        node_entry(s, "node-a") == Some((id_a, strings(&a_addrs)))
            && node_entry(s, "node-b") == Some((id_b, strings(&b_addrs)))
            && s.nodes.len() == 2
    };
    let ids_ok = |s: &NodeState| {
        s.spiffe_id_of(web) == Some(spiffe("web").as_str())
            && s.spiffe_id_of(db) == Some(spiffe("db").as_str())
            && s.identities.len() == 2
    };
    for (agent, node, mine, theirs, their_ip, their_node) in [
        (&a, "node-a", "web", "db", "10.244.2.10/32", id_b),
        (&b, "node-b", "db", "web", "10.244.1.10/32", id_a),
    ] {
        let s = agent
            .wait_state(&format!("{node}'s node and identity tables"), |s| {
                table_ok(s) && ids_ok(s) && s.ipcache.len() == 2
            })
            .await;
        // The peer's address maps to its identity and node, and the node id
        // to the addresses to dial and the SPIFFE ID to require.
        let peer = &s.ipcache[their_ip];
        assert_eq!(peer.node_id, their_node);
        assert_eq!(s.spiffe_id_of(peer.identity), Some(spiffe(theirs).as_str()));
        assert!(!s.node_by_id(their_node).unwrap().addresses.is_empty());
        // Workloads, and so keys, stay on their node.
        let workloads: Vec<_> = s.workloads.values().map(|w| w.name.as_str()).collect();
        assert_eq!(workloads, vec![mine], "{node}");
        assert_eq!(s.local_spiffe_ids(), vec![spiffe(mine)], "{node}");
        let mine_id = spiffe(mine);
        agent
            .wait_svids(&format!("{node}'s SVID"), |held| held.contains(&mine_id.as_str()))
            .await;
        let held: Vec<String> = agent.handles.svids.borrow().keys().cloned().collect();
        assert_eq!(held, vec![spiffe(mine)], "{node} holds only its own SVIDs");
    }

    // node-b restarts advertising another address: node-a follows.
    let dir = b.stop().await;
    let b = NodeAgent::start(&cp, "node-b", &["192.0.2.22:4250"], Some(dir)).await;
    a.wait_state("node-b's new address", |s| {
        node_entry(s, "node-b") == Some((id_b, strings(&["192.0.2.22:4250"])))
    })
    .await;
    assert_eq!(
        cp.cp.node("node-b").unwrap().addresses,
        vec!["192.0.2.22:4250"],
        "stored on node-b's record"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_bad_auth_address_is_refused_and_nothing_is_stored() {
    let cp = InProcess::start(Options::default()).await;
    let token = cp.token("node-a").await;
    let id = control_plane::attest_with_join_token(&cp.addr, cp.bundle(), "node-a", &token)
        .await
        .expect("attestation");
    let (_b, bundle) = watch::channel(cp.bundle());
    let (_c, cert) = watch::channel(Some(id.svid.certified_key().unwrap()));
    let mut client = ControlPlaneClient::connect(&cp.addr, bundle, cert)
        .await
        .expect("mTLS connect");
    let stored = |cp: &InProcess| cp.cp.node("node-a").expect("attested").addresses;

    let refused = |r: Result<_, ClientError>| match r {
        Err(ClientError::Refused(s)) => (s.code(), s.message().to_owned()),
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("a bad address was accepted"),
    };
    for (bad, want) in [
        ("node-a.example:4250", "is not IP:PORT"),
        ("192.0.2.1", "is not IP:PORT"),
        ("0.0.0.0:4250", "cannot be dialled"),
        ("192.0.2.1:0", "port 0"),
    ] {
        let (code, msg) = refused(client.sync(0, strings(&["192.0.2.1:4250", bad])).await);
        assert_eq!(code, Code::InvalidArgument, "{bad}: {msg}");
        assert!(
            msg.contains("auth_addresses[1]") && msg.contains(&format!("{bad:?}")) && msg.contains(want),
            "{bad}: {msg}"
        );
        assert!(stored(&cp).is_empty(), "nothing stored for {bad}");
    }

    // Good addresses are stored and are in the caller's own snapshot.
    let mut stream = client.sync(0, strings(&["192.0.2.1:4250"])).await.expect("sync");
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("snapshot within 5s")
        .expect("stream")
        .expect("a message");
    assert!(first.updates.iter().any(|u| matches!(
        &u.kind,
        Some(Kind::NodeUpsert(n)) if n.name == "node-a" && n.addresses == ["192.0.2.1:4250"]
    )));
    assert_eq!(stored(&cp), vec!["192.0.2.1:4250"]);
    // A later bad request leaves them as they were, also in the store.
    let (code, _) = refused(client.sync(0, strings(&["[::]:4250"])).await);
    assert_eq!(code, Code::InvalidArgument);
    assert_eq!(stored(&cp), vec!["192.0.2.1:4250"]);
    let reg = cp.cp.store().registry().await.expect("registry");
    assert_eq!(reg.nodes[0].addresses, vec!["192.0.2.1:4250"]);
}

/// Runs `control-plane delete -f FILE` against `cp`'s admin socket.
async fn cli_delete(cp: &InProcess, file: &Path) -> std::process::Output {
    let mut cmd = Command::new(bin("control-plane"));
    cmd.arg("delete")
        .arg("-f")
        .arg(file)
        .env("KEYWAY_ADMIN_SOCKET", &cp.admin_socket);
    tokio::task::spawn_blocking(move || cmd.output().expect("run control-plane"))
        .await
        .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_a_workload_everywhere_and_reapplying_keeps_its_identity() {
    let cp = InProcess::start(Options::default()).await;
    let web_yaml = workload_yaml("web", "web", "node-a", "10.244.1.10");
    let db_yaml = workload_yaml("db", "db", "node-b", "10.244.2.10");
    cp.apply(&format!("{web_yaml}---\n{db_yaml}")).await;
    let (web, db) = (identity_of(&cp, "web"), identity_of(&cp, "db"));
    let a = NodeAgent::start(&cp, "node-a", &["192.0.2.1:4250"], None).await;
    let b = NodeAgent::start(&cp, "node-b", &["192.0.2.2:4250"], None).await;
    let has_db = |s: &NodeState| {
        s.ipcache.get("10.244.2.10/32").map(|e| e.identity) == Some(db)
            && s.spiffe_id_of(db) == Some(spiffe("db").as_str())
    };
    a.wait_state("db's ipcache entry and identity on node-a", has_db)
        .await;
    b.wait_state("db on node-b", |s| {
        has_db(s) && s.workloads.contains_key(&("default".into(), "db".into()))
    })
    .await;
    let db_id = spiffe("db");
    b.wait_svids("db's SVID", |held| held.contains(&db_id.as_str()))
        .await;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("db.yaml");
    std::fs::write(&file, &db_yaml).unwrap();
    let out = cli_delete(&cp, &file).await;
    assert!(
        out.status.success(),
        "delete -f failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "workload default/db deleted\n"
    );

    let gone = |s: &NodeState| {
        !s.ipcache.contains_key("10.244.2.10/32")
            && !s.identities.contains_key(&db)
            && !s.workloads.contains_key(&("default".into(), "db".into()))
            // web is untouched.
            && s.spiffe_id_of(web) == Some(spiffe("web").as_str())
            && s.ipcache.contains_key("10.244.1.10/32")
    };
    a.wait_state("db gone from node-a", gone).await;
    b.wait_state("db gone from node-b", gone).await;
    b.wait_svids("db's SVID dropped", |held| !held.contains(&db_id.as_str()))
        .await;

    // Deleting again reports it; a file with one bad document deletes nothing.
    let out = cli_delete(&cp, &file).await;
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "workload default/db not found\n"
    );
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        format!("{web_yaml}---\napiVersion: keyway.dev/v1alpha1\nkind: Pod\nmetadata: {{ name: x }}\n"),
    )
    .unwrap();
    let out = cli_delete(&cp, &bad).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("document 2") && stderr.contains("\"Pod\""),
        "{stderr}"
    );
    assert_eq!(identity_of(&cp, "web"), web, "web not deleted");

    // Applied again, db comes back everywhere with the same numeric identity.
    cp.apply(&db_yaml).await;
    assert_eq!(identity_of(&cp, "db"), db);
    a.wait_state("db back on node-a", has_db).await;
    b.wait_state("db back on node-b", |s| {
        has_db(s)
            && s.workloads
                .get(&("default".into(), "db".into()))
                .map(|w| w.identity)
                == Some(db)
    })
    .await;
    b.wait_svids("db's SVID again", |held| held.contains(&db_id.as_str()))
        .await;
    a.stop().await;
    b.stop().await;
}
