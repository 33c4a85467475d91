//! Mutual authentication between node agents, in process: real control
//! plane, real agents, real TLS 1.3 handshakes over real sockets on
//! 127.0.0.1, each agent with an in-memory auth map (the privileged tier
//! runs the same code against the kernel's map).

use std::time::{Duration, Instant, SystemTime};

use keyway_common::AuthKey;
use keyway_tests::mesh::MeshAgent;
use keyway_tests::{InProcess, MTLS_BOTH_WAYS, Options, workload_yaml};
use node_agent::datapath::{AuthMap, MissingAuth, monotonic_ns};
use node_agent::mutual_auth::{Via, handshake, pairs};
use tokio::sync::watch;

fn docs() -> String {
    format!(
        "{}---\n{}---\n{MTLS_BOTH_WAYS}",
        workload_yaml("frontend", "frontend", "node-a", "10.0.1.1"),
        workload_yaml("api", "api", "node-b", "10.0.2.1"),
    )
}

struct Mesh {
    cp: InProcess,
    a: MeshAgent,
    b: MeshAgent,
    frontend: u32,
    api: u32,
    node_a: u16,
    node_b: u16,
}

fn identity_of(agent: &MeshAgent, sa: &str) -> u32 {
    let state = agent.agent.handles.state.borrow();
    state
        .identities
        .values()
        .find(|i| i.spiffe_id.ends_with(&format!("/sa/{sa}")))
        .map(|i| i.id)
        .unwrap_or_else(|| panic!("no identity for {sa}"))
}

fn node_id(agent: &MeshAgent, node: &str) -> u16 {
    pairs::local_node_id(&agent.agent.handles.state.borrow(), node).expect("node id")
}

async fn mesh(opts: Options, yaml: &str) -> Mesh {
    let cp = InProcess::start(opts).await;
    cp.apply(yaml).await;
    let a = MeshAgent::start(&cp, "node-a").await;
    let b = MeshAgent::start(&cp, "node-b").await;
    for agent in [&a, &b] {
        let mut st = agent.agent.handles.state.clone();
        tokio::time::timeout(
            Duration::from_secs(10),
            st.wait_for(|s| s.nodes.values().filter(|n| !n.addresses.is_empty()).count() == 2),
        )
        .await
        .expect("both nodes' auth addresses synced")
        .unwrap();
    }
    let frontend = identity_of(&a, "frontend");
    let api = identity_of(&a, "api");
    let node_a = node_id(&a, "node-a");
    let node_b = {
        let st = a.agent.handles.state.borrow();
        st.nodes["node-b"].node_id as u16
    };
    Mesh {
        cp,
        a,
        b,
        frontend,
        api,
        node_a,
        node_b,
    }
}

