//! KeywayNetworkPolicy in standalone mode, end to end in-process: documents
//! applied to the control plane reach a node agent's state over Sync as the
//! cluster-wide ipcache and the compiled policy of that node's identities.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keyway_tests::{Agent, InProcess, Options, workload_yaml};
use node_agent::state::{NodeState, PolicyTuple};

const POLICY: &str = r#"apiVersion: keyway.dev/v1alpha1
kind: KeywayNetworkPolicy
metadata: { name: api-mtls, namespace: default }
spec:
  endpointSelector: { matchLabels: { app: api } }
  ingress:
    - authentication: { mode: required }
      fromEndpoints:
        - matchLabels: { app: frontend }
      toPorts:
        - ports: [{ port: "8080", protocol: TCP }]
"#;

/// Waits until the agent's published state satisfies `cond`.
async fn wait_state(agent: &Agent, what: &str, cond: impl Fn(&NodeState) -> bool) -> Arc<NodeState> {
    let mut rx = agent.handles.state.clone();
    let state = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| cond(s)))
        .await
        .unwrap_or_else(|_| {
            let s = agent.handles.state.borrow().clone();
            panic!(
                "timed out waiting for {what}; ipcache {:?}, policy {:?}",
                s.ipcache,
                s.policy.keys().collect::<Vec<_>>()
            )
        })
        .expect("agent running");
    state.clone()
}

/// (allows something, requires auth for some of it, rule) per key (subject,
/// peer, port block, protocol, direction), for subject `id`.
fn policy_of(state: &NodeState, id: u32) -> BTreeMap<PolicyTuple, (bool, bool, String)> {
    state
        .policy
        .iter()
        .filter(|(k, _)| k.0 == id)
        .map(|(k, v)| {
            let allows = node_agent::state::allowed(v).is_some_and(|b| !b.is_empty());
            (*k, (allows, node_agent::state::requires_auth(v), v.rule.clone()))
        })
        .collect()
}

/// Port 8080's block in policy keys.
const BLOCK_8080: u32 = 32;

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

