//! The agent-facing API over real TLS on 127.0.0.1: attestation with join
//! tokens, node-scoped workload CSRs, Sync deltas (node-scoped workloads, a
//! cluster-wide identity table), and every kind of bad input refused with a
//! clear error and nothing stored.

use std::sync::Arc;
use std::time::Duration;

use keyway_identity::Svid;
use keyway_tests::{InProcess, Options, TD, workload_yaml};
use node_agent::control_plane::{self, ClientError, ControlPlaneClient, NodeIdentity};
use proto::keyway::{self as pb, update::Kind};
use tokio::sync::watch;
use tonic::Code;

async fn attest(cp: &InProcess, node: &str) -> NodeIdentity {
    let token = cp.token(node).await;
    control_plane::attest_with_join_token(&cp.addr, cp.bundle(), node, &token)
        .await
        .expect("attestation")
}

async fn client_for(cp: &InProcess, id: &NodeIdentity) -> ControlPlaneClient {
    let (_b, bundle) = watch::channel(cp.bundle());
    let (_c, cert) = watch::channel(Some(id.svid.certified_key().unwrap()));
    // Keep the senders alive for the client's life.
    std::mem::forget((_b, _c));
    ControlPlaneClient::connect(&cp.addr, bundle, cert)
        .await
        .expect("mTLS connect")
}

fn code(e: ClientError) -> (Code, String) {
    match e {
        ClientError::Refused(s) => (s.code(), s.message().to_owned()),
        other => panic!("expected a refusal, got {other}"),
    }
}

#[tokio::test]
async fn join_token_attestation_issues_a_node_svid_once() {
    let cp = InProcess::start(Options::default()).await;
    let token = cp.token("node-a").await;
    let id = control_plane::attest_with_join_token(&cp.addr, cp.bundle(), "node-a", &token)
        .await
        .unwrap();
    assert_eq!(
        id.svid.spiffe_id().to_string(),
        format!("spiffe://{TD}/keyway/node/node-a")
    );
    assert!(id.node_id >= 1);
    // The chain verifies against the bundle for client auth.
    cp.bundle()
        .verify(
            id.svid.chain(),
            std::time::SystemTime::now(),
            keyway_identity::bundle::Usage::Client,
        )
        .unwrap();

    let before = cp.issuance_count().await;
    // Reused token.
    let err = control_plane::attest_with_join_token(&cp.addr, cp.bundle(), "node-a", &token)
        .await
        .unwrap_err();
    let (c, m) = code(err);
    assert_eq!(c, Code::PermissionDenied);
    assert!(m.contains("already used"), "{m}");
    // Unknown token.
    let err = control_plane::attest_with_join_token(&cp.addr, cp.bundle(), "node-a", "kw1.nope")
        .await
        .unwrap_err();
    assert!(code(err).1.contains("unknown token"));
    // A token for another node.
    let other = cp.token("node-b").await;
    let err = control_plane::attest_with_join_token(&cp.addr, cp.bundle(), "node-c", &other)
        .await
        .unwrap_err();
    assert!(code(err).1.contains("another node"));
    // That token is still usable by its own node: the refusal consumed nothing.
    control_plane::attest_with_join_token(&cp.addr, cp.bundle(), "node-b", &other)
        .await
        .unwrap();
    assert_eq!(cp.issuance_count().await, before + 1, "refusals issue nothing");
}

#[tokio::test]
async fn expired_join_token_is_refused() {
    let cp = InProcess::start(Options::default()).await;
    let before = cp.issuance_count().await;
    let (token, expires_at) = cp
        .cp
        .create_join_token("node-a", Duration::from_secs(1))
        .await
        .unwrap();
    // Wait for the wall clock (what expiry is measured against) to pass it.
    keyway_tests::wait_until(Duration::from_secs(5), "token expiry", || {
        ::control_plane::clock::now_unix() >= expires_at
    });
    let err = control_plane::attest_with_join_token(&cp.addr, cp.bundle(), "node-a", &token)
        .await
        .unwrap_err();
    let (c, m) = code(err);
    assert_eq!(c, Code::PermissionDenied);
    assert!(m.contains("expired"), "{m}");
    assert_eq!(cp.issuance_count().await, before);
}

