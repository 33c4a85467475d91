//! JWT-SVIDs from the real binary, validated by the `spiffe` crate against
//! the JWKS bundle (JWT-01..07, BND-*).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use keyway_tests::{Binary, TD};
use spiffe::{JwtBundle, JwtBundleSet, JwtSvid, TrustDomain};

fn jwt_bundles(jwks: &str) -> JwtBundleSet {
    let doc: serde_json::Value = serde_json::from_str(jwks).unwrap();
    let mut bundle = JwtBundle::new(TrustDomain::new(TD).unwrap());
    // BND-10: only jwt-svid keys validate JWTs.
    for key in doc["keys"].as_array().unwrap() {
        if key["use"] == "jwt-svid" {
            bundle.add_jwk_authority_json(key.to_string().as_bytes()).unwrap();
        }
    }
    let mut set = JwtBundleSet::new();
    set.add_bundle(bundle);
    set
}

#[test]
fn jwt_svid_validates_against_the_jwks_bundle_with_audience_checks() {
    let dir = tempfile::tempdir().unwrap();
    let cp = Binary::spawn(&dir.path().join("cp"), &[]);
    let id = format!("spiffe://{TD}/ns/default/sa/api");
    let token = cp.ok(&[
        "jwt",
        "mint",
        "--spiffe-id",
        &id,
        "--audience",
        "billing",
        "--audience",
        "audit",
    ]);
    let token = token.trim();
    let jwks = cp.ok(&["bundle", "show", "--format", "jwks"]);
    let bundles = jwt_bundles(&jwks);

    let svid = JwtSvid::parse_and_validate(token, &bundles, &["billing"]).expect("valid for its audience");
    assert_eq!(svid.spiffe_id().to_string(), id);
    assert!(
        JwtSvid::parse_and_validate(token, &bundles, &["someone-else"]).is_err(),
        "JWT-06: wrong audience refused"
    );

    // JWT-01/02/03/04: compact, header has only alg/kid/typ, ES256, typ JWT.
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let header: serde_json::Value = serde_json::from_slice(&B64URL.decode(parts[0]).unwrap()).unwrap();
    let mut keys: Vec<&str> = header.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    keys.sort();
    assert_eq!(keys, vec!["alg", "kid", "typ"]);
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["typ"], "JWT");
    // JWT-05/06/07
    let claims: serde_json::Value = serde_json::from_slice(&B64URL.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(claims["sub"], id.as_str());
    assert_eq!(claims["aud"], serde_json::json!(["billing", "audit"]));
    let exp = claims["exp"].as_i64().expect("exp present");
    let iat = claims["iat"].as_i64().unwrap();
    assert!(exp - iat <= 300 && exp > iat, "default JWT TTL 5m");

    // A tampered signature fails.
    let mut sig = B64URL.decode(parts[2]).unwrap();
    sig[5] ^= 1;
    let forged = format!("{}.{}.{}", parts[0], parts[1], B64URL.encode(sig));
    assert!(JwtSvid::parse_and_validate(&forged, &bundles, &["billing"]).is_err());
}

#[test]
fn bundle_document_follows_the_spiffe_bundle_format() {
    let dir = tempfile::tempdir().unwrap();
    let cp = Binary::spawn(&dir.path().join("cp"), &[]);
    let jwks: serde_json::Value =
        serde_json::from_str(&cp.ok(&["bundle", "show", "--format", "jwks"])).unwrap();
    assert!(jwks["spiffe_sequence"].as_u64().unwrap() >= 1, "BND-03");
    assert!(jwks["spiffe_refresh_hint"].is_u64(), "BND-04");
    let keys = jwks["keys"].as_array().expect("BND-05");
    let x509: Vec<_> = keys.iter().filter(|k| k["use"] == "x509-svid").collect();
    let jwt: Vec<_> = keys.iter().filter(|k| k["use"] == "jwt-svid").collect();
    assert_eq!(x509.len(), 1);
    assert_eq!(jwt.len(), 1);
    for k in &x509 {
        assert!(k.get("kid").is_none(), "X5-18: x509 keys have no kid");
        assert_eq!(
            k["x5c"].as_array().unwrap().len(),
            1,
            "X5-18: exactly one x5c cert"
        );
        assert_eq!(k["kty"], "EC", "BND-08");
    }
    for k in &jwt {
        assert!(k["kid"].is_string(), "BND-09: jwt keys carry kid");
    }
    // The x5c certificate is the PEM bundle's certificate.
    let pem = keyway_identity::pem::decode_certs(&cp.ok(&["bundle", "show"])).unwrap();
    let x5c = base64::engine::general_purpose::STANDARD
        .decode(x509[0]["x5c"][0].as_str().unwrap())
        .unwrap();
    assert_eq!(pem, vec![x5c]);
}

#[test]
fn jwt_mint_refuses_bad_ids() {
    let dir = tempfile::tempdir().unwrap();
    let cp = Binary::spawn(&dir.path().join("cp"), &[]);
    let r = cp.cli(&[
        "jwt",
        "mint",
        "--spiffe-id",
        "spiffe://other.org/x",
        "--audience",
        "a",
    ]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("outside the trust domain"));
}