fn expected_api_policy(api: u32, frontend: u32, auth: bool) -> BTreeMap<PolicyTuple, (bool, bool, String)> {
    let host = "keyway-exempt: host (node agent, kubelet probes)".to_string();
    let cp = "keyway-exempt: control plane".to_string();
    BTreeMap::from([
        // Ingress: only frontend on 8080/TCP, and no default-allow.
        (
            (api, frontend, BLOCK_8080, 6, 0),
            (true, auth, "default/api-mtls ingress[0]".to_string()),
        ),
        ((api, 1, 0, 0, 0), (true, false, host.clone())),
        ((api, 4, 0, 0, 0), (true, false, cp.clone())),
        // Egress: no policy selects api for egress.
        (
            (api, 0, 0, 0, 1),
            (
                true,
                false,
                "default-allow: no policy selects this endpoint".to_string(),
            ),
        ),
        ((api, 1, 0, 0, 1), (true, false, host)),
        ((api, 4, 0, 0, 1), (true, false, cp)),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_and_ipcache_reach_the_node_and_follow_changes() {
    let cp = InProcess::start(Options::default()).await;
    // One file mixing Workloads and a policy.
    let docs = format!(
        "{}---\n{}---\n{POLICY}",
        workload_yaml("frontend", "frontend", "node-a", "10.244.1.10"),
        workload_yaml("api", "api", "node-b", "10.244.2.10"),
    );
    let outcome = cp.cp.apply(&docs).await.expect("apply");
    assert!(
        outcome
            .changes
            .iter()
            .any(|c| c == "keywaynetworkpolicy default/api-mtls created"),
        "{:?}",
        outcome.changes
    );
    let frontend = identity_of(&cp, "frontend");
    let api = identity_of(&cp, "api");

    let agent_a = Agent::start(&cp, "node-a", None).await;
    let agent_b = Agent::start(&cp, "node-b", None).await;
    let node_a = cp.cp.node("node-a").expect("node-a attested").node_id;
    let node_b = cp.cp.node("node-b").expect("node-b attested").node_id;
    assert_ne!(node_a, node_b);

    // The ipcache is cluster-wide, with each workload's node id.
    let ipcache_ok = |s: &NodeState| {
        let get = |cidr: &str| s.ipcache.get(cidr).map(|e| (e.identity, e.node_id));
        get("10.244.1.10/32") == Some((frontend, u32::from(node_a)))
            && get("10.244.2.10/32") == Some((api, u32::from(node_b)))
            && s.ipcache.len() == 2
    };
    let want = expected_api_policy(api, frontend, true);
    let state = wait_state(&agent_b, "node-b's ipcache and policy", |s| {
        ipcache_ok(s) && policy_of(s, api) == want
    })
    .await;
    // node-b runs only api: it holds no other subject's entries.
    assert_eq!(state.policy.len(), want.len(), "{:?}", state.policy.keys());
    // node-a gets the same ipcache but only frontend's policy (default allow).
    let state_a = wait_state(&agent_a, "node-a's ipcache", |s| {
        ipcache_ok(s) && s.policy.contains_key(&(frontend, 0, 0, 0, 0))
    })
    .await;
    assert!(
        state_a.policy.keys().all(|k| k.0 == frontend),
        "{:?}",
        state_a.policy.keys()
    );

    // Re-applying the policy with authentication disabled changes that entry.
    let disabled = POLICY.replace("mode: required", "mode: disabled");
    let outcome = cp.cp.apply(&disabled).await.expect("apply");
    assert_eq!(
        outcome.changes,
        vec!["keywaynetworkpolicy default/api-mtls configured"]
    );
    let want = expected_api_policy(api, frontend, false);
    let before_bad = wait_state(&agent_b, "auth_required=false", |s| policy_of(s, api) == want).await;
    // Applying the same document again changes nothing.
    let again = cp.cp.apply(&disabled).await.expect("apply");
    assert_eq!(
        again.changes,
        vec!["keywaynetworkpolicy default/api-mtls unchanged"]
    );
    assert_eq!(again.revision, outcome.revision);

    // A bad policy is refused with the document, policy and field named, and
    // nothing in the same apply is stored, not even a valid Workload.
    let revision = cp.cp.cluster().records.revision;
    let bad = format!(
        "{}---\n{}",
        workload_yaml("worker", "worker", "node-b", "10.244.2.20"),
        POLICY.replace("port: \"8080\"", "port: \"http\"")
    );
    let err = cp
        .cp
        .apply(&bad)
        .await
        .expect_err("bad policy refused")
        .to_string();
    assert!(
        err.contains("document 2 (KeywayNetworkPolicy default/api-mtls)")
            && err.contains("spec.ingress[0].toPorts[0].ports[0].port")
            && err.contains("\"http\""),
        "{err}"
    );
    let bad_op = POLICY.replace(
        "matchLabels: { app: frontend }",
        "matchExpressions: [{ key: app, operator: Equal, values: [frontend] }]",
    );
    let err = cp
        .cp
        .apply(&bad_op)
        .await
        .expect_err("bad operator refused")
        .to_string();
    assert!(err.contains("matchExpressions[0].operator"), "{err}");
    let reg = cp.cp.cluster();
    assert_eq!(reg.records.revision, revision);
    assert!(reg.records.workloads.iter().all(|w| w.name != "worker"));
    // The agent's state is what it was (and a later good change still flows).
    let now = agent_b.handles.state.borrow().clone();
    assert_eq!(now.revision, before_bad.revision);
    assert_eq!(now.policy, before_bad.policy);
    assert_eq!(now.ipcache, before_bad.ipcache);
    cp.apply(&workload_yaml("worker", "worker", "node-b", "10.244.2.20"))
        .await;
    wait_state(&agent_b, "the worker's ipcache entry", |s| {
        s.ipcache.contains_key("10.244.2.20/32")
    })
    .await;

    // Deleting the policy (the file that made it; its spec is not read)
    // turns api's ingress back to default allow, durably.
    let outcome = cp.cp.delete(&disabled).await.expect("delete");
    assert_eq!(
        outcome.changes,
        vec!["keywaynetworkpolicy default/api-mtls deleted"]
    );
    assert!(cp.cp.cluster().records.policies.is_empty());
    wait_state(&agent_b, "api's default-allow ingress", |s| {
        s.policy
            .get(&(api, 0, 0, 0, 0))
            .is_some_and(|e| e.rule.starts_with("default-allow"))
            && !s.policy.contains_key(&(api, frontend, BLOCK_8080, 6, 0))
    })
    .await;

    agent_a.stop().await;
    agent_b.stop().await;
}
