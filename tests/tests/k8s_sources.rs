//! Kubernetes mode against a real kube-apiserver: Pods, ServiceAccounts,
//! Namespaces, Nodes and policies become identities, placement and compiled
//! policy in a node agent's sync; agents attest with pod-bound service
//! account tokens; deleting a pod or its service account revokes the
//! identity on the node; an invalid policy gets a status condition and
//! changes nothing else; pod churn leaves nothing stale and keeps deltas small.
//!
//! The control plane runs in-process (sled store, one replica) with the
//! Kubernetes watchers started on an admin client. Each test works in its
//! own namespace and with its own node names.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use control_plane::crd::KeywayNetworkPolicy;
use control_plane::kubernetes::{Options as K8sOptions, start as start_kubernetes};
use k8s_openapi::api::core::v1::ServiceAccount;
use keyway_tests::kube::{PodSpecOpts, cluster, create_node, create_pod, delete_pod, unique};
use keyway_tests::{Agent, InProcess, Options};
use kube::api::{Api, DeleteParams};
use node_agent::control_plane::{Attestation, ClientError};
use node_agent::state::NodeState;
use tokio::sync::watch;

/// A control plane with the Kubernetes watchers, and what stops them.
struct K8sControlPlane {
    cp: InProcess,
    _stop: watch::Sender<bool>,
}

async fn control_plane(agent_sa_namespace: &str) -> K8sControlPlane {
    control_plane_with(agent_sa_namespace, Options::default()).await
}

async fn control_plane_with(agent_sa_namespace: &str, opts: Options) -> K8sControlPlane {
    let cp = InProcess::start(opts).await;
    let client = cluster().admin().await;
    keyway_tests::kube::install_crd(&client).await;
    let (stop, rx) = watch::channel(false);
    let run = start_kubernetes(
        cp.cp.clone(),
        client,
        K8sOptions {
            namespace: agent_sa_namespace.to_string(),
            holder_identity: unique("cp"),
            agent_service_account: format!("{agent_sa_namespace}/keyway-node-agent"),
            lease_name: "keyway-control-plane".into(),
            replicas: false,
        },
        rx,
    )
    .expect("start Kubernetes mode");
    tokio::spawn(run);
    K8sControlPlane { cp, _stop: stop }
}

async fn wait_state(agent: &Agent, what: &str, cond: impl Fn(&NodeState) -> bool) -> Arc<NodeState> {
    let mut rx = agent.handles.state.clone();
    let r = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| cond(s))).await;
    match r {
        Ok(state) => state.expect("agent running").clone(),
        Err(_) => {
            let s = agent.handles.state.borrow().clone();
            panic!(
                "timed out waiting for {what}; workloads {:?}, ipcache {:?}, policy {} entries",
                s.workloads.keys().collect::<Vec<_>>(),
                s.ipcache.keys().collect::<Vec<_>>(),
                s.policy.len()
            )
        }
    }
}

fn identity_of(state: &NodeState, ns: &str, name: &str) -> Option<u32> {
    state
        .workloads
        .get(&(ns.to_string(), name.to_string()))
        .map(|w| w.identity)
}

async fn wait_cp<T>(cp: &InProcess, what: &str, f: impl Fn(&control_plane::sync::Cluster) -> Option<T>) -> T {
    let mut rx = cp.cp.subscribe_cluster();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f(&rx.borrow_and_update()) {
            return v;
        }
        if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
            panic!("timed out waiting for {what}");
        }
    }
}

