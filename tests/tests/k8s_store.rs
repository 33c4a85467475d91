//! The Kubernetes store and Lease leader election against a real
//! kube-apiserver: the `Store` contract as the sled store keeps it (CA
//! round trip, identity allocation as one object per identity, single-use
//! join tokens, node ids, the issuance log), two replicas writing at once
//! without losing or duplicating anything, the change signal between
//! replicas, and leader handover. Each test works in its own namespace.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use control_plane::ca::CaConfig;
use control_plane::kubernetes::leader::{LeaderConfig, LeaderElection};
use control_plane::model::{IdentityRecord, IssuanceRecord, JoinTokenRecord};
use control_plane::store::{KubeStore, RegistrySnapshot, Store, StoreError, TokenProblem};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use keyway_tests::kube::cluster;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(15);

async fn open(ns: &str, writer: &str) -> KubeStore {
    KubeStore::open(cluster().admin().await, ns, writer)
        .await
        .unwrap_or_else(|e| panic!("open the Kubernetes store in {ns} as {writer}: {e}"))
}

/// The identity of pods under service account `name` labelled `app: name`.
fn identity(name: &str) -> IdentityRecord {
    IdentityRecord {
        id: 0,
        spiffe_id: format!("spiffe://example.org/ns/default/sa/{name}"),
        namespace: "default".into(),
        service_account: name.into(),
        labels: BTreeMap::from([("app".to_string(), name.to_string())]),
    }
}

fn id_of(reg: &RegistrySnapshot, sa: &str) -> Option<u32> {
    reg.identities
        .iter()
        .find(|i| i.service_account == sa)
        .map(|i| i.id)
}

/// The identity objects in `ns`, by name.
async fn identity_objects(ns: &str) -> BTreeMap<String, ConfigMap> {
    Api::<ConfigMap>::namespaced(cluster().admin().await, ns)
        .list(&ListParams::default().labels("keyway.dev/component=identity"))
        .await
        .expect("list identity objects")
        .items
        .into_iter()
        .map(|cm| (cm.metadata.name.clone().unwrap_or_default(), cm))
        .collect()
}

