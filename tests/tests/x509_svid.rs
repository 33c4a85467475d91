//! X509-SVIDs minted by the real `control-plane` binary, checked by openssl,
//! by the `spiffe` crate and rule by rule (X5-01..X5-13, ID-*).

use std::path::Path;

use keyway_tests::{Binary, TD, openssl};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::*;

fn read_certs(path: &Path) -> Vec<Vec<u8>> {
    keyway_identity::pem::decode_certs(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn mint(cp: &Binary, id: &str, out: &Path) {
    cp.ok(&[
        "x509",
        "mint",
        "--spiffe-id",
        id,
        "--ttl",
        "1h",
        "--out",
        out.to_str().unwrap(),
    ]);
}

#[test]
fn minted_svid_verifies_with_openssl_and_spiffe_crate() {
    let dir = tempfile::tempdir().unwrap();
    let cp = Binary::spawn(&dir.path().join("cp"), &[]);
    let out = dir.path().join("svid");
    let id = format!("spiffe://{TD}/ns/default/sa/api");
    mint(&cp, &id, &out);

    let (ok, msg) = openssl(&[
        "verify",
        "-purpose",
        "sslclient",
        "-CAfile",
        out.join("bundle.pem").to_str().unwrap(),
        out.join("svid.pem").to_str().unwrap(),
    ]);
    assert!(ok, "openssl verify failed: {msg}");

    // The bundle printed by `bundle show` is the same trust anchor.
    let shown = cp.ok(&["bundle", "show"]);
    assert_eq!(shown, std::fs::read_to_string(out.join("bundle.pem")).unwrap());

    // The key file is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out.join("key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "key.pem must be readable by its owner only");

    let chain: Vec<u8> = read_certs(&out.join("svid.pem")).concat();
    let (_, key) =
        keyway_identity::pem::decode_key(&std::fs::read_to_string(out.join("key.pem")).unwrap()).unwrap();
    let svid = spiffe::X509Svid::parse_from_der(&chain, &key).expect("spiffe crate parses the SVID");
    assert_eq!(svid.spiffe_id().to_string(), id);
}

#[test]
fn x5_rules_hold_on_leaf_and_ca() {
    let dir = tempfile::tempdir().unwrap();
    let cp = Binary::spawn(&dir.path().join("cp"), &[]);
    let out = dir.path().join("svid");
    let id = format!("spiffe://{TD}/ns/prod/sa/billing");
    mint(&cp, &id, &out);
    let leaf_der = read_certs(&out.join("svid.pem")).remove(0);
    let ca_der = read_certs(&out.join("bundle.pem")).remove(0);
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();

    let uris = |c: &X509Certificate| -> Vec<String> {
        c.subject_alternative_name()
            .unwrap()
            .map(|s| {
                s.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::URI(u) => Some(u.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    // X5-01: exactly one URI SAN, the SPIFFE ID. X5-03: it has a path.
    assert_eq!(uris(&leaf), vec![id.clone()]);
    // X5-04: empty subject means a critical SAN.
    let san = leaf
        .extensions()
        .iter()
        .find(|e| matches!(e.parsed_extension(), ParsedExtension::SubjectAlternativeName(_)))
        .unwrap();
    assert!(!leaf.subject().as_raw().is_empty() || san.critical, "X5-04");
    // X5-05: the CA's SPIFFE ID has no path.
    assert_eq!(uris(&ca), vec![format!("spiffe://{TD}")]);
    // X5-07 / X5-08
    assert!(ca.basic_constraints().unwrap().unwrap().value.ca, "X5-07");
    let bc = leaf
        .basic_constraints()
        .unwrap()
        .expect("leaf has basicConstraints");
    assert!(!bc.value.ca, "X5-08");
    // X5-09: keyUsage present and critical on both.
    for c in [&leaf, &ca] {
        assert!(
            c.key_usage().unwrap().expect("keyUsage present").critical,
            "X5-09"
        );
    }
    let ca_ku = ca.key_usage().unwrap().unwrap().value;
    assert!(ca_ku.key_cert_sign(), "X5-10");
    let leaf_ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(leaf_ku.digital_signature(), "X5-11");
    assert!(!leaf_ku.key_cert_sign() && !leaf_ku.crl_sign(), "X5-12");
    // X5-13: EKU has both serverAuth and clientAuth.
    let eku = leaf.extended_key_usage().unwrap().expect("EKU present").value;
    assert!(eku.server_auth && eku.client_auth, "X5-13");
    // NotBefore backdated; NotAfter within the TTL and the CA's life.
    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(nb <= now - 9 && nb >= now - 60, "NotBefore backdated about 10s");
    assert!(na <= now + 3600 && na >= now + 3500);
    assert!(na <= ca.validity().not_after.timestamp());
    // ID-17: the SPIFFE ID and key are in the signed part: the signature verifies.
    assert!(leaf.verify_signature(Some(ca.public_key())).is_ok(), "ID-17");
}

#[test]
fn id_rules_refuse_invalid_ids_and_say_which_rule() {
    let dir = tempfile::tempdir().unwrap();
    let cp = Binary::spawn(&dir.path().join("cp"), &[]);
    let out = dir.path().join("svid");
    for (id, rule) in [
        (format!("spiffe://{TD}/a//b"), "ID-10"),
        (format!("spiffe://{TD}/a/"), "ID-11"),
        (format!("spiffe://{TD}/a b"), "ID-12"),
        (format!("spiffe://{TD}/a?x"), "ID-03"),
        ("spiffe://EXAMPLE.org/a".to_string(), "ID-05"),
        (format!("spiffe://{TD}"), "X5-03"),
        (
            "spiffe://other.org/ns/a/sa/b".to_string(),
            "outside the trust domain",
        ),
    ] {
        let r = cp.cli(&["x509", "mint", "--spiffe-id", &id, "--out", out.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{id} must be refused");
        assert!(err.contains(rule), "{id}: error should cite {rule}: {err}");
    }
    assert!(!out.join("svid.pem").exists(), "nothing written for refused IDs");
}

#[test]
fn upstream_ca_signs_keyway_as_an_intermediate() {
    let dir = tempfile::tempdir().unwrap();
    // An upstream root made with openssl, as an operator would.
    let up_key = dir.path().join("up.key");
    let up_crt = dir.path().join("up.crt");
    let (ok, msg) = openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        up_key.to_str().unwrap(),
        "-out",
        up_crt.to_str().unwrap(),
        "-days",
        "30",
        "-subj",
        "/O=Upstream/CN=Upstream Root",
        "-addext",
        "basicConstraints=critical,CA:true",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    assert!(ok, "{msg}");
    let cp = Binary::spawn(
        &dir.path().join("cp"),
        &[
            "--upstream-ca-cert",
            up_crt.to_str().unwrap(),
            "--upstream-ca-key",
            up_key.to_str().unwrap(),
        ],
    );
    let out = dir.path().join("svid");
    mint(&cp, &format!("spiffe://{TD}/ns/default/sa/api"), &out);
    let chain = read_certs(&out.join("svid.pem"));
    assert_eq!(chain.len(), 2, "leaf + Keyway intermediate");
    assert_eq!(
        read_certs(&out.join("bundle.pem")),
        read_certs(&up_crt),
        "the bundle is the upstream root"
    );
    let inter = dir.path().join("inter.pem");
    std::fs::write(&inter, keyway_identity::pem::encode_certs([chain[1].as_slice()])).unwrap();
    let leaf = dir.path().join("leaf.pem");
    std::fs::write(&leaf, keyway_identity::pem::encode_certs([chain[0].as_slice()])).unwrap();
    let (ok, msg) = openssl(&[
        "verify",
        "-CAfile",
        up_crt.to_str().unwrap(),
        "-untrusted",
        inter.to_str().unwrap(),
        leaf.to_str().unwrap(),
    ]);
    assert!(ok, "chain through the intermediate verifies: {msg}");
}