#[tokio::test]
async fn nodes_get_svids_only_for_their_own_workloads() {
    let cp = InProcess::start(Options::default()).await;
    cp.apply(&workload_yaml("frontend", "frontend", "node-a", "10.244.1.10"))
        .await;
    cp.apply(&workload_yaml("api", "api", "node-b", "10.244.2.10"))
        .await;
    let a = attest(&cp, "node-a").await;
    let mut client = client_for(&cp, &a).await;

    let svid: Svid = client
        .sign_workload(&format!("spiffe://{TD}/ns/default/sa/frontend"))
        .await
        .unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        format!("spiffe://{TD}/ns/default/sa/frontend")
    );

    let before = cp.issuance_count().await;
    let err = client
        .sign_workload(&format!("spiffe://{TD}/ns/default/sa/api"))
        .await
        .unwrap_err();
    let (c, m) = code(err);
    assert_eq!(c, Code::PermissionDenied);
    assert!(
        m.contains("node-a has no workload") && m.contains("node-b"),
        "{m}"
    );
    let err = client
        .sign_workload(&format!("spiffe://{TD}/ns/default/sa/nobody"))
        .await
        .unwrap_err();
    assert_eq!(code(err).0, Code::PermissionDenied);
    let err = client
        .sign_workload(&format!("spiffe://{TD}/ns/default/sa/a//b"))
        .await
        .unwrap_err();
    let (c, m) = code(err);
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("ID-10"), "{m}");
    assert_eq!(cp.issuance_count().await, before);
}