fn issued(serial: &str, spiffe_id: &str) -> IssuanceRecord {
    IssuanceRecord {
        serial: serial.into(),
        spiffe_id: spiffe_id.into(),
        requester: "test".into(),
        ca_id: "ca-1".into(),
        issued_at: 1,
        not_after: 2,
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

async fn state_configmap(ns: &str) -> ConfigMap {
    let api: Api<ConfigMap> = Api::namespaced(cluster().admin().await, ns);
    api.get("keyway-state").await.expect("ConfigMap keyway-state")
}

fn annotation(cm: &ConfigMap, key: &str) -> String {
    cm.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .cloned()
        .unwrap_or_default()
}

/// Every serial in the log, asserting each appears once.
async fn serials_once(store: &KubeStore) -> HashSet<String> {
    let log = store.issuance_log().await.expect("issuance log");
    let mut seen = HashSet::new();
    for r in &log {
        assert!(
            seen.insert(r.serial.clone()),
            "serial {} is in the log twice",
            r.serial
        );
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn ca_state_round_trips_through_the_secret_and_only_the_secret() {
    let ns = cluster().namespace("store-ca").await;
    let store = open(&ns, "replica-a").await;
    assert!(
        store.load_ca().await.expect("load").is_none(),
        "a new namespace has no CA"
    );

    let cfg = CaConfig {
        trust_domain: keyway_tests::trust_domain(),
        ca_ttl: Duration::from_secs(86400),
        upstream: None,
    };
    let state = control_plane::ca::initial_state(&cfg, now()).expect("CA");
    store.save_ca(&state).await.expect("save");
    let loaded = store.load_ca().await.expect("load").expect("a CA");
    assert_eq!(
        serde_json::to_value(&loaded).unwrap(),
        serde_json::to_value(&state).unwrap()
    );

    // The Secret holds it; no ConfigMap holds any key material.
    let client = cluster().admin().await;
    let secret = Api::<Secret>::namespaced(client.clone(), &ns)
        .get("keyway-ca")
        .await
        .expect("Secret keyway-ca");
    assert_eq!(secret.type_.as_deref(), Some("Opaque"));
    let labels = secret.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("app.kubernetes.io/managed-by").map(String::as_str),
        Some("keyway")
    );
    let raw = &secret.data.as_ref().expect("data")["ca.json"].0;
    let in_secret: serde_json::Value = serde_json::from_slice(raw).expect("ca.json is JSON");
    assert_eq!(in_secret, serde_json::to_value(&state).unwrap());
    let keys: Vec<String> = state
        .authorities
        .iter()
        .flat_map(|a| {
            [
                STANDARD.encode(&a.key_pkcs8.0),
                STANDARD.encode(&a.jwt_key_pkcs8.0),
            ]
        })
        .collect();
    store
        .allocate_identities(&[identity("a")])
        .await
        .expect("allocate");
    let configmaps = Api::<ConfigMap>::namespaced(client, &ns)
        .list(&ListParams::default())
        .await
        .expect("list configmaps");
    assert!(!configmaps.items.is_empty());
    for cm in &configmaps.items {
        let text = serde_json::to_string(&cm.data).unwrap();
        for key in &keys {
            assert!(
                !text.contains(key.as_str()),
                "ConfigMap {:?} holds key material",
                cm.metadata.name
            );
        }
    }

    // A second replica that read the CA before a rotation cannot overwrite it.
    let other = open(&ns, "replica-b").await;
    other.load_ca().await.expect("load").expect("a CA");
    let mut rotated = state.clone();
    rotated.bundle_sequence += 1;
    store.save_ca(&rotated).await.expect("rotate");
    let mut stale = state.clone();
    stale.bundle_sequence += 5;
    match other.save_ca(&stale).await {
        Err(StoreError::Backend { message: m, .. }) => {
            assert!(m.contains("another replica changed the CA"), "{m}")
        }
        other => panic!("a stale CA write must be refused, got {other:?}"),
    }
    let now_stored = other.load_ca().await.expect("load").expect("a CA");
    assert_eq!(now_stored.bundle_sequence, rotated.bundle_sequence);
    // Having reloaded, it may write.
    other.save_ca(&stale).await.expect("save after reload");
}

#[tokio::test(flavor = "multi_thread")]
async fn identities_are_objects_of_their_own_from_256_and_never_reused() {
    let ns = cluster().namespace("store-ids").await;
    let store = open(&ns, "replica-a").await;
    let state_before = state_configmap(&ns).await;
    let got = store
        .allocate_identities(&[identity("a"), identity("b"), identity("a")])
        .await
        .expect("allocate");
    assert_eq!(
        got.iter().map(|i| i.id).collect::<Vec<_>>(),
        vec![256, 257, 256],
        "in order, the same identity asked twice gets one number"
    );
    let objects = identity_objects(&ns).await;
    assert_eq!(
        objects.keys().cloned().collect::<Vec<_>>(),
        vec!["keyway-identity-256", "keyway-identity-257"]
    );
    assert_eq!(
        annotation(&objects["keyway-identity-256"], "keyway.dev/last-writer"),
        "replica-a"
    );
    let state = state_configmap(&ns).await;
    let json = &state.data.as_ref().expect("data")["state.json"];
    assert!(
        !json.contains("spiffe://"),
        "no identity (and no pod) is copied into the state: {json}"
    );
    assert_ne!(
        state.metadata.resource_version, state_before.metadata.resource_version,
        "a block of numbers was reserved"
    );

    // Known identities cost no write at all.
    let before = (
        state_configmap(&ns).await.metadata.resource_version,
        objects.len(),
    );
    let again = store
        .allocate_identities(&[identity("b"), identity("a")])
        .await
        .expect("allocate");
    assert_eq!(again.iter().map(|i| i.id).collect::<Vec<_>>(), vec![257, 256]);
    assert_eq!(
        (
            state_configmap(&ns).await.metadata.resource_version,
            identity_objects(&ns).await.len()
        ),
        before,
        "allocating known identities must not write"
    );

    // A forgotten identity's object goes; its number is never handed out
    // again, also not by a replica opened afterwards.
    assert_eq!(store.forget_identities(&[256]).await.expect("forget"), 1);
    assert!(!identity_objects(&ns).await.contains_key("keyway-identity-256"));
    let other = open(&ns, "replica-b").await;
    let reg = other.registry().await.expect("registry");
    assert_eq!((id_of(&reg, "a"), id_of(&reg, "b")), (None, Some(257)));
    let c = other
        .allocate_identities(&[identity("c"), identity("a")])
        .await
        .expect("allocate");
    assert!(
        c.iter().all(|i| i.id > 257),
        "numbers below the stored counter are never reused: {c:?}"
    );
}

/// The `Store` contract (tests/support/store_contract.rs), the same suite
/// the sled store passes, on the Kubernetes store.
#[tokio::test(flavor = "multi_thread")]
async fn the_store_contract_holds_for_the_kubernetes_store() {
    let ns = cluster().namespace("store-contract").await;
    let store = open(&ns, "replica-a").await;
    keyway_tests::store_contract::run(&store).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn join_tokens_are_single_use_and_nodes_keep_their_id() {
    let ns = cluster().namespace("store-nodes").await;
    let store = open(&ns, "replica-a").await;
    let token = control_plane::tokens::generate().expect("token");
    let hash = control_plane::tokens::hash(&token);
    let record = |node: &str, expires_at| JoinTokenRecord {
        node: node.into(),
        created_at: now(),
        expires_at,
        consumed_at: None,
    };
    store
        .put_join_token(&hash, &record("node-a", now() + 600))
        .await
        .expect("put token");
    let expired = control_plane::tokens::hash("kw1.expired");
    store
        .put_join_token(&expired, &record("node-a", now() - 1))
        .await
        .expect("put token");
    // One object per token, named after its hash; the token itself is
    // stored nowhere.
    let all = Api::<ConfigMap>::namespaced(cluster().admin().await, &ns)
        .list(&ListParams::default())
        .await
        .expect("list");
    let hash_hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        all.items
            .iter()
            .any(|cm| cm.metadata.name.as_deref() == Some(format!("keyway-join-token-{hash_hex}").as_str()))
    );
    let stored = serde_json::to_string(&all.items).unwrap();
    assert!(!stored.contains(&token), "the token itself must not be stored");

    let refused = |r: Result<_, StoreError>| match r {
        Err(StoreError::TokenRefused(p)) => p,
        other => panic!("expected a refused token, got {other:?}"),
    };
    let svid = |serial: &str| issued(serial, "spiffe://example.org/keyway/node/node-a");
    let unknown = control_plane::tokens::hash("kw1.never-created");
    assert_eq!(
        refused(
            store
                .consume_join_token(&unknown, "node-a", now(), 7, &svid("01"))
                .await
        ),
        TokenProblem::Unknown
    );
    assert_eq!(
        refused(
            store
                .consume_join_token(&expired, "node-a", now(), 7, &svid("02"))
                .await
        ),
        TokenProblem::Expired
    );
    assert_eq!(
        refused(
            store
                .consume_join_token(&hash, "node-b", now(), 7, &svid("03"))
                .await
        ),
        TokenProblem::WrongNode
    );
    let node = store
        .consume_join_token(&hash, "node-a", now(), 7, &svid("04"))
        .await
        .expect("attest");
    assert_eq!(node.node_id, 1);
    assert_eq!(
        refused(
            store
                .consume_join_token(&hash, "node-a", now(), 7, &svid("05"))
                .await
        ),
        TokenProblem::Consumed
    );

    // Attestation without a token (service account tokens) keeps the node id.
    let again = store
        .register_node("node-a", now(), 7, &svid("06"))
        .await
        .expect("register");
    assert_eq!(again.node_id, 1);
    let other = store
        .register_node(
            "node-b",
            now(),
            8,
            &issued("07", "spiffe://example.org/keyway/node/node-b"),
        )
        .await
        .expect("register");
    assert_eq!(other.node_id, 2);
    let addrs = vec!["10.0.0.1:4250".to_string()];
    assert_eq!(
        store.set_node_addresses("node-a", addrs.clone()).await.unwrap(),
        Some(true)
    );
    assert_eq!(
        store.set_node_addresses("node-a", addrs.clone()).await.unwrap(),
        Some(false)
    );
    assert_eq!(store.set_node_addresses("node-z", addrs).await.unwrap(), None);

    // Exactly the node SVIDs of successful attestations are logged, once each.
    let serials = serials_once(&store).await;
    assert_eq!(serials, HashSet::from(["04".into(), "06".into(), "07".into()]));
    let reg = store.registry().await.expect("registry");
    assert_eq!(
        reg.nodes
            .iter()
            .map(|n| (n.name.as_str(), n.node_id))
            .collect::<Vec<_>>(),
        vec![("node-a", 1), ("node-b", 2)]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_issuance_log_records_everything_once_across_chunks() {
    let ns = cluster().namespace("store-log").await;
    let store = Arc::new(open(&ns, "replica-a").await);
    // Enough records, sized like real ones (a 20-byte serial in hex, a
    // node requester, real times: about 250 bytes), to fill more than one
    // 512 KiB chunk.
    let total = 3000;
    let record = |i: usize| IssuanceRecord {
        serial: format!("{i:040x}"),
        spiffe_id: "spiffe://example.org/ns/default/sa/a-service-account".into(),
        requester: "node-a".into(),
        ca_id: "3f2a9c0d1e7b4a55".into(),
        issued_at: now(),
        not_after: now() + 3600,
    };
    let mut tasks = Vec::new();
    for i in 0..total {
        let store = store.clone();
        let r = record(i);
        tasks.push(tokio::spawn(async move { store.log_issuance(&r).await }));
    }
    for t in tasks {
        t.await.expect("task").expect("log issuance");
    }
    // A write retried (the caller saw an error) is not recorded twice.
    store.log_issuance(&record(total)).await.expect("log");
    store.log_issuance(&record(total)).await.expect("log again");
    assert_eq!(serials_once(&store).await.len(), total + 1);

    // In storage too: each serial in exactly one chunk, chunks within the limit.
    let chunks = Api::<ConfigMap>::namespaced(cluster().admin().await, &ns)
        .list(&ListParams::default().labels("keyway.dev/component=issuance-log"))
        .await
        .expect("list chunks");
    assert!(chunks.items.len() >= 2, "{} chunk(s)", chunks.items.len());
    let mut stored = 0;
    for chunk in &chunks.items {
        let data = chunk.data.clone().unwrap_or_default();
        stored += data.len();
        let size: usize = data.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(
            size <= 512 * 1024,
            "chunk {:?} holds {size} bytes",
            chunk.metadata.name
        );
    }
    assert_eq!(stored, total + 1);
    // A replica opened later appends to the newest chunk and reads them all.
    let later = open(&ns, "replica-b").await;
    later
        .log_issuance(&issued("ffffff", "spiffe://example.org/ns/default/sa/late"))
        .await
        .expect("log");
    assert_eq!(serials_once(&later).await.len(), total + 2);
}

/// Rewrites `pending_issuance` in state.json as a format-2 replica that
/// crashed mid-attestation would have left it.
async fn set_pending(ns: &str, records: &[IssuanceRecord]) {
    let api: Api<ConfigMap> = Api::namespaced(cluster().admin().await, ns);
    let mut cm = api.get("keyway-state").await.expect("state");
    let data = cm.data.as_mut().expect("data");
    let mut state: serde_json::Value = serde_json::from_str(&data["state.json"]).expect("state.json");
    state["pending_issuance"] = records
        .iter()
        .map(|r| (r.serial.clone(), serde_json::to_value(r).unwrap()))
        .collect::<serde_json::Map<_, _>>()
        .into();
    data.insert("state.json".into(), state.to_string());
    api.replace("keyway-state", &PostParams::default(), &cm)
        .await
        .expect("rewrite state");
}

#[tokio::test(flavor = "multi_thread")]
async fn node_svids_left_pending_by_a_crash_are_logged_once() {
    let ns = cluster().namespace("store-crash").await;
    let a = open(&ns, "replica-a").await;
    let node_svid = |serial: &str| issued(serial, "spiffe://example.org/keyway/node/node-a");
    a.register_node("node-a", now(), 7, &node_svid("0a"))
        .await
        .expect("register");
    // A crash after the record reached the log but before it left pending
    // (0a), and one right after the attestation was written (0b).
    set_pending(&ns, &[node_svid("0a"), node_svid("0b")]).await;
    assert_eq!(
        serials_once(&a).await,
        HashSet::from(["0a".to_string(), "0b".to_string()])
    );

    // The next replica to start moves them; each is stored once.
    let b = open(&ns, "replica-b").await;
    assert_eq!(
        serials_once(&b).await,
        HashSet::from(["0a".to_string(), "0b".to_string()])
    );
    let cm = state_configmap(&ns).await;
    let state: serde_json::Value =
        serde_json::from_str(&cm.data.as_ref().expect("data")["state.json"]).expect("state.json");
    assert!(
        state
            .get("pending_issuance")
            .is_none_or(|p| p == &serde_json::json!({})),
        "nothing left pending: {state}"
    );
    let chunks = Api::<ConfigMap>::namespaced(cluster().admin().await, &ns)
        .list(&ListParams::default().labels("keyway.dev/component=issuance-log"))
        .await
        .expect("list chunks");
    let stored: usize = chunks
        .items
        .iter()
        .map(|c| c.data.as_ref().map_or(0, |d| d.len()))
        .sum();
    assert_eq!(stored, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_writing_at_once_lose_nothing_and_never_share_an_identity() {
    let ns = cluster().namespace("store-replicas").await;
    let a = Arc::new(open(&ns, "replica-a").await);
    let b = Arc::new(open(&ns, "replica-b").await);
    let per_replica = 15;
    let issuances = 60;
    let mut tasks = Vec::new();
    for (store, prefix) in [(a.clone(), "a"), (b.clone(), "b")] {
        // Applies, one after another per replica, racing the other replica.
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_replica {
                // Every identity is asked for by both replicas.
                let wanted = [identity(&format!("w-{i}")), identity(&format!("{prefix}-{i}"))];
                s.allocate_identities(&wanted).await.map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        }));
        // Issuances, all at once.
        for i in 0..issuances {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.log_issuance(&issued(
                    &format!("{prefix}{i:04}"),
                    "spiffe://example.org/ns/default/sa/x",
                ))
                .await
                .map_err(|e| e.to_string())
            }));
        }
        // Attestations, which touch the state and the log together.
        for i in 0..3 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                let node = format!("node-{prefix}-{i}");
                let svid = issued(
                    &format!("node-{prefix}-{i}"),
                    &format!("spiffe://example.org/keyway/node/{node}"),
                );
                s.register_node(&node, now(), 7, &svid)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }));
        }
    }
    for t in tasks {
        t.await.expect("task").expect("every write succeeds");
    }

    for store in [&a, &b] {
        // The other replica's objects reach this one through its watch.
        let deadline = Instant::now() + WAIT;
        let objects = identity_objects(&ns).await;
        let reg = loop {
            let reg = store.registry().await.expect("registry");
            let all_there = reg.identities.len() >= objects.len() && reg.nodes.len() >= 6;
            if all_there || Instant::now() > deadline {
                break reg;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Each replica knows every identity object, and no number stands
        // for two identities (objects are create-if-absent).
        let accounts: HashSet<&str> = reg
            .identities
            .iter()
            .map(|i| i.service_account.as_str())
            .collect();
        assert_eq!(accounts.len(), 3 * per_replica, "no identity lost");
        assert_eq!(
            reg.identities.len(),
            objects.len(),
            "every object is in the registry"
        );
        let ids: HashSet<u32> = reg.identities.iter().map(|i| i.id).collect();
        assert_eq!(ids.len(), reg.identities.len(), "a number was handed out twice");
        for obj in objects.values() {
            let rec: IdentityRecord =
                serde_json::from_str(&obj.data.as_ref().expect("data")["identity.json"]).expect("record");
            assert_eq!(
                obj.metadata.name.as_deref(),
                Some(format!("keyway-identity-{}", rec.id).as_str())
            );
        }
        // Racing replicas may both have created "w-i" (lowest number wins);
        // the extra objects are in the registry unused, and the identity GC
        // collects them.
        assert!(
            objects.len() >= 3 * per_replica && objects.len() <= 4 * per_replica,
            "{}",
            objects.len()
        );
        let node_ids: HashSet<u16> = reg.nodes.iter().map(|n| n.node_id).collect();
        assert_eq!((reg.nodes.len(), node_ids.len()), (6, 6), "node ids are unique");
        assert_eq!(serials_once(store).await.len(), 2 * (issuances + 3));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_hears_of_the_other_replicas_writes() {
    let ns = cluster().namespace("store-changes").await;
    let a = open(&ns, "replica-a").await;
    let b = open(&ns, "replica-b").await;
    let mut changes = b.subscribe_changes().expect("a shared store reports changes");

    a.allocate_identities(&[identity("from-a")])
        .await
        .expect("allocate");
    // The counter write and the identity object each signal; the object
    // may come second.
    loop {
        tokio::time::timeout(WAIT, changes.changed())
            .await
            .expect("replica b is told of replica a's allocation")
            .expect("store alive");
        let reg = b.registry().await.expect("registry");
        if id_of(&reg, "from-a").is_some() {
            break;
        }
    }
    assert_eq!(
        annotation(&state_configmap(&ns).await, "keyway.dev/last-writer"),
        "replica-a"
    );

    // Node records too, and what they carry.
    changes.borrow_and_update();
    a.register_node(
        "node-from-a",
        now(),
        7,
        &issued("0c", "spiffe://example.org/keyway/node/node-from-a"),
    )
    .await
    .expect("register");
    a.set_node_addresses("node-from-a", vec!["10.0.0.9:4250".into()])
        .await
        .expect("addresses");
    let deadline = Instant::now() + WAIT;
    loop {
        tokio::time::timeout(WAIT, changes.changed())
            .await
            .expect("replica b is told of replica a's node")
            .expect("store alive");
        let reg = b.registry().await.expect("registry");
        let seen = reg.nodes.iter().find(|n| n.name == "node-from-a");
        if seen.is_some_and(|n| n.addresses == ["10.0.0.9:4250"]) {
            break;
        }
        assert!(Instant::now() < deadline, "{:?}", reg.nodes);
    }

    // CA changes too.
    changes.borrow_and_update();
    let cfg = CaConfig {
        trust_domain: keyway_tests::trust_domain(),
        ca_ttl: Duration::from_secs(86400),
        upstream: None,
    };
    a.load_ca().await.expect("load");
    a.save_ca(&control_plane::ca::initial_state(&cfg, now()).expect("CA"))
        .await
        .expect("save");
    tokio::time::timeout(WAIT, changes.changed())
        .await
        .expect("replica b is told of replica a's CA write")
        .expect("store alive");
    assert!(b.load_ca().await.expect("load").is_some());
}

/// `keyway-state` as a format-2 replica left it: node records, join
/// tokens (one consumed) and the counters inside.
async fn write_format_2_state(ns: &str, token_hashes: [&str; 2]) {
    let state = serde_json::json!({
        "format": 2,
        "revision": 9,
        "next_identity": 300,
        "next_node_id": 8,
        "nodes": {
            "node-a": {"name": "node-a", "node_id": 3, "attested_at": 1, "registration": 11,
                       "addresses": ["10.0.0.3:4250"]},
            "node-b": {"name": "node-b", "node_id": 7, "attested_at": 1, "registration": 12}
        },
        "join_tokens": {
            token_hashes[0]: {"node": "node-a", "created_at": 1, "expires_at": now() + 600, "consumed_at": 2},
            token_hashes[1]: {"node": "node-c", "created_at": 1, "expires_at": now() + 600}
        }
    });
    write_state(ns, &state).await;
}

/// Creates `keyway-state` holding `state` as its `state.json`, as a replica
/// of some format left it.
async fn write_state(ns: &str, state: &serde_json::Value) {
    let api: Api<ConfigMap> = Api::namespaced(cluster().admin().await, ns);
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("keyway-state".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("state.json".to_string(), state.to_string())])),
        ..Default::default()
    };
    api.create(&PostParams::default(), &cm)
        .await
        .expect("write the state");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_format_2_state_migrates_nodes_and_tokens_to_objects_keeping_ids_and_spent_tokens() {
    let ns = cluster().namespace("store-migrate").await;
    let spent = control_plane::tokens::hash("kw1.spent");
    let fresh = control_plane::tokens::hash("kw1.fresh");
    let hex = |h: &[u8]| h.iter().map(|b| format!("{b:02x}")).collect::<String>();
    write_format_2_state(&ns, [&hex(&spent), &hex(&fresh)]).await;
    let store = open(&ns, "replica-a").await;

    let reg = store.registry().await.expect("registry");
    assert_eq!(
        reg.nodes
            .iter()
            .map(|n| (n.name.as_str(), n.node_id, n.registration, n.addresses.clone()))
            .collect::<Vec<_>>(),
        vec![
            ("node-a", 3, 11, vec!["10.0.0.3:4250".to_string()]),
            ("node-b", 7, 12, vec![])
        ]
    );
    let svid = |s: &str| issued(s, "spiffe://example.org/keyway/node/node-x");
    assert!(
        matches!(
            store
                .consume_join_token(&spent, "node-a", now(), 1, &svid("1a"))
                .await,
            Err(StoreError::TokenRefused(TokenProblem::Consumed))
        ),
        "a token spent before the migration stays spent"
    );
    let c = store
        .consume_join_token(&fresh, "node-c", now(), 13, &svid("1b"))
        .await
        .expect("an unspent token still attests");
    assert_eq!(c.node_id, 8, "the node id counter is kept");

    let cm = state_configmap(&ns).await;
    let state: serde_json::Value =
        serde_json::from_str(&cm.data.as_ref().expect("data")["state.json"]).expect("state.json");
    assert_eq!(state["format"], 3);
    assert!(
        state.get("nodes").is_none() && state.get("join_tokens").is_none(),
        "{state}"
    );
    let objects = Api::<ConfigMap>::namespaced(cluster().admin().await, &ns)
        .list(&ListParams::default().labels("keyway.dev/component=node"))
        .await
        .expect("list");
    assert_eq!(objects.items.len(), 3, "node-a, node-b and node-c");

    // A second replica opening the migrated state finds it as it is.
    let b = open(&ns, "replica-b").await;
    assert_eq!(b.registry().await.expect("registry").nodes.len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_migration_left_by_a_crashed_replica_is_taken_over_and_finished() {
    let ns = cluster().namespace("store-takeover").await;
    // Frozen by a replica that died 20 minutes ago, before copying anything.
    let state = serde_json::json!({
        "format": 3,
        "migration": {"by": "replica-gone", "since": now() - 1200},
        "next_node_id": 5,
        "nodes": {"node-a": {"name": "node-a", "node_id": 4, "attested_at": 1, "registration": 11}}
    });
    write_state(&ns, &state).await;
    let store = open(&ns, "replica-a").await;
    let reg = store.registry().await.expect("registry");
    assert_eq!(
        reg.nodes
            .iter()
            .map(|n| (n.name.as_str(), n.node_id))
            .collect::<Vec<_>>(),
        vec![("node-a", 4)]
    );
    let state: serde_json::Value =
        serde_json::from_str(&state_configmap(&ns).await.data.as_ref().expect("data")["state.json"])
            .expect("state.json");
    assert!(
        state.get("migration").is_none() && state.get("nodes").is_none(),
        "{state}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registration_revoked_on_one_replica_is_not_recreated_by_another() {
    let ns = cluster().namespace("store-revoked").await;
    let a = open(&ns, "replica-a").await;
    let b = open(&ns, "replica-b").await;
    let svid = |s: &str| issued(s, "spiffe://example.org/keyway/node/node-a");
    a.register_node("node-a", now(), 7, &svid("3a"))
        .await
        .expect("register");
    let deadline = Instant::now() + WAIT;
    let mut changes = b.subscribe_changes().expect("changes");
    while !b
        .registry()
        .await
        .expect("registry")
        .nodes
        .iter()
        .any(|n| n.name == "node-a")
    {
        assert!(Instant::now() < deadline, "replica b never saw node-a");
        let _ = tokio::time::timeout(WAIT, changes.changed()).await;
    }
    assert!(a.revoke_node("node-a").await.expect("revoke"));
    // Replica b's caller still holds registration 7 (its view lags, or has
    // just caught up): an SVID signed with it must not bring it back.
    let refused = b.register_node("node-a", now(), 7, &svid("3b")).await;
    assert!(
        matches!(&refused, Err(StoreError::Backend { message: m, .. }) if m.contains("revoked")),
        "{refused:?}"
    );
    let fresh = b
        .register_node("node-a", now(), 8, &svid("3c"))
        .await
        .expect("a new registration");
    assert_eq!(fresh.registration, 8);
    assert!(
        !serials_once(&b).await.contains("3b"),
        "the refused SVID is not logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_state_is_recreated_past_every_number_in_use() {
    let ns = cluster().namespace("store-restore").await;
    {
        let store = open(&ns, "replica-a").await;
        store
            .allocate_identities(&[identity("one"), identity("two")])
            .await
            .expect("allocate");
        store
            .register_node(
                "node-a",
                now(),
                7,
                &issued("2a", "spiffe://example.org/keyway/node/node-a"),
            )
            .await
            .expect("register");
    }
    Api::<ConfigMap>::namespaced(cluster().admin().await, &ns)
        .delete("keyway-state", &DeleteParams::default())
        .await
        .expect("delete the state");
    let store = open(&ns, "replica-b").await;
    let before = store.registry().await.expect("registry");
    let taken: HashSet<u32> = before.identities.iter().map(|i| i.id).collect();
    let new = store
        .allocate_identities(&[identity("three")])
        .await
        .expect("allocate");
    assert!(
        !taken.contains(&new[0].id),
        "identity {} handed out twice",
        new[0].id
    );
    let b = store
        .register_node(
            "node-b",
            now(),
            8,
            &issued("2b", "spiffe://example.org/keyway/node/node-b"),
        )
        .await
        .expect("register");
    assert!(
        before.nodes.iter().all(|n| n.node_id != b.node_id),
        "node id {} handed out twice",
        b.node_id
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_permissions_are_reported_with_what_to_fix() {
    let ns = cluster().namespace("store-rbac").await;
    cluster().service_account(&ns, "no-rights").await;
    let token = cluster().sa_token(&ns, "no-rights", &[], None).await;
    let client = cluster().client_with_token(&token).await;
    match KubeStore::open(client, &ns, "replica-a").await {
        Err(StoreError::Backend { message: m, .. }) => assert!(
            m.contains(&format!("cannot list configmaps in namespace {ns}")) && m.contains("Role"),
            "{m}"
        ),
        Err(e) => panic!("expected a backend error, got {e}"),
        Ok(_) => panic!("a service account without rights opened the store"),
    }
}

// ---- leader election --------------------------------------------------------

const LEASE: &str = "keyway-control-plane";

fn fast() -> LeaderConfig {
    LeaderConfig {
        lease_duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_millis(500),
    }
}

/// One candidate: its leadership signal, what stops it, and its task.
struct Candidate {
    leading: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn candidate(client: kube::Client, ns: &str, name: &str) -> Candidate {
    let election = LeaderElection::new(client, ns, LEASE, name, fast());
    let leading = election.subscribe();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(election.run(rx));
    Candidate { leading, stop, task }
}

/// Polls both signals until `done` holds, failing if both ever lead at once.
async fn watch_leaders(
    a: &Candidate,
    b: &Candidate,
    deadline: Duration,
    what: &str,
    done: impl Fn(bool, bool) -> bool,
) {
    let start = Instant::now();
    loop {
        let (la, lb) = (*a.leading.borrow(), *b.leading.borrow());
        assert!(!(la && lb), "two leaders at once while waiting for {what}");
        if done(la, lb) {
            return;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn holder(ns: &str) -> Option<String> {
    let lease = Api::<Lease>::namespaced(cluster().admin().await, ns)
        .get(LEASE)
        .await
        .expect("the Lease exists");
    lease
        .spec
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
}

#[tokio::test(flavor = "multi_thread")]
async fn one_leader_at_a_time_and_a_fast_handover_on_shutdown() {
    let ns = cluster().namespace("leader").await;
    let admin = cluster().admin().await;
    let a = candidate(admin.clone(), &ns, "replica-a");
    let b = candidate(admin, &ns, "replica-b");

    watch_leaders(&a, &b, WAIT, "a leader", |la, lb| la || lb).await;
    // Steady state over two lease durations: exactly one, always the same.
    let a_leads = *a.leading.borrow();
    let steady = Instant::now();
    while steady.elapsed() < 2 * fast().lease_duration {
        let (la, lb) = (*a.leading.borrow(), *b.leading.borrow());
        assert_eq!(
            (la, lb),
            (a_leads, !a_leads),
            "leadership must stay put while the leader renews"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (leader, follower, leader_name, follower_name) = if a_leads {
        (a, b, "replica-a", "replica-b")
    } else {
        (b, a, "replica-b", "replica-a")
    };
    assert_eq!(holder(&ns).await.as_deref(), Some(leader_name));

    // Shutdown releases the Lease: the follower takes over well before the
    // lease would have expired (at least 2.4 s after the last renewal it saw).
    let stopped = Instant::now();
    leader.stop.send_replace(true);
    watch_leaders(&leader, &follower, WAIT, "the handover", |la, lb| !la && lb).await;
    let handover = stopped.elapsed();
    assert!(handover < Duration::from_secs(2), "handover took {handover:?}");
    tokio::time::timeout(WAIT, leader.task)
        .await
        .expect("the stopped candidate ends")
        .expect("task");
    assert_eq!(holder(&ns).await.as_deref(), Some(follower_name));

    follower.stop.send_replace(true);
    tokio::time::timeout(WAIT, follower.task)
        .await
        .expect("the last candidate ends")
        .expect("task");
    assert_eq!(holder(&ns).await, None, "the last leader released the Lease");
}

/// A client for a fresh service account allowed to use Leases in `ns`, and
/// the RoleBinding that allows it (delete it to cut the client off).
async fn lease_client(ns: &str, sa: &str) -> (kube::Client, String) {
    let admin = cluster().admin().await;
    Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: ObjectMeta {
                    name: Some(sa.into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .expect("service account");
    let role = Role {
        metadata: ObjectMeta {
            name: Some("leases".into()),
            ..Default::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["coordination.k8s.io".into()]),
            resources: Some(vec!["leases".into()]),
            verbs: vec!["get".into(), "create".into(), "update".into()],
            ..Default::default()
        }]),
    };
    match Api::<Role>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &role)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.is_already_exists() => {}
        Err(e) => panic!("role: {e}"),
    }
    let binding = format!("leases-{sa}");
    Api::<RoleBinding>::namespaced(admin, ns)
        .create(
            &PostParams::default(),
            &RoleBinding {
                metadata: ObjectMeta {
                    name: Some(binding.clone()),
                    ..Default::default()
                },
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "Role".into(),
                    name: "leases".into(),
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".into(),
                    name: sa.into(),
                    namespace: Some(ns.into()),
                    ..Default::default()
                }]),
            },
        )
        .await
        .expect("role binding");
    let token = cluster().sa_token(ns, sa, &[], None).await;
    (cluster().client_with_token(&token).await, binding)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_that_cannot_renew_steps_down_before_another_takes_over() {
    let ns = cluster().namespace("leader-cut").await;
    let (client_a, binding_a) = lease_client(&ns, "replica-a").await;
    let a = candidate(client_a, &ns, "replica-a");
    let mut leading = a.leading.clone();
    tokio::time::timeout(WAIT, leading.wait_for(|l| *l))
        .await
        .expect("replica a leads")
        .expect("candidate running");
    let (client_b, _) = lease_client(&ns, "replica-b").await;
    let b = candidate(client_b, &ns, "replica-b");

    // Replica a loses its permission to renew (as if partitioned away).
    let cut = Instant::now();
    Api::<RoleBinding>::namespaced(cluster().admin().await, &ns)
        .delete(&binding_a, &DeleteParams::default())
        .await
        .expect("delete role binding");
    watch_leaders(&a, &b, WAIT, "replica a to step down", |la, _| !la).await;
    let stepped_down = cut.elapsed();
    // Within its renew deadline (plus one attempt's slack) of the last renewal.
    assert!(
        stepped_down < Duration::from_secs(3),
        "stepped down after {stepped_down:?}"
    );
    // The sampling asserts that b never led while a still did.
    watch_leaders(&a, &b, WAIT, "replica b to take over", |_, lb| lb).await;
    assert_eq!(holder(&ns).await.as_deref(), Some("replica-b"));

    for c in [a, b] {
        c.stop.send_replace(true);
        tokio::time::timeout(WAIT, c.task)
            .await
            .expect("candidate ends")
            .expect("task");
    }
}

/// Retention in the Kubernetes store: whole chunks go once every certificate
/// in them is past the window (never the newest chunk), then the oldest while
/// over the caps; a replica still appending to a chunk that was pruned under
/// it moves to the newest one instead of failing.
#[tokio::test(flavor = "multi_thread")]
async fn the_issuance_log_prunes_whole_chunks_past_the_window() {
    use control_plane::store::IssuanceRetention;
    let ns = cluster().namespace("store-prune").await;
    let chunks_api = Api::<ConfigMap>::namespaced(cluster().admin().await, &ns);
    let chunk_names = || async {
        let list = chunks_api
            .list(&ListParams::default().labels("keyway.dev/component=issuance-log"))
            .await
            .expect("list chunks");
        let mut names: Vec<String> = list
            .items
            .iter()
            .filter_map(|c| c.metadata.name.clone())
            .collect();
        names.sort();
        names
    };
    let t = now();
    let record = |i: usize, not_after: i64| IssuanceRecord {
        serial: format!("{i:040x}"),
        spiffe_id: "spiffe://example.org/ns/default/sa/a-service-account".into(),
        requester: "node-a".into(),
        ca_id: "3f2a9c0d1e7b4a55".into(),
        issued_at: not_after - 3600,
        not_after,
    };
    // Replica A writes the first records (its head: chunk 0), then replica B
    // fills chunk 0 and rolls over: 3000 records expired two hours ago, and
    // one that is valid for a day (a node SVID), which must not hold its
    // chunk for a day: the chunk is compacted, the record moved on.
    let a = open(&ns, "replica-a").await;
    a.log_issuance(&record(0, t - 7200)).await.expect("log");
    a.log_issuance(&record(3100, t + 86400)).await.expect("log");
    let b = Arc::new(open(&ns, "replica-b").await);
    let mut tasks = Vec::new();
    for i in 1..3000 {
        let b = b.clone();
        let r = record(i, t - 7200);
        tasks.push(tokio::spawn(async move { b.log_issuance(&r).await }));
    }
    for task in tasks {
        task.await.expect("task").expect("log");
    }
    // And fresh ones, in the newest chunk.
    for i in 3000..3010 {
        b.log_issuance(&record(i, t + 3600)).await.expect("log");
    }
    let before = chunk_names().await;
    assert!(before.len() >= 2, "{before:?}");

    let keep = IssuanceRetention::default();
    let out = b.prune_issuance(&keep, t).await.expect("prune");
    let after = chunk_names().await;
    assert_eq!(
        after,
        vec![before.last().unwrap().clone()],
        "only the newest chunk is left"
    );
    assert!(
        out.removed > 0 && out.kept == serials_once(&b).await.len(),
        "{out:?}"
    );
    assert!(
        serials_once(&b).await.contains(&format!("{:040x}", 3005)),
        "fresh records stay"
    );
    assert!(
        serials_once(&b).await.contains(&format!("{:040x}", 3100)),
        "the long-lived record moved on with its chunk's compaction"
    );
    // Pruning again changes nothing.
    let again = b.prune_issuance(&keep, t).await.expect("prune again");
    assert_eq!((again.removed, again.kept), (0, out.kept));

    // Replica A's head (chunk 0) is gone: its next record lands in the newest chunk.
    a.log_issuance(&record(4000, t + 3600))
        .await
        .expect("a replica whose chunk was pruned keeps logging");
    assert_eq!(chunk_names().await, after, "no pruned chunk comes back");
    assert!(serials_once(&a).await.contains(&format!("{:040x}", 4000)));

    // The caps: count. The newest chunk is never deleted, whatever the caps.
    let out = b
        .prune_issuance(
            &IssuanceRetention {
                max_records: 1,
                ..keep
            },
            t,
        )
        .await
        .expect("prune over the cap");
    assert_eq!(out.removed, 0, "the newest chunk stays: {out:?}");
    assert_eq!(chunk_names().await, after);
}