const POLICY: &str = r#"apiVersion: keyway.dev/v1alpha1
kind: KeywayNetworkPolicy
metadata: { name: api-mtls }
spec:
  endpointSelector: { matchLabels: { app: api } }
  ingress:
    - authentication: { mode: required }
      fromEndpoints:
        - matchLabels: { app: frontend }
      toPorts:
        - ports: [{ port: "8080", protocol: TCP }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_service_accounts_and_policies_reach_an_agents_sync() {
    let k = cluster();
    let admin = k.admin().await;
    let ns = k.namespace("k8s-sync").await;
    let (node_a, node_b) = (unique("node-a"), unique("node-b"));
    create_node(&admin, &node_a).await;
    create_node(&admin, &node_b).await;
    k.service_account(&ns, "frontend").await;
    k.service_account(&ns, "api").await;
    create_pod(
        &admin,
        &ns,
        PodSpecOpts {
            name: "frontend-1",
            service_account: "frontend",
            node: &node_a,
            labels: &[("app", "frontend")],
            ip: Some("10.244.1.10"),
        },
    )
    .await;
    let api_pod = create_pod(
        &admin,
        &ns,
        PodSpecOpts {
            name: "api-1",
            service_account: "api",
            node: &node_b,
            labels: &[("app", "api")],
            ip: Some("10.244.2.10"),
        },
    )
    .await;
    keyway_tests::kube::apply_yaml::<KeywayNetworkPolicy>(&admin, &ns, POLICY).await;

    let kcp = control_plane(&ns).await;
    let cp = &kcp.cp;
    let agent_b = Agent::start(cp, &node_b, None).await;
    let state = wait_state(&agent_b, "api-1 placed on node-b with its policy", |s| {
        let Some(api) = identity_of(s, &ns, "api-1") else {
            return false;
        };
        s.ipcache.contains_key("10.244.1.10/32")
            && s.ipcache.get("10.244.2.10/32").map(|e| e.identity) == Some(api)
            && s.policy.values().any(node_agent::state::requires_auth)
    })
    .await;
    let api = &state.workloads[&(ns.clone(), "api-1".to_string())];
    // The SPIFFE ID comes from the namespace and service account, and the
    // agent recognises the pod's processes by its UID.
    assert_eq!(api.spiffe_id, format!("spiffe://example.org/ns/{ns}/sa/api"));
    let uid = api_pod.metadata.uid.clone().expect("uid");
    assert_eq!(api.selectors, vec![format!("k8s:pod-uid:{uid}")]);
    // Placement: node-b gets api-1 only.
    assert!(
        state
            .workloads
            .keys()
            .all(|(n, name)| n != &ns || name == "api-1"),
        "{:?}",
        state.workloads.keys()
    );
    let frontend = state.ipcache["10.244.1.10/32"].identity;
    let (rule, auth) = state
        .decide(api.identity, frontend, 8080, 6, 0)
        .expect("the compiled api <- frontend:8080 entry");
    assert!(auth, "api <- frontend:8080 needs mutual auth");
    assert_eq!(rule, format!("{ns}/api-mtls ingress[0]"));
    // A plain NetworkPolicy is honoured the same way: deny ingress to api
    // from everything but the frontend namespace's pods on 9090.
    let np = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: api-9090 }
spec:
  podSelector: { matchLabels: { app: api } }
  policyTypes: [Ingress]
  ingress:
    - from:
        - podSelector: { matchLabels: { app: frontend } }
      ports: [{ port: 9090, protocol: TCP }]
"#;
    keyway_tests::kube::apply_yaml::<k8s_openapi::api::networking::v1::NetworkPolicy>(&admin, &ns, np).await;
    wait_state(&agent_b, "the NetworkPolicy's entry", |s| {
        s.decide(api.identity, frontend, 9090, 6, 0)
            == Some((format!("{ns}/networkpolicy:api-9090 ingress[0]").as_str(), false))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_bound_token_attests_its_node_and_nothing_else() {
    let k = cluster();
    let admin = k.admin().await;
    let ns = k.namespace("k8s-attest").await;
    let node = unique("node");
    create_node(&admin, &node).await;
    k.service_account(&ns, "keyway-node-agent").await;
    k.service_account(&ns, "other").await;
    let pod = create_pod(
        &admin,
        &ns,
        PodSpecOpts {
            name: "agent-1",
            service_account: "keyway-node-agent",
            node: &node,
            labels: &[("app", "keyway-node-agent")],
            ip: None,
        },
    )
    .await;
    let uid = pod.metadata.uid.clone().expect("uid");
    let kcp = control_plane(&ns).await;
    let cp = &kcp.cp;
    let dir = tempfile::tempdir().expect("dir");
    let write = |name: &str, token: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, token).expect("write token");
        p
    };
    let attest = |path: std::path::PathBuf, node: String| {
        let server = cp.addr.clone();
        let bundle = cp.bundle();
        async move {
            node_agent::control_plane::attest(&server, bundle, &node, &Attestation::KubernetesToken(path))
                .await
        }
    };
    let refused = |r: Result<node_agent::control_plane::NodeIdentity, ClientError>, what: &str| match r {
        Err(ClientError::Refused(s)) => {
            assert_eq!(s.code(), tonic::Code::PermissionDenied, "{what}: {s:?}");
            s.message().to_string()
        }
        Err(e) => panic!("{what}: expected a refusal, got {e}"),
        Ok(_) => panic!("{what}: attested"),
    };

    let good = write(
        "good",
        &k.sa_token(&ns, "keyway-node-agent", &["keyway"], Some(("agent-1", &uid)))
            .await,
    );
    let id = attest(good.clone(), node.clone())
        .await
        .expect("a pod-bound keyway token attests");
    assert_eq!(
        id.svid.spiffe_id().to_string(),
        format!("spiffe://example.org/keyway/node/{node}")
    );
    assert!(cp.cp.node(&node).is_some(), "the node is registered");

    // A full agent attests the same way and syncs.
    let agent = Agent::start_kubernetes(&cp.addr, &cp.bundle().to_pem(), &node, good.clone()).await;
    wait_state(&agent, "the agent's first sync", |s| s.synced).await;

    // Restarted on the same data (a DaemonSet rollout), it attests again with
    // the token rather than serving from the stored node SVID: one more node
    // SVID issued, same node id.
    let node_svids = || async {
        let log = cp.cp.store().issuance_log().await.expect("issuance log");
        log.iter()
            .filter(|r| r.spiffe_id == id.svid.spiffe_id().to_string())
            .count()
    };
    let before = node_svids().await;
    let node_id = cp.cp.node(&node).expect("registered").node_id;
    let dir_kept = agent.stop().await;
    let agent = Agent::try_start_kubernetes(&cp.addr, &cp.bundle().to_pem(), &node, good.clone(), dir_kept)
        .await
        .expect("the restarted agent re-attests");
    wait_state(&agent, "the restarted agent's sync", |s| s.synced).await;
    assert_eq!(node_svids().await, before + 1, "the restart attested again");
    assert_eq!(
        cp.cp.node(&node).expect("registered").node_id,
        node_id,
        "same node id"
    );
    // With the control plane out of reach, it starts from the stored SVID
    // (workloads keep being served through an outage).
    let dir_kept = agent.stop().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_addr = dead.local_addr().expect("addr").to_string();
    drop(dead);
    let offline =
        Agent::try_start_kubernetes(&dead_addr, &cp.bundle().to_pem(), &node, good.clone(), dir_kept)
            .await
            .expect("an agent whose control plane is unreachable starts from its stored node SVID");
    let dir_kept = offline.stop().await;

    // Claiming another node with the same token.
    let msg = refused(attest(good.clone(), unique("elsewhere")).await, "wrong node");
    assert!(msg.contains("scheduled to"), "{msg}");
    // The wrong audience.
    let wrong_aud = write(
        "aud",
        &k.sa_token(&ns, "keyway-node-agent", &["not-keyway"], Some(("agent-1", &uid)))
            .await,
    );
    let msg = refused(attest(wrong_aud, node.clone()).await, "wrong audience");
    assert!(msg.contains("refused the service account token"), "{msg}");
    // Another service account, even bound to the same pod.
    let other = write("other", &k.sa_token(&ns, "other", &["keyway"], None).await);
    let msg = refused(attest(other, node.clone()).await, "other service account");
    assert!(msg.contains("not to the node agent's service account"), "{msg}");
    // Not bound to a pod.
    let unbound = write(
        "unbound",
        &k.sa_token(&ns, "keyway-node-agent", &["keyway"], None).await,
    );
    let msg = refused(attest(unbound, node.clone()).await, "unbound token");
    assert!(msg.contains("not bound to a pod"), "{msg}");
    // The pod is gone: refused at once, although the API server may still
    // cache the review.
    delete_pod(&admin, &ns, "agent-1").await;
    let msg = refused(attest(good.clone(), node.clone()).await, "deleted pod");
    assert!(msg.contains("no longer exists"), "{msg}");
    // And an agent restarted with that pod's token does not start, although
    // its data directory still holds a valid node SVID: the refusal is final.
    match Agent::try_start_kubernetes(&cp.addr, &cp.bundle().to_pem(), &node, good, dir_kept).await {
        Err(e) => assert!(e.to_string().contains("no longer exists"), "{e}"),
        Ok(_) => panic!("an agent whose pod is gone started from its stored node SVID"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_pod_or_its_service_account_revokes_the_identity_on_the_node() {
    let k = cluster();
    let admin = k.admin().await;
    let ns = k.namespace("k8s-revoke").await;
    let node = unique("node");
    create_node(&admin, &node).await;
    k.service_account(&ns, "web").await;
    k.service_account(&ns, "db").await;
    for (name, sa, ip) in [("web-1", "web", "10.244.3.10"), ("db-1", "db", "10.244.3.11")] {
        create_pod(
            &admin,
            &ns,
            PodSpecOpts {
                name,
                service_account: sa,
                node: &node,
                labels: &[("app", sa)],
                ip: Some(ip),
            },
        )
        .await;
    }
    let kcp = control_plane(&ns).await;
    let agent = Agent::start(&kcp.cp, &node, None).await;
    let web_id = format!("spiffe://example.org/ns/{ns}/sa/web");
    let db_id = format!("spiffe://example.org/ns/{ns}/sa/db");
    wait_state(&agent, "both workloads", |s| {
        identity_of(s, &ns, "web-1").is_some() && identity_of(s, &ns, "db-1").is_some()
    })
    .await;
    agent.wait_for_svid(&web_id).await;
    agent.wait_for_svid(&db_id).await;

    let started = std::time::Instant::now();
    delete_pod(&admin, &ns, "web-1").await;
    let mut svids = agent.handles.svids.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        svids.wait_for(|s| !s.contains_key(&web_id)),
    )
    .await
    .expect("web's SVID revoked on the node within 10 s of deleting its pod")
    .expect("agent running");
    let state = agent.handles.state.borrow().clone();
    assert!(identity_of(&state, &ns, "web-1").is_none());
    assert!(!state.ipcache.contains_key("10.244.3.10/32"));
    println!(
        "pod deletion to SVID revocation on the node: {:?}",
        started.elapsed()
    );

    let started = std::time::Instant::now();
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), &ns);
    sas.delete("db", &DeleteParams::default())
        .await
        .expect("delete service account");
    tokio::time::timeout(
        Duration::from_secs(10),
        svids.wait_for(|s| !s.contains_key(&db_id)),
    )
    .await
    .expect("db's SVID revoked within 10 s of deleting its service account")
    .expect("agent running");
    println!(
        "service account deletion to SVID revocation: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_gets_a_status_condition_and_changes_nothing_else() {
    let k = cluster();
    let admin = k.admin().await;
    keyway_tests::kube::install_crd(&admin).await;
    let ns = k.namespace("k8s-status").await;
    let node = unique("node");
    create_node(&admin, &node).await;
    k.service_account(&ns, "api").await;
    create_pod(
        &admin,
        &ns,
        PodSpecOpts {
            name: "api-1",
            service_account: "api",
            node: &node,
            labels: &[("app", "api")],
            ip: Some("10.244.4.10"),
        },
    )
    .await;
    keyway_tests::kube::apply_yaml::<KeywayNetworkPolicy>(&admin, &ns, POLICY).await;
    // A small per-policy budget, so a policy of a few hundred entries is over it.
    let kcp = control_plane_with(
        &ns,
        Options {
            policy_budget: control_plane::policy::Budget {
                per_policy: 200,
                per_namespace: 1000,
            },
            ..Options::default()
        },
    )
    .await;
    let cp = &kcp.cp;
    let policies: Api<KeywayNetworkPolicy> = Api::namespaced(admin.clone(), &ns);
    let condition = |name: &'static str| {
        let policies = policies.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let p = policies.get(name).await.expect("get policy");
                let generation = p.metadata.generation;
                if let Some(c) = p
                    .status
                    .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Valid"))
                    && c.observed_generation == generation
                {
                    return c;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no Valid condition on {name}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let ok = condition("api-mtls").await;
    assert_eq!((ok.status.as_str(), ok.reason.as_str()), ("True", "Compiled"));
    let before = wait_cp(cp, "the valid policy compiled", |c| {
        c.records
            .policies
            .iter()
            .any(|p| p.name == "api-mtls" && p.namespace == ns)
            .then(|| c.records.policies.clone())
    })
    .await;

    // A new policy with an invalid selector, and the valid one broken.
    let invalid = r#"apiVersion: keyway.dev/v1alpha1
kind: KeywayNetworkPolicy
metadata: { name: broken }
spec:
  endpointSelector:
    matchExpressions: [{ key: app, operator: Bogus, values: [api] }]
  ingress: []
"#;
    keyway_tests::kube::apply_yaml::<KeywayNetworkPolicy>(&admin, &ns, invalid).await;
    let broken = condition("broken").await;
    assert_eq!(
        (broken.status.as_str(), broken.reason.as_str()),
        ("False", "InvalidSpec")
    );
    assert!(
        broken.message.contains("operator") && broken.message.contains("Bogus"),
        "{}",
        broken.message
    );
    let made_invalid = POLICY.replace("mode: required", "mode: sometimes");
    keyway_tests::kube::apply_yaml::<KeywayNetworkPolicy>(&admin, &ns, &made_invalid).await;
    let c = condition("api-mtls").await;
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "InvalidSpec"),
        "{}",
        c.message
    );
    // Nothing else changed: the policies in force (the last valid
    // api-mtls, and no `broken`) are what they were.
    let after = cp.cp.cluster().records.policies.clone();
    let ours = |list: &[control_plane::model::PolicyRecord]| {
        list.iter()
            .filter(|p| p.namespace == ns)
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(ours(&after), ours(&before));
    // Fixing it brings the condition back to True.
    keyway_tests::kube::apply_yaml::<KeywayNetworkPolicy>(&admin, &ns, POLICY).await;
    let c = condition("api-mtls").await;
    assert_eq!(c.status, "True");

    // The budget counts the endpoints a policy selects: api-1's workload.
    wait_cp(cp, "api-1 as a workload", |c| {
        c.records
            .workloads
            .iter()
            .any(|w| w.namespace == ns && w.name == "api-1")
            .then_some(())
    })
    .await;
    // 400 ports spread over the port space from the whole cluster: the API
    // server refuses a list of more than 128 ports (maxItems) ...
    let ports = |from: usize, n: usize| {
        (from..from + n)
            .map(|i| format!("{{ port: \"{}\", protocol: TCP }}", 100 + i * 160))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let doc = |items: &[String]| {
        let to_ports: String = items
            .iter()
            .map(|p| format!("        - ports: [{p}]\n"))
            .collect();
        format!(
            "apiVersion: keyway.dev/v1alpha1\nkind: KeywayNetworkPolicy\nmetadata: {{ name: big }}\n\
             spec:\n  endpointSelector: {{ matchLabels: {{ app: api }} }}\n  ingress:\n    \
             - fromEntities: [cluster]\n      toPorts:\n{to_ports}"
        )
    };
    let too_long: KeywayNetworkPolicy = serde_yaml::from_str(&doc(&[ports(0, 400)])).expect("parses");
    let err = policies
        .create(&kube::api::PostParams::default(), &too_long)
        .await
        .expect_err("maxItems: 400 ports in one list");
    assert!(err.to_string().contains("128"), "{err}");
    // ... and in four lists of 100 it is valid but over this control
    // plane's budget: refused by the compiler, its endpoint allows nothing
    // from the cluster on those ports. (The Valid condition says OverBudget;
    // it is not asserted here because every test's control plane watches
    // this apiserver's policies and writes their status with its own,
    // default, budget.)
    let big = doc(&[ports(0, 100), ports(100, 100), ports(200, 100), ports(300, 100)]);
    keyway_tests::kube::apply_yaml::<KeywayNetworkPolicy>(&admin, &ns, &big).await;
    let why = wait_cp(cp, "the compiler refusing big", |c| {
        c.policy.refused.get(&format!("{ns}/big")).cloned()
    })
    .await;
    assert!(why.contains("per-policy budget of 200"), "{why}");
    let reg = cp.cp.cluster();
    let api = reg
        .records
        .workloads
        .iter()
        .find(|w| w.namespace == ns && w.name == "api-1")
        .expect("api-1")
        .identity;
    assert_eq!(
        reg.policy.decide(api, 100_000, 100, 6, 0),
        None,
        "refused: nothing allowed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_churn_leaves_no_stale_identity_and_small_deltas() {
    const PODS: usize = 1000;
    let k = cluster();
    let admin = k.admin().await;
    let ns = k.namespace("k8s-churn").await;
    let node = unique("node");
    create_node(&admin, &node).await;
    k.service_account(&ns, "worker").await;
    k.service_account(&ns, "steady").await;
    create_pod(
        &admin,
        &ns,
        PodSpecOpts {
            name: "steady-1",
            service_account: "steady",
            node: &node,
            labels: &[("app", "steady")],
            ip: Some("10.245.255.1"),
        },
    )
    .await;
    let kcp = control_plane(&ns).await;
    let cp = &kcp.cp;
    let agent = Agent::start(cp, &node, None).await;
    wait_state(&agent, "the steady workload", |s| {
        identity_of(s, &ns, "steady-1").is_some()
    })
    .await;

    // Count the bytes of every Sync message the node receives during churn.
    let mut client = agent.handles.client.borrow().clone().expect("agent connected");
    let mut stream = client
        .raw()
        .sync(proto::keyway::SyncRequest::default())
        .await
        .expect("open a second Sync stream as the node")
        .into_inner();
    let mut snapshot_bytes = 0usize;
    while let Some(msg) = stream.message().await.expect("sync") {
        snapshot_bytes += prost::Message::encoded_len(&msg);
        if msg.complete {
            break;
        }
    }
    let bytes = Arc::new(AtomicUsize::new(0));
    let messages = Arc::new(AtomicUsize::new(0));
    let counter = tokio::spawn({
        let (bytes, messages) = (bytes.clone(), messages.clone());
        async move {
            while let Ok(Some(msg)) = stream.message().await {
                bytes.fetch_add(prost::Message::encoded_len(&msg), Ordering::Relaxed);
                messages.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let started = std::time::Instant::now();

    let labels = [("app", "worker")];
    let names: Vec<String> = (0..PODS).map(|i| format!("worker-{i}")).collect();
    let ips: Vec<String> = (0..PODS)
        .map(|i| format!("10.245.{}.{}", i / 250, i % 250 + 1))
        .collect();
    futures_for_each(&names, |i, name| {
        let admin = admin.clone();
        let ns = ns.clone();
        let node = node.clone();
        let ip = ips[i].clone();
        let name = name.clone();
        async move {
            create_pod(
                &admin,
                &ns,
                PodSpecOpts {
                    name: &name,
                    service_account: "worker",
                    node: &node,
                    labels: &labels,
                    ip: Some(&ip),
                },
            )
            .await;
        }
    })
    .await;
    println!("created {PODS} pods in {:?}", started.elapsed());
    futures_for_each(&names, |_, name| {
        let admin = admin.clone();
        let ns = ns.clone();
        let name = name.clone();
        async move { delete_pod(&admin, &ns, &name).await }
    })
    .await;

    // Everything churned is gone from the store and from the node; the
    // steady workload kept its identity.
    println!("deleted them by {:?}", started.elapsed());
    let steady_before = identity_of(&agent.handles.state.borrow(), &ns, "steady-1");
    let state = wait_state(&agent, "no worker left on the node", |s| {
        !s.workloads
            .keys()
            .any(|(n, name)| n == &ns && name.starts_with("worker-"))
            && !s
                .ipcache
                .keys()
                .any(|c| c.starts_with("10.245.") && c != "10.245.255.1/32")
    })
    .await;
    assert_eq!(identity_of(&state, &ns, "steady-1"), steady_before);
    let stored = cp.cp.store().registry().await.expect("registry");
    assert!(
        !stored
            .workloads
            .iter()
            .any(|w| w.namespace == ns && w.name.starts_with("worker-")),
        "stale workloads in the store"
    );
    println!("the node converged by {:?}", started.elapsed());
    counter.abort();
    let (bytes, messages) = (bytes.load(Ordering::Relaxed), messages.load(Ordering::Relaxed));
    let changes = 2 * PODS;
    let per_change = bytes as f64 / changes as f64;
    println!(
        "pod churn: {changes} changes, {messages} sync messages, {bytes} bytes: {per_change:.0} bytes per change \
         (initial snapshot {snapshot_bytes} bytes)"
    );
    // Deltas, not snapshots: a change costs about one workload and one
    // ipcache entry, however many pods exist.
    assert!(per_change < 1024.0, "{per_change:.0} bytes per change");
}

/// Runs `f` over `items`, 16 at a time.
async fn futures_for_each<T, F, Fut>(items: &[T], f: F)
where
    F: Fn(usize, &T) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use futures::StreamExt;
    futures::stream::iter(items.iter().enumerate().map(|(i, t)| f(i, t)))
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
}

/// A cgroup named like a kubelet's for one pod (cgroupfs driver layout:
/// `kubepods/besteffort/pod<uid>/<container>`), removed on drop.
struct PodCgroup {
    dirs: Vec<std::path::PathBuf>,
    procs: std::path::PathBuf,
}

impl PodCgroup {
    /// In the first cgroup hierarchy here that accepts new groups: cgroup v2
    /// at /sys/fs/cgroup or /sys/fs/cgroup/unified, else v1's pids controller.
    fn create(uid: &str) -> Self {
        let roots = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/pids"];
        let root = roots
            .iter()
            .map(Path::new)
            .find(|r| r.join("cgroup.procs").exists())
            .expect("a writable cgroup hierarchy (the kubernetes tier runs as root)");
        let suffix = unique("t");
        let parts = [
            format!("kubepods-{suffix}"),
            "besteffort".to_string(),
            format!("pod{uid}"),
            "cri-containerd-0123456789abcdef".to_string(),
        ];
        let mut dirs = Vec::new();
        let mut path = root.to_path_buf();
        for p in parts {
            path.push(p);
            std::fs::create_dir(&path).unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
            dirs.push(path.clone());
        }
        Self {
            procs: path.join("cgroup.procs"),
            dirs,
        }
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

use std::path::Path;

/// Runs `node-agent svid fetch -o json` against `socket`, from inside the
/// pod's cgroup when given: the agent sees that process's pid.
fn fetch_svid(socket: &Path, cgroup: Option<&PodCgroup>) -> std::process::Output {
    let agent = keyway_tests::bin("node-agent");
    let mut script = String::new();
    if let Some(cg) = cgroup {
        script.push_str(&format!("echo $$ > '{}' && ", cg.procs.display()));
    }
    script.push_str(&format!(
        "exec '{}' svid fetch --socket '{}' -o json",
        agent.display(),
        socket.display()
    ));
    std::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .expect("run node-agent svid fetch")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workload_api_identifies_a_pods_processes_by_their_cgroup() {
    keyway_tests::netns::require_root();
    let k = cluster();
    let admin = k.admin().await;
    let ns = k.namespace("k8s-caller").await;
    let node = unique("node");
    create_node(&admin, &node).await;
    k.service_account(&ns, "billing").await;
    let pod = create_pod(
        &admin,
        &ns,
        PodSpecOpts {
            name: "billing-1",
            service_account: "billing",
            node: &node,
            labels: &[("app", "billing")],
            ip: Some("10.244.9.10"),
        },
    )
    .await;
    let uid = pod.metadata.uid.clone().expect("uid");
    let kcp = control_plane(&ns).await;
    let agent = Agent::start(&kcp.cp, &node, None).await;
    let id = format!("spiffe://example.org/ns/{ns}/sa/billing");
    agent.wait_for_svid(&id).await;

    // pid -> cgroup -> pod UID -> the pod from the sync -> its service account.
    let cgroup = PodCgroup::create(&uid);
    let out = fetch_svid(&agent.socket, Some(&cgroup));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&id),
        "a process in the pod's cgroup gets the pod's SVID: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A process outside any pod gets nothing, and is told why.
    let out = fetch_svid(&agent.socket, None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no identity issued"), "{stderr}");
    // Once the pod is deleted its own processes get nothing either.
    delete_pod(&admin, &ns, "billing-1").await;
    let mut svids = agent.handles.svids.clone();
    tokio::time::timeout(Duration::from_secs(10), svids.wait_for(|s| !s.contains_key(&id)))
        .await
        .expect("SVID revoked")
        .expect("agent running");
    let out = fetch_svid(&agent.socket, Some(&cgroup));
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}