#[tokio::test]
async fn bad_csrs_are_refused_with_reasons_and_store_nothing() {
    let cp = InProcess::start(Options::default()).await;
    cp.apply(&workload_yaml("frontend", "frontend", "node-a", "10.244.1.10"))
        .await;
    let a = attest(&cp, "node-a").await;
    let mut client = client_for(&cp, &a).await;
    let id = format!("spiffe://{TD}/ns/default/sa/frontend");
    let before = cp.issuance_count().await;

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = |f: &dyn Fn(&mut rcgen::CertificateParams)| {
        let mut p = rcgen::CertificateParams::default();
        f(&mut p);
        p.serialize_request(&key).unwrap().der().to_vec()
    };
    let mut mis_signed = keyway_identity::csr::csr_for(&key).unwrap();
    let n = mis_signed.len() - 4;
    mis_signed[n] ^= 0xff;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"garbage".to_vec(), "not valid DER"),
        (mis_signed, "signature does not verify"),
        (
            csr(&|p| p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained)),
            "X5-08",
        ),
        (
            csr(&|p| {
                p.subject_alt_names = vec![
                    rcgen::SanType::URI(id.clone().try_into().unwrap()),
                    rcgen::SanType::URI(format!("spiffe://{TD}/ns/x/sa/y").try_into().unwrap()),
                ]
            }),
            "X5-01",
        ),
        (
            csr(&|p| {
                p.subject_alt_names = vec![rcgen::SanType::URI(
                    format!("spiffe://{TD}/ns/x/sa/y").try_into().unwrap(),
                )]
            }),
            "takes the SPIFFE ID from its records",
        ),
    ];
    for (der, want) in cases {
        let err = client
            .raw()
            .sign_workload_csr(pb::SignWorkloadCsrRequest {
                spiffe_id: id.clone(),
                csr: der,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{want}: {}", err.message());
        assert!(
            err.message().contains(want),
            "expected {want:?} in {:?}",
            err.message()
        );
    }
    // Over the message size limit: refused by the transport before any work.
    let err = client
        .raw()
        .sign_workload_csr(pb::SignWorkloadCsrRequest {
            spiffe_id: id.clone(),
            csr: vec![0u8; 200 * 1024],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );
    assert!(err.message().contains("too large"), "{}", err.message());
    assert_eq!(
        cp.issuance_count().await,
        before,
        "no refused request was logged as issued"
    );
}

#[tokio::test]
async fn calls_without_a_node_svid_are_unauthenticated() {
    let cp = InProcess::start(Options::default()).await;
    let (_tx, bundle) = watch::channel(cp.bundle());
    let channel = control_plane::channel(&cp.addr, bundle, None).await.unwrap();
    let mut raw = pb::agent_api_client::AgentApiClient::new(channel);
    let err = raw.sync(pb::SyncRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("attest first"));

    // A workload SVID is a valid certificate but not a node identity.
    cp.apply(&workload_yaml("frontend", "frontend", "node-a", "10.244.1.10"))
        .await;
    let a = attest(&cp, "node-a").await;
    let mut client = client_for(&cp, &a).await;
    let svid = client
        .sign_workload(&format!("spiffe://{TD}/ns/default/sa/frontend"))
        .await
        .unwrap();
    let (_b, bundle) = watch::channel(cp.bundle());
    let (_c, cert) = watch::channel(Some(svid.certified_key().unwrap()));
    let mut as_workload = ControlPlaneClient::connect(&cp.addr, bundle, cert).await.unwrap();
    let err = as_workload.renew_node_svid().await.unwrap_err();
    let (c, m) = code(err);
    assert_eq!(c, Code::PermissionDenied);
    assert!(m.contains("not a node agent"), "{m}");
}

#[tokio::test]
async fn a_certificate_from_another_trust_domain_cannot_connect() {
    let cp = InProcess::start(Options::default()).await;
    let other = InProcess::start(Options::default()).await; // same TD name, different CA
    let stranger = attest(&other, "node-a").await;
    let (_b, bundle) = watch::channel(cp.bundle());
    let (_c, cert) = watch::channel(Some(stranger.svid.certified_key().unwrap()));
    let result = ControlPlaneClient::connect(&cp.addr, bundle, cert).await;
    match result {
        Err(_) => {}
        Ok(mut c) => {
            // TLS 1.3 reports client-certificate rejection on first use.
            assert!(
                c.renew_node_svid().await.is_err(),
                "a foreign CA's SVID must be refused"
            );
        }
    }
}

#[tokio::test]
async fn renewing_the_node_svid_gives_a_new_key_and_serial() {
    let cp = InProcess::start(Options::default()).await;
    let a = attest(&cp, "node-a").await;
    let mut client = client_for(&cp, &a).await;
    let renewed = client.renew_node_svid().await.unwrap();
    assert_eq!(renewed.svid.spiffe_id(), a.svid.spiffe_id());
    assert_ne!(renewed.svid.serial(), a.svid.serial());
    assert_ne!(renewed.svid.key_pkcs8(), a.svid.key_pkcs8());
    assert_eq!(renewed.node_id, a.node_id, "node ids are stable");
}

#[tokio::test]
async fn sync_streams_a_snapshot_then_small_deltas() {
    let cp = InProcess::start(Options::default()).await;
    cp.apply(&workload_yaml("frontend", "frontend", "node-a", "10.244.1.10"))
        .await;
    cp.apply(&workload_yaml("api", "api", "node-b", "10.244.2.10"))
        .await;
    let a = attest(&cp, "node-a").await;
    let mut client = client_for(&cp, &a).await;
    let mut stream = client.sync(0, vec![]).await.unwrap();

    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.reset && first.complete);
    let workloads: Vec<_> = first
        .updates
        .iter()
        .filter_map(|u| match &u.kind {
            Some(Kind::WorkloadUpsert(w)) => Some(w.name.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(workloads, vec!["frontend"], "node-a sees only its own workloads");
    // The identity table is cluster-wide (mutual auth maps a peer's numeric
    // identity to the SPIFFE ID it must present); SVIDs stay node-scoped
    // (nodes_get_svids_only_for_their_own_workloads).
    let mut identities: Vec<_> = first
        .updates
        .iter()
        .filter_map(|u| match &u.kind {
            Some(Kind::IdentityUpsert(i)) => Some(i.spiffe_id.clone()),
            _ => None,
        })
        .collect();
    identities.sort();
    assert_eq!(
        identities,
        vec![
            format!("spiffe://{TD}/ns/default/sa/api"),
            format!("spiffe://{TD}/ns/default/sa/frontend")
        ]
    );
    assert!(
        first
            .updates
            .iter()
            .any(|u| matches!(&u.kind, Some(Kind::Bundle(b)) if b.sequence >= 1))
    );

    // A change to another node's workload sends node-a only the address
    // change (the ipcache is cluster-wide), never the workload; a change to
    // its own sends that workload. The two may arrive as one delta or two.
    cp.apply(&workload_yaml("api", "api", "node-b", "10.244.2.11"))
        .await;
    cp.apply(&workload_yaml("worker", "worker", "node-a", "10.244.1.11"))
        .await;
    let mut kinds = Vec::new();
    while !kinds
        .iter()
        .any(|k| matches!(k, Kind::WorkloadUpsert(w) if w.name == "worker"))
    {
        let next = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(!next.reset && next.complete);
        assert!(next.revision > first.revision);
        kinds.extend(next.updates.iter().map(|u| u.kind.clone().unwrap()));
    }
    assert!(
        kinds
            .iter()
            .any(|k| matches!(k, Kind::IpcacheUpsert(e) if e.cidr == "10.244.2.11/32")),
        "{kinds:?}"
    );
    assert!(
        kinds
            .iter()
            .any(|k| matches!(k, Kind::IpcacheDelete(cidr) if cidr == "10.244.2.10/32")),
        "{kinds:?}"
    );
    assert!(
        kinds
            .iter()
            .any(|k| matches!(k, Kind::WorkloadUpsert(w) if w.name == "worker")),
        "{kinds:?}"
    );
    assert!(
        kinds
            .iter()
            .any(|k| matches!(k, Kind::IdentityUpsert(i) if i.spiffe_id.ends_with("/sa/worker")))
    );
    assert!(
        !kinds
            .iter()
            .any(|k| matches!(k, Kind::WorkloadUpsert(w) if w.name == "api"))
    );

    // A CA prepare reaches the node as a bundle update with a higher sequence.
    cp.cp.rotate(::control_plane::ca::Step::Prepare).await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match &msg.updates[0].kind {
        Some(Kind::Bundle(b)) => assert_eq!(b.x509_authorities.len(), 2, "prepared CA published"),
        other => panic!("expected a bundle update, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_issuance_completes_and_every_svid_is_logged() {
    // Regression: concurrent flushes once deadlocked the store under load.
    let cp = InProcess::start(Options::default()).await;
    cp.apply(&workload_yaml("frontend", "frontend", "node-a", "10.244.1.10"))
        .await;
    let a = attest(&cp, "node-a").await;
    let client = client_for(&cp, &a).await;
    let before = cp.issuance_count().await;
    let id = format!("spiffe://{TD}/ns/default/sa/frontend");
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let mut client = client.clone();
            let id = id.clone();
            tokio::spawn(async move { client.sign_workload(&id).await.map(|s| s.serial().to_vec()) })
        })
        .collect();
    let all = async {
        let mut serials = std::collections::HashSet::new();
        for t in tasks {
            serials.insert(t.await.unwrap().unwrap());
        }
        serials
    };
    let serials = tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("issuance must not stall");
    assert_eq!(serials.len(), 200, "200 distinct serials");
    assert_eq!(cp.issuance_count().await, before + 200);
}

#[tokio::test]
async fn a_broken_or_replayed_node_svid_is_refused() {
    let cp = InProcess::start(Options::default()).await;
    let a = attest(&cp, "node-a").await;
    let (_b, bundle) = watch::channel(cp.bundle());

    // Replayed: node-a's certificate presented by someone without its key.
    let other_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(other_key.serialize_der().into());
    let signer = rustls::crypto::ring::sign::any_ecdsa_type(&key_der).unwrap();
    let replayed = Arc::new(rustls::sign::CertifiedKey::new(a.svid.chain().to_vec(), signer));
    let (_c, cert) = watch::channel(Some(replayed));
    let refused = match ControlPlaneClient::connect(&cp.addr, bundle.clone(), cert).await {
        Err(_) => true,
        Ok(mut c) => c.renew_node_svid().await.is_err(),
    };
    assert!(
        refused,
        "a node certificate without its key must not authenticate"
    );

    // Broken: the certificate's signature tampered with.
    let mut der = a.svid.chain()[0].to_vec();
    let n = der.len() - 5;
    der[n] ^= 0x5a;
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(a.svid.key_pkcs8().to_vec().into());
    let signer = rustls::crypto::ring::sign::any_ecdsa_type(&key_der).unwrap();
    let broken = Arc::new(rustls::sign::CertifiedKey::new(vec![der.into()], signer));
    let (_d, cert) = watch::channel(Some(broken));
    let refused = match ControlPlaneClient::connect(&cp.addr, bundle, cert).await {
        Err(_) => true,
        Ok(mut c) => c.renew_node_svid().await.is_err(),
    };
    assert!(refused, "a tampered node certificate must not authenticate");
}