fn has(entries: &[node_agent::mutual_auth::AuthRecord], key: AuthKey) -> bool {
    entries.iter().any(|r| r.key == key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_ends_pre_authenticate_their_direction_before_any_packet() {
    let m = mesh(Options::default(), &docs()).await;
    // b guards api's ingress from frontend; a guards frontend's egress to api.
    let on_b = pairs::key(m.api, m.frontend, m.node_a);
    let on_a = pairs::key(m.frontend, m.api, m.node_b);
    let entries =
        m.b.wait_entries("b's entry for (api, frontend)", Duration::from_secs(15), |e| {
            has(e, on_b)
        })
        .await;
    m.a.wait_entries("a's entry for (frontend, api)", Duration::from_secs(15), |e| {
        has(e, on_a)
    })
    .await;

    // The expiry is the earlier NotAfter of the two SVIDs, in kernel time.
    let rec = entries.iter().find(|r| r.key == on_b).unwrap();
    let not_after = |agent: &MeshAgent, sa: &str| {
        agent
            .agent
            .handles
            .svids
            .borrow()
            .iter()
            .find(|(id, _)| id.ends_with(&format!("/sa/{sa}")))
            .map(|(_, s)| s.not_after())
            .unwrap()
    };
    let earlier = not_after(&m.a, "frontend").min(not_after(&m.b, "api"));
    let diff = |x: SystemTime, y: SystemTime| x.duration_since(y).or_else(|_| y.duration_since(x)).unwrap();
    assert!(
        diff(rec.expiry, earlier) < Duration::from_secs(2),
        "expiry {:?} is the earlier NotAfter {:?}",
        rec.expiry,
        earlier
    );
    let in_map = m.b.auth.get(&on_b).unwrap().expect("written to the auth map");
    assert!(in_map > monotonic_ns(), "the entry is valid in kernel time");
    assert!(matches!(rec.via, Via::Dialled | Via::Answered));

    // Keys stay scoped: neither side records the other side's direction.
    assert!(!has(&m.a.mutual.entries.borrow(), on_b));
    assert!(!has(&m.b.mutual.entries.borrow(), on_a));
    m.a.stop().await;
    m.b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_or_wrong_identity_peers_never_produce_an_entry() {
    let m = mesh(Options::default(), &docs()).await;
    let on_b = pairs::key(m.api, m.frontend, m.node_a);
    m.b.wait_entries("the legitimate entry", Duration::from_secs(15), |e| has(e, on_b))
        .await;
    // Settled first: a holds its entry too, neither agent has a handshake in
    // flight, and b has counted every answer to a's dials. Then b answers
    // nobody but the attempts below (a's own dial could otherwise land
    // after b's entry and be counted as one of them).
    let on_a = pairs::key(m.frontend, m.api, m.node_b);
    m.a.wait_entries("a's entry", Duration::from_secs(15), |e| has(e, on_a))
        .await;
    let (mut a_stats, mut b_stats) = (m.a.mutual.stats.clone(), m.b.mutual.stats.clone());
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let (a, b) = (
                a_stats.borrow_and_update().clone(),
                b_stats.borrow_and_update().clone(),
            );
            if a.in_flight == 0 && b.in_flight == 0 && b.answered >= a.handshakes_ok {
                break;
            }
            tokio::select! {
                _ = a_stats.changed() => {}
                _ = b_stats.changed() => {}
            }
        }
    })
    .await
    .expect("both agents settled");
    let answered_before = m.b.mutual.stats.borrow().answered;
    let addr = m.b.mutual.listen;
    let bundle = watch::channel(m.cp.bundle()).1;
    let frontend_id = "spiffe://example.org/ns/default/sa/frontend";
    let api_id = "spiffe://example.org/ns/default/sa/api";

    // 1. frontend's SPIFFE ID, signed by a CA the bundle does not hold.
    let rogue = InProcess::start(Options::default()).await;
    let forged = rogue.mint_svid(frontend_id).await;
    let r = handshake::dial(addr, bundle.clone(), &forged, m.frontend, m.api, api_id, "node-a").await;
    assert!(r.is_err(), "an untrusted CA must not authenticate: {r:?}");

    // 2. A certificate from another trust domain.
    let other_td = InProcess::start(Options {
        trust_domain: "evil.example".into(),
        ..Default::default()
    })
    .await;
    let foreign = other_td
        .mint_svid("spiffe://evil.example/ns/default/sa/frontend")
        .await;
    let r = handshake::dial(
        addr,
        bundle.clone(),
        &foreign,
        m.frontend,
        m.api,
        api_id,
        "node-a",
    )
    .await;
    assert!(r.is_err(), "another trust domain must not authenticate: {r:?}");

    // 3. A valid SVID of this trust domain, but not frontend's, claiming to be frontend.
    let wrong =
        m.cp.mint_svid("spiffe://example.org/ns/default/sa/intruder")
            .await;
    let r = handshake::dial(addr, bundle.clone(), &wrong, m.frontend, m.api, api_id, "node-a").await;
    match r {
        Err(handshake::HandshakeError::Refused(why)) => assert!(why.contains("not identity"), "{why}"),
        other => panic!("a wrong identity must be refused: {other:?}"),
    }

    // 4. frontend's real certificate, but from an address that is not node-a's.
    //    (Both agents listen on 127.0.0.1 here, so claim an unknown node.)
    let real = m.cp.mint_svid(frontend_id).await;
    let r = handshake::dial(addr, bundle.clone(), &real, m.frontend, m.api, api_id, "node-z").await;
    assert!(matches!(r, Err(handshake::HandshakeError::Refused(_))), "{r:?}");

    // 5. Asking b's agent for an identity it does not run: no certificate.
    let r = handshake::dial(
        addr,
        bundle.clone(),
        &real,
        m.frontend,
        m.frontend,
        frontend_id,
        "node-a",
    )
    .await;
    assert!(
        r.is_err(),
        "an agent never answers for an identity it does not run: {r:?}"
    );

    // 6. The client side: a server that is not the expected identity.
    let r = handshake::dial(addr, bundle, &real, m.frontend, m.api, frontend_id, "node-a").await;
    assert!(
        r.is_err(),
        "a server with the wrong SPIFFE ID is refused by the dialer: {r:?}"
    );

    assert_eq!(
        m.b.mutual.stats.borrow().answered,
        answered_before,
        "nothing was accepted"
    );
    let keys: Vec<AuthKey> = m.b.auth.entries().unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, vec![on_b], "only the legitimate entry exists");
    m.a.stop().await;
    m.b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_are_flushed_when_the_workload_that_justified_them_goes_away() {
    let m = mesh(Options::default(), &docs()).await;
    let on_b = pairs::key(m.api, m.frontend, m.node_a);
    m.b.wait_entries("the entry", Duration::from_secs(15), |e| has(e, on_b))
        .await;
    let start = Instant::now();
    m.cp.cp
        .delete(&workload_yaml("frontend", "frontend", "node-a", "10.0.1.1"))
        .await
        .expect("delete");
    m.b.wait_entries("the flush", Duration::from_secs(5), |e| !has(e, on_b))
        .await;
    let took = start.elapsed();
    assert_eq!(m.b.auth.get(&on_b).unwrap(), None, "gone from the auth map too");
    assert!(m.b.mutual.stats.borrow().flushed >= 1);
    eprintln!("flushed {took:?} after the workload was deleted");

    // Re-added: re-authenticated (the same identity number comes back).
    m.cp.apply(&workload_yaml("frontend", "frontend", "node-a", "10.0.1.1"))
        .await;
    m.b.wait_entries("re-authentication", Duration::from_secs(15), |e| has(e, on_b))
        .await;
    m.a.stop().await;
    m.b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svid_rotation_re_authenticates_with_no_gap() {
    let opts = Options {
        ca_ttl: Duration::from_secs(60),
        svid_ttl: Duration::from_secs(6),
        ..Default::default()
    };
    let m = mesh(opts, &docs()).await;
    let on_b = pairs::key(m.api, m.frontend, m.node_a);
    m.b.wait_entries("the entry", Duration::from_secs(15), |e| has(e, on_b))
        .await;
    // Over ~2.5 SVID lifetimes the entry is always there and always valid,
    // and it is renewed with later expiries.
    let mut expiries = std::collections::BTreeSet::new();
    let end = Instant::now() + Duration::from_secs(15);
    while Instant::now() < end {
        let e = m.b.auth.get(&on_b).unwrap().expect("the entry never disappears");
        assert!(e > monotonic_ns(), "the entry never expires while SVIDs rotate");
        expiries.insert(e / 1_000_000_000);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        expiries.len() >= 3,
        "re-authenticated after rotations: {expiries:?}"
    );
    m.a.stop().await;
    m.b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datapath_signal_authenticates_a_pair_no_policy_named_in_advance() {
    // api requires auth from any peer on 9090: no pair is known in advance.
    let policy = "apiVersion: keyway.dev/v1alpha1
kind: KeywayNetworkPolicy
metadata: { name: api-any, namespace: default }
spec:
  endpointSelector: { matchLabels: { app: api } }
  ingress:
    - authentication: { mode: required }
      toPorts: [{ ports: [{ port: \"9090\", protocol: TCP }] }]
";
    let yaml = format!(
        "{}---\n{}---\n{policy}",
        workload_yaml("frontend", "frontend", "node-a", "10.0.1.1"),
        workload_yaml("api", "api", "node-b", "10.0.2.1"),
    );
    let m = mesh(Options::default(), &yaml).await;
    let key = pairs::key(m.api, m.frontend, m.node_a);
    // Let the agents settle: nothing is pre-authenticated.
    let mut st = m.b.agent.handles.state.clone();
    tokio::time::timeout(Duration::from_secs(10), st.wait_for(|s| !s.policy.is_empty()))
        .await
        .unwrap()
        .unwrap();
    assert!(pairs::wanted(&m.b.agent.handles.state.borrow(), "node-b").is_empty());
    assert!(m.b.mutual.entries.borrow().is_empty());

    let sent = Instant::now();
    m.b.signals
        .send(MissingAuth {
            key,
            at_ns: monotonic_ns(),
        })
        .await
        .unwrap();
    m.b.wait_entries("on-demand authentication", Duration::from_secs(10), |e| {
        has(e, key)
    })
    .await;
    eprintln!("signal to entry: {:?}", sent.elapsed());
    assert_eq!(m.b.mutual.stats.borrow().signals, 1);
    let _ = (m.node_b, &m.cp);
    m.a.stop().await;
    m.b.stop().await;
}
