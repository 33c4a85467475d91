//! Two-phase CA rotation: SVIDs of the old and the new CA both verify during
//! the overlap, the bundle sequence grows at each step, the old CA leaves the
//! bundle once nothing it signed can be valid.

use std::time::{Duration, SystemTime};

use keyway_identity::bundle::Usage;
use keyway_tests::{Binary, InProcess, Options, TD};
use rustls::pki_types::CertificateDer;

fn jwks_sequence(cp: &Binary) -> u64 {
    let v: serde_json::Value = serde_json::from_str(&cp.ok(&["bundle", "show", "--format", "jwks"])).unwrap();
    v["spiffe_sequence"].as_u64().unwrap()
}

fn mint(cp: &Binary, dir: &std::path::Path, name: &str) -> Vec<Vec<u8>> {
    let out = dir.join(name);
    cp.ok(&[
        "x509",
        "mint",
        "--spiffe-id",
        &format!("spiffe://{TD}/ns/default/sa/{name}"),
        "--out",
        out.to_str().unwrap(),
    ]);
    keyway_identity::pem::decode_certs(&std::fs::read_to_string(out.join("svid.pem")).unwrap()).unwrap()
}

fn verify_with_bundle(cp: &Binary, chain: &[Vec<u8>]) -> Result<(), String> {
    let bundle =
        keyway_identity::TrustBundle::from_pem(keyway_tests::trust_domain(), &cp.ok(&["bundle", "show"]))
            .map_err(|e| e.to_string())?;
    let chain: Vec<CertificateDer> = chain.iter().map(|c| CertificateDer::from(c.clone())).collect();
    bundle
        .verify(&chain, SystemTime::now(), Usage::Client)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[test]
fn manual_rotation_keeps_old_and_new_svids_valid_during_the_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let cp = Binary::spawn(&dir.path().join("cp"), &[]);
    let s0 = jwks_sequence(&cp);
    let old_svid = mint(&cp, dir.path(), "before");

    // Activating with nothing prepared is refused with advice.
    let r = cp.cli(&["ca", "activate"]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("ca prepare"));

    let status = cp.ok(&["ca", "prepare"]);
    assert!(
        status.contains("prepared") && status.contains("active"),
        "{status}"
    );
    let s1 = jwks_sequence(&cp);
    assert!(s1 > s0, "prepare grows the sequence");
    // Prepared CA is published but does not sign yet.
    let while_prepared = mint(&cp, dir.path(), "prepared");
    verify_with_bundle(&cp, &while_prepared).unwrap();
    verify_with_bundle(&cp, &old_svid).unwrap();

    let status = cp.ok(&["ca", "activate"]);
    assert!(status.contains("old") && status.contains("active"), "{status}");
    let s2 = jwks_sequence(&cp);
    assert!(s2 > s1, "activate grows the sequence");
    let new_svid = mint(&cp, dir.path(), "after");

    // Both verify against the current bundle.
    verify_with_bundle(&cp, &old_svid).expect("old CA's SVID still verifies");
    verify_with_bundle(&cp, &new_svid).expect("new CA's SVID verifies");
    // The prepared CA did not sign: the SVID minted while prepared has the
    // same issuer key as the first one, the one after activation does not.
    let aki = |der: &[u8]| {
        keyway_identity::x509::parse(der)
            .unwrap()
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                    a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            })
    };
    assert_eq!(aki(&while_prepared[0]), aki(&old_svid[0]));
    assert_ne!(aki(&new_svid[0]), aki(&old_svid[0]));
    let bundle = keyway_identity::pem::decode_certs(&cp.ok(&["bundle", "show"])).unwrap();
    assert_eq!(bundle.len(), 2, "old and new CA both in the bundle");
}

#[test]
fn automatic_rotation_prepares_activates_and_retires() {
    // A 12s CA: prepare at ~6s, activate at ~10s, old CA retired at its
    // expiry (max SVID TTL = 2s after activation or the CA's end).
    let dir = tempfile::tempdir().unwrap();
    let cp = Binary::spawn(
        &dir.path().join("cp"),
        &["--ca-ttl", "12s", "--svid-ttl", "2s", "--node-svid-ttl", "2s"],
    );
    let first = jwks_sequence(&cp);
    let old_svid = mint(&cp, dir.path(), "early");
    let mut seen = vec![first];
    let mut saw_two_cas = false;
    let mut new_svid_verified = false;
    keyway_tests::wait_until(Duration::from_secs(40), "prepare, activate and retire", || {
        let s = jwks_sequence(&cp);
        if *seen.last().unwrap() != s {
            assert!(s > *seen.last().unwrap(), "sequence only grows");
            seen.push(s);
        }
        let status = cp.ok(&["ca", "status"]);
        if status.contains(" old ") {
            saw_two_cas = true;
            if !new_svid_verified {
                let fresh = mint(&cp, dir.path(), "late");
                verify_with_bundle(&cp, &fresh).expect("new CA's SVID verifies");
                // The early SVID (2s TTL) may have expired by now; while it
                // is valid it must verify.
                if let Err(e) = verify_with_bundle(&cp, &old_svid) {
                    assert!(
                        e.contains("Expired") || e.contains("expired"),
                        "old SVID failed for another reason: {e}"
                    );
                }
                new_svid_verified = true;
            }
        }
        // Done when the old CA has left the bundle after an activation.
        saw_two_cas && !status.contains(" old ")
    });
    // Each of prepare, activate and retire grows the sequence. Count the
    // growth, not the values seen: a slow poll on a loaded machine can see two
    // steps at once, and the retirement can land between the loop's read of
    // the sequence and its read of the status.
    let last = jwks_sequence(&cp);
    seen.push(last);
    assert!(
        last >= first + 3,
        "prepare, activate, retire each grew the sequence: {seen:?}"
    );
}

#[tokio::test]
async fn sync_bundle_reaches_nodes_before_the_new_ca_signs() {
    let cp = InProcess::start(Options::default()).await;
    let mut bundles = cp.cp.subscribe_bundle();
    bundles.borrow_and_update();
    cp.cp.rotate(::control_plane::ca::Step::Prepare).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), bundles.changed())
        .await
        .unwrap()
        .unwrap();
    let published = bundles.borrow_and_update().clone();
    assert_eq!(published.authorities().len(), 2);
    // The active CA has not changed yet: what it signs still chains to the
    // CA that was there before the prepare.
    let active_before = cp.cp.authority().active_id().to_owned();
    cp.cp.rotate(::control_plane::ca::Step::Activate).await.unwrap();
    assert_ne!(cp.cp.authority().active_id(), active_before);
}
