//! Two real `control-plane` processes as the chart runs them (`--kubernetes
//! --store kubernetes`), authenticated with a token of the chart's
//! control-plane service account and so limited to the RBAC the chart
//! grants. They race for the Lease; only the leader reconciles the registry;
//! every replica serves agents; and when the leader is killed the other
//! takes over without losing an identity or issuing anything twice.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use control_plane::crd::KeywayNetworkPolicy;
use control_plane::store::Store;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use keyway_identity::{TrustBundle, spiffe_id};
use keyway_tests::Binary;
use keyway_tests::helm;
use keyway_tests::http::{get, value};
use keyway_tests::kube::{PodSpecOpts, apply_object, apply_yaml, cluster, create_node, create_pod, unique};
use kube::api::Api;
use node_agent::control_plane::Attestation;
use serde_json::Value as Json;

const TD: &str = keyway_tests::TD;

/// Polls `f` (an API read) until it returns `Some`, for at most `secs`.
async fn poll<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn find<'a>(objs: &'a [Json], kind: &str) -> &'a Json {
    objs.iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("the chart renders no {kind}"))
}

/// The value after `flag` in a container's args.
fn arg(container: &Json, flag: &str) -> String {
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Json::as_str)
        .collect();
    let i = args
        .iter()
        .position(|a| *a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args[i + 1].to_string()
}

