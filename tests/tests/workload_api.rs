//! The node agent's SPIFFE Workload API, exercised by the `spiffe` crate's
//! client and by raw gRPC over the real unix socket: SVIDs and bundles,
//! rotation without gaps, control-plane outages, agent restarts, bad input.

use std::time::{Duration, SystemTime};

use keyway_tests::{Agent, InProcess, Options, TD, workload_for_me};
use proto::workload::{self as pb, spiffe_workload_api_client::SpiffeWorkloadApiClient};
use spiffe::WorkloadApiClient;
use tonic::Code;

async fn raw_client(agent: &Agent) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
    keyway_tests::raw_workload_client(&agent.socket).await.unwrap()
}

use keyway_tests::with_security_header as with_header;

fn id(sa: &str) -> String {
    format!("spiffe://{TD}/ns/default/sa/{sa}")
}

/// A control plane with one Workload matching this test process ("web" on
/// node-a, optional SVID TTL; short TTLs get a 60s CA so they are allowed)
/// and an agent that already holds its SVID.
async fn cp_and_agent(ttl: Option<&str>) -> (InProcess, Agent) {
    let opts = match ttl {
        Some(_) => Options {
            ca_ttl: Duration::from_secs(60),
            ..Default::default()
        },
        None => Options::default(),
    };
    let cp = InProcess::start(opts).await;
    cp.apply(&workload_for_me("web", "web", "node-a", ttl)).await;
    let agent = Agent::start(&cp, "node-a", None).await;
    agent.wait_for_svid(&id("web")).await;
    (cp, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_client_fetches_svids_bundles_and_jwts() {
    let (_cp, agent) = cp_and_agent(None).await;

    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .expect("spiffe client connects");
    let svid = client.fetch_x509_svid().await.expect("X509-SVID (WL-09)");
    assert_eq!(svid.spiffe_id().to_string(), id("web"));
    let bundles = client.fetch_x509_bundles().await.expect("bundles (WL-13)");
    assert!(bundles.get(&spiffe::TrustDomain::new(TD).unwrap()).is_some());

    // JWT-SVID round trip: fetch, then validate via the agent and locally.
    let jwt = client
        .fetch_jwt_token(&["billing"], None)
        .await
        .expect("JWT-SVID (WL-14)");
    let validated = client
        .validate_jwt_token("billing", &jwt)
        .await
        .expect("ValidateJWTSVID (WL-16)");
    assert_eq!(validated.spiffe_id().to_string(), id("web"));
    assert!(
        client.validate_jwt_token("other", &jwt).await.is_err(),
        "wrong audience refused"
    );
    let jwt_bundles = client.fetch_jwt_bundles().await.expect("JWT bundles (WL-15)");
    let local = spiffe::JwtSvid::parse_and_validate(&jwt, &jwt_bundles, &["billing"]).expect("valid locally");
    assert_eq!(local.spiffe_id().to_string(), id("web"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ep04_requests_without_the_security_header_are_invalid() {
    let (_cp, agent) = cp_and_agent(None).await;
    let mut raw = raw_client(&agent).await;
    let err = raw.fetch_x509svid(pb::X509svidRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "security header missing from request");
    let err = raw
        .fetch_jwtsvid(pb::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // WL-18: WIT is not supported.
    let err = raw
        .fetch_witsvid(with_header(pb::WitsvidRequest {
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    // WL-14 / WL-16: required fields.
    let err = raw
        .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
            audience: vec![],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = raw
        .validate_jwtsvid(with_header(pb::ValidateJwtsvidRequest {
            audience: "a".into(),
            svid: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.message(), "svid must be specified");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wl11_unknown_callers_are_denied_with_a_reason() {
    let cp = InProcess::start(Options::default()).await;
    // A workload that matches some other uid, not this test process.
    cp.apply(
        "apiVersion: keyway.dev/v1alpha1\nkind: Workload\nmetadata: { name: other, namespace: default }\n\
         spec:\n  serviceAccount: other\n  node: node-a\n  selectors: [\"unix:uid:4242\"]\n",
    )
    .await;
    let agent = Agent::start(&cp, "node-a", None).await;
    agent.wait_for_svid(&id("other")).await;
    let mut raw = raw_client(&agent).await;
    let err = raw
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().starts_with("no identity issued"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("unix:uid:"),
        "says how to fix it: {}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_reaches_streams_with_no_gap_and_new_serials() {
    // CA TTL 60s allows SVIDs up to 10s; the workload asks for 4s.
    let (_cp, agent) = cp_and_agent(Some("4s")).await;
    let mut raw = raw_client(&agent).await;
    let mut stream = raw
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let mut serials = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while serials.len() < 3 {
        let msg = tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("rotations arrive within 20s")
            .unwrap()
            .unwrap();
        // WL-04: full state in every message; the SVID is valid when it arrives.
        assert_eq!(msg.svids.len(), 1);
        let chain = keyway_identity::x509::split_der(&msg.svids[0].x509_svid).unwrap();
        let leaf = keyway_identity::x509::inspect_leaf(&chain[0]).unwrap();
        assert!(leaf.not_after > SystemTime::now(), "never handed an expired SVID");
        assert!(!msg.svids[0].x509_svid_key.is_empty());
        serials.push(leaf.serial);
    }
    serials.dedup();
    assert_eq!(
        serials.len(),
        3,
        "each message carried a new SVID (at least two rotations)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_outage_keeps_valid_svids_and_catches_up() {
    // The real control-plane binary, killed and restarted on the same port.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cp");
    let cp = keyway_tests::Binary::spawn(&data, &["--ca-ttl", "60s"]);
    let listen = cp.listen.clone();
    let yaml = dir.path().join("w.yaml");
    std::fs::write(&yaml, workload_for_me("web", "web", "node-a", Some("6s"))).unwrap();
    cp.ok(&["apply", "-f", yaml.to_str().unwrap()]);
    let token = cp.ok(&["token", "create", "--node", "node-a"]).trim().to_owned();
    let bundle = cp.ok(&["bundle", "show"]);
    let agent = Agent::start_with(&listen, &bundle, "node-a", Some(token), None).await;
    agent.wait_for_svid(&id("web")).await;
    let first = agent.handles.svids.borrow().get(&id("web")).unwrap().clone();

    cp.kill9();
    // Longer than half the TTL: renewal fails, the agent keeps serving.
    let halfway = first.not_before() + Duration::from_secs(10 + 4);
    keyway_tests::wait_until(Duration::from_secs(10), "past half of the SVID lifetime", || {
        SystemTime::now() >= halfway
    });
    let client = WorkloadApiClient::connect_to(agent.endpoint()).await.unwrap();
    let during = client
        .fetch_x509_svid()
        .await
        .expect("still served while the control plane is down");
    assert_eq!(
        during.leaf().as_bytes(),
        first.chain()[0].as_ref(),
        "the cached SVID, still valid"
    );

    let _cp = keyway_tests::Binary::spawn_on(&data, &listen, &["--ca-ttl", "60s"]);
    let mut svids = agent.handles.svids.clone();
    tokio::time::timeout(
        Duration::from_secs(20),
        svids.wait_for(|s| s.get(&id("web")).is_some_and(|n| n.serial() != first.serial())),
    )
    .await
    .expect("renewed after the control plane came back")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_needs_no_new_token() {
    let (cp, agent) = cp_and_agent(None).await;
    use std::os::unix::fs::PermissionsExt;
    let key_mode = std::fs::metadata(agent.data_dir.join("node-key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600, "node key is owner-only");
    let dir = agent.stop().await;
    // No token this time: the stored node SVID is used.
    let again = Agent::start_with(&cp.addr, &cp.bundle().to_pem(), "node-a", None, Some(dir)).await;
    again.wait_for_svid(&id("web")).await;
    let client = WorkloadApiClient::connect_to(again.endpoint()).await.unwrap();
    assert_eq!(
        client.fetch_x509_svid().await.unwrap().spiffe_id().to_string(),
        id("web")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_that_leave_the_node_are_forgotten_and_denied() {
    let (cp, agent) = cp_and_agent(None).await;
    let mut raw = raw_client(&agent).await;
    let mut stream = raw
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    // The workload moves to another node.
    cp.apply(&workload_for_me("web", "web", "node-b", None)).await;
    let mut svids = agent.handles.svids.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        svids.wait_for(|s| !s.contains_key(&id("web"))),
    )
    .await
    .expect("SVID dropped")
    .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "the stream is told it lost its identity (WL-11)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_prepare_reaches_workload_bundles_before_the_new_ca_signs() {
    let (cp, agent) = cp_and_agent(None).await;
    let mut raw = raw_client(&agent).await;
    let mut stream = raw
        .fetch_x509_bundles(with_header(pb::X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let before = first.bundles.values().next().unwrap().len();
    cp.cp.rotate(::control_plane::ca::Step::Prepare).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let after = next.bundles.values().next().unwrap().len();
    assert!(after > before, "the prepared CA is pushed to workloads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_x509_source_sees_rotations() {
    let (_cp, agent) = cp_and_agent(Some("4s")).await;
    let source = spiffe::X509Source::builder()
        .endpoint(agent.endpoint())
        .build()
        .await
        .expect("X509Source");
    let first = source.svid().unwrap();
    assert_eq!(first.spiffe_id().to_string(), id("web"));
    let mut updates = source.updated();
    tokio::time::timeout(Duration::from_secs(15), updates.changed())
        .await
        .expect("a rotation within 15s")
        .unwrap();
    let next = source.svid().unwrap();
    assert_ne!(
        next.leaf().as_bytes(),
        first.leaf().as_bytes(),
        "the source holds the rotated SVID"
    );
    source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ep12_an_agent_that_has_not_synced_answers_unavailable() {
    use node_agent::state::NodeState;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let (_state_tx, state) = tokio::sync::watch::channel(Arc::new(NodeState::default()));
    let (_svids_tx, svids) = tokio::sync::watch::channel(Arc::new(Default::default()));
    let (_client_tx, client) = tokio::sync::watch::channel(None);
    let api =
        node_agent::workload_api::WorkloadApi::new(state, svids, client, "/proc".into(), dir.path().into());
    let socket = dir.path().join("agent.sock");
    let listener = node_agent::workload_api::bind(&socket).unwrap();
    let (_stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(node_agent::workload_api::serve(
        api,
        listener,
        node_agent::workload_api::limits(),
        rx,
    ));
    let client = WorkloadApiClient::connect_to(format!("unix://{}", socket.display()))
        .await
        .unwrap();
    let err = client.fetch_x509_svid().await.unwrap_err();
    assert!(format!("{err:?}").contains("Unavailable"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotation_during_svid_rotation_never_breaks_verification() {
    let (cp, agent) = cp_and_agent(Some("4s")).await;
    let mut raw = raw_client(&agent).await;
    let mut stream = raw
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let mut checked = 0;
    let mut rotated = false;
    while checked < 4 {
        let msg = tokio::time::timeout(Duration::from_secs(15), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let svid = &msg.svids[0];
        // Every message's SVID verifies against the bundle in the same message.
        let chain: Vec<rustls::pki_types::CertificateDer> = keyway_identity::x509::split_der(&svid.x509_svid)
            .unwrap()
            .into_iter()
            .map(Into::into)
            .collect();
        let bundle = keyway_identity::TrustBundle::new(
            keyway_tests::trust_domain(),
            0,
            keyway_identity::x509::split_der(&svid.bundle).unwrap(),
            Vec::new(),
        )
        .unwrap();
        bundle
            .verify(&chain, SystemTime::now(), keyway_identity::bundle::Usage::Client)
            .expect("SVID verifies against its bundle throughout the CA rotation");
        checked += 1;
        if !rotated {
            cp.cp.rotate(::control_plane::ca::Step::Prepare).await.unwrap();
            cp.cp.rotate(::control_plane::ca::Step::Activate).await.unwrap();
            rotated = true;
        }
    }
}