/// `control-plane identity list -o json` of one replica: spiffe id -> (id, workloads).
fn identities(cp: &Binary) -> BTreeMap<String, (u64, Vec<String>)> {
    cp.ok(&["identity", "list", "-o", "json"])
        .lines()
        .map(|l| {
            let v: Json = serde_json::from_str(l).expect("json line");
            let workloads = v["workloads"]
                .as_array()
                .map(|a| a.iter().filter_map(|w| w.as_str().map(str::to_string)).collect())
                .unwrap_or_default();
            (
                format!("{}|{}", v["spiffe_id"].as_str().unwrap_or_default(), v["labels"]),
                (v["id"].as_u64().unwrap_or_default(), workloads),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_with_only_the_charts_rbac_elect_one_writer_and_hand_over_without_loss() {
    let k = cluster();
    let admin = k.admin().await;
    let ns = k.namespace("k8s-ha").await;
    let release = unique("kw");

    // Install the chart's identities and RBAC for real (the workloads
    // themselves cannot run here: there is no kubelet).
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/keyway");
    let rendered = helm::render(&chart, &release, &ns, &serde_yaml::Value::Null).expect("render the chart");
    let objs: Vec<Json> = helm::objects(&rendered)
        .iter()
        .map(|o| serde_json::to_value(o).expect("json"))
        .collect();
    for o in &objs {
        let kind = o["kind"].as_str().unwrap_or_default();
        if [
            "CustomResourceDefinition",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
        ]
        .contains(&kind)
        {
            apply_object(&admin, o, &ns, false, "keyway-tests").await;
        }
    }
    let deployment = &find(&objs, "Deployment")["spec"]["template"]["spec"];
    let cp_sa = deployment["serviceAccountName"]
        .as_str()
        .expect("control plane SA")
        .to_string();
    let container = &deployment["containers"][0];
    let lease_name = arg(container, "--lease-name");
    let agent_sa_flag = arg(container, "--agent-service-account");
    let daemonset = &find(&objs, "DaemonSet")["spec"]["template"]["spec"];
    let agent_sa = daemonset["serviceAccountName"]
        .as_str()
        .expect("agent SA")
        .to_string();
    assert_eq!(agent_sa_flag, format!("{ns}/{agent_sa}"));

    // The control plane's credentials: a token of the chart's service account.
    let dir = tempfile::tempdir().expect("dir");
    let token = k.sa_token(&ns, &cp_sa, &[], None).await;
    let kubeconfig = k.kubeconfig_for_token(&token, dir.path());
    // Each replica's /metrics and /readyz, as the chart's probes read them.
    let metrics_of: BTreeMap<&str, String> = ["replica-1", "replica-2"]
        .into_iter()
        .map(|r| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            (r, l.local_addr().expect("addr").to_string())
        })
        .collect();
    let replica = |name: &str| {
        let data = dir.path().join(name);
        std::fs::create_dir_all(&data).expect("data dir");
        let extra = [
            "--metrics-address",
            &metrics_of[name],
            "--kubernetes",
            "--store",
            "kubernetes",
            "--namespace",
            &ns,
            "--holder-identity",
            name,
            "--lease-name",
            &lease_name,
            "--agent-service-account",
            &agent_sa_flag,
        ]
        .map(str::to_string);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        Binary::spawn_env(&data, &extra, &[("KUBECONFIG", kubeconfig.as_path())])
    };
    // Both start at once on an empty namespace: one creates the CA, the
    // other adopts it.
    let (r1, r2) = std::thread::scope(|s| {
        let a = s.spawn(|| replica("replica-1"));
        let b = s.spawn(|| replica("replica-2"));
        (a.join().expect("replica-1"), b.join().expect("replica-2"))
    });
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &ns);
    let holder = || {
        let leases = leases.clone();
        let lease_name = lease_name.clone();
        async move {
            leases
                .get_opt(&lease_name)
                .await
                .ok()
                .flatten()
                .and_then(|l| l.spec?.holder_identity)
                .filter(|h| !h.is_empty())
        }
    };
    let leader = poll(30, "a leader", holder).await;
    let (leader_bin, follower_bin, follower_name) = if leader == "replica-1" {
        (r1, r2, "replica-2")
    } else {
        (r2, r1, "replica-1")
    };
    assert_eq!(
        leader_bin.ok(&["bundle", "show"]),
        follower_bin.ok(&["bundle", "show"]),
        "both replicas serve the same CA"
    );
    // Both are ready (the chart's readiness probe: every replica serves
    // agents, leader or not), and say which one leads.
    let leader_gauge = |name: &str| {
        let (status, body) = get(&metrics_of[name], "/metrics");
        assert_eq!(status, 200, "{name} /metrics");
        value(&body, "keyway_is_leader")
    };
    poll(30, "both replicas to be ready", || async {
        metrics_of
            .values()
            .all(|a| get(a, "/readyz").0 == 200)
            .then_some(())
    })
    .await;
    poll(10, "keyway_is_leader to name the Lease holder", || async {
        (leader_gauge(&leader) == Some(1.0) && leader_gauge(follower_name) == Some(0.0)).then_some(())
    })
    .await;

    // Workloads in another namespace.
    let apps = k.namespace("k8s-ha-apps").await;
    let node = unique("node");
    create_node(&admin, &node).await;
    k.service_account(&apps, "web").await;
    for i in 0..5 {
        create_pod(
            &admin,
            &apps,
            PodSpecOpts {
                name: &format!("web-{i}"),
                service_account: "web",
                node: &node,
                labels: &[("app", "web"), ("tier", if i % 2 == 0 { "a" } else { "b" })],
                ip: Some(&format!("10.246.0.{}", i + 1)),
            },
        )
        .await;
    }
    let web = format!("spiffe://{TD}/ns/{apps}/sa/web");
    // The follower serves what the leader wrote.
    let count_web = |ids: &BTreeMap<String, (u64, Vec<String>)>| {
        ids.iter()
            .filter(|(k, _)| k.starts_with(&format!("{web}|")))
            .map(|(_, (_, w))| w.len())
            .sum::<usize>()
    };
    poll(30, "the follower to list the 5 web workloads", || async {
        (count_web(&identities(&follower_bin)) == 5).then_some(())
    })
    .await;
    let before = identities(&leader_bin);
    // Only the leader wrote the registry.
    let states: Api<ConfigMap> = Api::namespaced(admin.clone(), &ns);
    let writer = |states: Api<ConfigMap>| async move {
        states
            .get("keyway-state")
            .await
            .expect("keyway-state")
            .metadata
            .annotations
            .and_then(|a| a.get("keyway.dev/last-writer").cloned())
    };
    assert_eq!(writer(states.clone()).await.as_deref(), Some(leader.as_str()));

    // The chart's RBAC covers policy status and the bundle ConfigMap.
    apply_yaml::<KeywayNetworkPolicy>(
        &admin,
        &apps,
        "apiVersion: keyway.dev/v1alpha1\nkind: KeywayNetworkPolicy\nmetadata: { name: bad }\nspec:\n  endpointSelector: { matchExpressions: [{ key: app, operator: In }] }\n",
    )
    .await;
    let knps: Api<KeywayNetworkPolicy> = Api::namespaced(admin.clone(), &apps);
    poll(30, "the policy's status condition", || async {
        let p = knps.get("bad").await.ok()?;
        p.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Valid" && c.status == "False")
    })
    .await;
    let bundle_pem = poll(30, "the keyway-bundle ConfigMap", || async {
        states
            .get_opt("keyway-bundle")
            .await
            .ok()
            .flatten()?
            .data?
            .get("bundle.pem")
            .cloned()
    })
    .await;

    // Any replica serves agents: an agent pod's token attests through the
    // follower, trusting the published bundle.
    k.service_account(&apps, "unused").await;
    let agent_pod = create_pod(
        &admin,
        &ns,
        PodSpecOpts {
            name: "agent-0",
            service_account: &agent_sa,
            node: &node,
            labels: &[],
            ip: None,
        },
    )
    .await;
    let agent_token = k
        .sa_token(
            &ns,
            &agent_sa,
            &["keyway"],
            Some(("agent-0", agent_pod.metadata.uid.as_deref().expect("uid"))),
        )
        .await;
    let token_file = dir.path().join("agent-token");
    std::fs::write(&token_file, agent_token).expect("token");
    let td = spiffe_id::parse_trust_domain(TD).expect("td");
    let bundle = std::sync::Arc::new(TrustBundle::from_pem(td, &bundle_pem).expect("bundle"));
    let attested = node_agent::control_plane::attest(
        &follower_bin.listen,
        bundle.clone(),
        &node,
        &Attestation::KubernetesToken(token_file.clone()),
    )
    .await
    .expect("the follower attests an agent");
    assert_eq!(
        attested.svid.spiffe_id().to_string(),
        format!("spiffe://{TD}/keyway/node/{node}")
    );

    // Kill the leader (no release of the Lease): the follower takes over
    // once the Lease expires.
    let killed = Instant::now();
    leader_bin.kill9();
    poll(40, "the follower to take the Lease", || async {
        (holder().await.as_deref() == Some(follower_name)).then_some(())
    })
    .await;
    println!("leader killed -> follower leads after {:?}", killed.elapsed());
    poll(10, "the new leader's keyway_is_leader to turn 1", || async {
        (leader_gauge(follower_name) == Some(1.0)).then_some(())
    })
    .await;
    for i in 5..8 {
        create_pod(
            &admin,
            &apps,
            PodSpecOpts {
                name: &format!("web-{i}"),
                service_account: "web",
                node: &node,
                labels: &[("app", "web"), ("tier", "c")],
                ip: Some(&format!("10.246.0.{}", i + 1)),
            },
        )
        .await;
    }
    poll(30, "the new leader to reconcile the new pods", || async {
        (count_web(&identities(&follower_bin)) == 8).then_some(())
    })
    .await;
    assert_eq!(writer(states.clone()).await.as_deref(), Some(follower_name));
    let after = identities(&follower_bin);
    // Nothing lost: every identity keeps its number; no number is shared.
    for (key, (id, _)) in &before {
        assert_eq!(
            after.get(key).map(|v| v.0),
            Some(*id),
            "identity {key} changed across the leader change"
        );
    }
    let numbers: Vec<u64> = after.values().map(|v| v.0).collect();
    assert_eq!(
        numbers.len(),
        numbers.iter().collect::<HashSet<_>>().len(),
        "an identity number is shared"
    );

    // Nothing issued twice: every serial in the issuance log is unique.
    let reader = control_plane::store::KubeStore::open(admin.clone(), &ns, "test-reader")
        .await
        .expect("open the shared store");
    let log = reader.issuance_log().await.expect("issuance log");
    let serials: BTreeSet<&str> = log.iter().map(|r| r.serial.as_str()).collect();
    assert_eq!(
        serials.len(),
        log.len(),
        "a serial appears twice in the issuance log"
    );
    assert!(
        log.iter()
            .any(|r| r.spiffe_id == format!("spiffe://{TD}/keyway/node/{node}")),
        "the node SVID the follower issued is logged"
    );
    // And the new leader still serves agents.
    node_agent::control_plane::attest(
        &follower_bin.listen,
        bundle,
        &node,
        &Attestation::KubernetesToken(token_file),
    )
    .await
    .expect("the new leader attests");
}
