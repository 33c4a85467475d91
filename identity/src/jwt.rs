//! JWT-SVID validation against a trust domain's SPIFFE bundle document (a JWK
//! Set), as the Workload API's `ValidateJWTSVID` and any other validator need
//! it, and the JWT-only view of that document that `FetchJWTBundles` serves.
//!
//! The checks follow the JWT-SVID profile (conformance rules JWT-01..07), the
//! bundle rules (BND-05, BND-06, BND-10) and WL-15/WL-17; every error names the
//! rule it enforces. Signatures are verified with `ring`, so the algorithms are
//! the JWT-03 list minus ES512 (`ring` has no P-521).
//!
//! Duplicate JSON member names in the header or claims resolve to the last one
//! (`serde_json`'s behaviour), which RFC 7515 §4 and RFC 7519 §4 allow.
//!
//! The token itself never appears in an error: it is a bearer credential.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ring::signature::{self, RsaParameters, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::{Map, Value};
use spiffe::{SpiffeId, TrustDomain};

use crate::spiffe_id::{IdError, parse_svid_id};

/// Clock skew tolerated on `exp` (and `nbf`), in seconds. JWT-07 allows "a
/// small leeway"; 30 s matches what go-spiffe validators accept.
pub const EXPIRY_LEEWAY_SECS: i64 = 30;

/// The only `use` value whose keys may verify JWT-SVIDs (BND-08, BND-10).
const JWT_SVID_USE: &str = "jwt-svid";

/// Longest attacker-chosen value (an `alg`, a `kid`, ...) copied into an error,
/// so that a hostile token cannot flood the logs.
const MAX_ECHO_CHARS: usize = 64;

/// A validated JWT-SVID.
#[derive(Debug, Clone)]
pub struct ValidatedJwt {
    pub spiffe_id: SpiffeId,
    pub audience: Vec<String>,
    pub expiry: i64,
    /// All claims, as the Workload API returns them (google.protobuf.Struct is built from this by the caller).
    pub claims: Map<String, Value>,
}

/// Why a JWT-SVID was refused, or why a bundle document cannot be used. Each
/// message names the conformance rule (shared/design/spiffe-conformance.md), so
/// whoever sees it (an operator, a workload reading a gRPC status) can look it
/// up and fix the issuer, the token or the bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed JWT-SVID: {reason}; only the JWS compact serialization is accepted (rule JWT-01)")]
    Malformed { reason: &'static str },
    #[error("JWT-SVID header field {field:?} is not allowed; only alg, kid and typ may appear (rule JWT-02)")]
    UnexpectedHeader { field: String },
    #[error(
        "JWT-SVID algorithm {alg} is not allowed; use RS256/384/512, ES256/384/512 or PS256/384/512 (rule JWT-03)"
    )]
    UnsupportedAlgorithm { alg: String },
    #[error(
        "JWT-SVID algorithm {alg} is allowed (rule JWT-03) but this validator cannot verify it; sign with ES256"
    )]
    AlgorithmNotImplemented { alg: String },
    #[error("JWT-SVID typ {typ} is not allowed; when present it must be \"JWT\" or \"JOSE\" (rule JWT-04)")]
    BadType { typ: String },
    #[error("JWT-SVID has no kid header, so no bundle key can be chosen (rules JWT-02, BND-09)")]
    MissingKeyId,
    #[error("JWT-SVID has no sub claim, or it is not a string (rule JWT-05)")]
    MissingSubject,
    #[error("JWT-SVID sub is not a workload SPIFFE ID (rule JWT-05): {0}")]
    InvalidSubject(IdError),
    #[error(
        "JWT-SVID subject {subject} is in another trust domain than the bundle of {trust_domain}; validate it with the bundle of its own trust domain (rule WL-17)"
    )]
    TrustDomainMismatch { subject: String, trust_domain: String },
    #[error("JWT-SVID has no aud claim, or it holds no audience (rule JWT-06)")]
    MissingAudience,
    #[error("JWT-SVID aud claim must be a string or an array of strings (rule JWT-06)")]
    InvalidAudience,
    #[error("JWT-SVID is not meant for audience {audience:?}: it is not in the aud claim (rule JWT-06)")]
    AudienceMismatch { audience: String },
    #[error("JWT-SVID has no exp claim (rule JWT-07)")]
    MissingExpiry,
    #[error("JWT-SVID exp claim is not a number of seconds since the epoch (rule JWT-07)")]
    InvalidExpiry,
    #[error("JWT-SVID expired at {exp}; it is now {now} (leeway {EXPIRY_LEEWAY_SECS} s) (rule JWT-07)")]
    Expired { exp: i64, now: i64 },
    #[error("JWT-SVID nbf claim is not a number of seconds since the epoch (RFC 7519 §4.1.5)")]
    InvalidNotBefore,
    #[error(
        "JWT-SVID is not valid before {nbf}; it is now {now} (leeway {EXPIRY_LEEWAY_SECS} s) (RFC 7519 §4.1.5)"
    )]
    NotYetValid { nbf: i64, now: i64 },
    #[error(
        "no jwt-svid key with kid {kid:?} in the trust domain's bundle; keys of other uses do not count (rules BND-06, BND-10)"
    )]
    KeyNotFound { kid: String },
    #[error("bundle key {kid:?} cannot verify this JWT-SVID: {reason}")]
    UnusableKey { kid: String, reason: &'static str },
    #[error("JWT-SVID signature does not verify with bundle key {kid:?}")]
    BadSignature { kid: String },
    #[error("the bundle document is not a JWK Set with a keys array: {reason} (rules BND-01, BND-05)")]
    InvalidBundle { reason: &'static str },
}

/// Validates `token` for `audience` against the bundle document `jwks` of trust domain `td` at unix time `now` (leeway 30 s for exp).
///
/// The bundle must be the one of the subject's trust domain (WL-17): the
/// caller picks it by `td`, and a token whose `sub` lies elsewhere is refused
/// rather than checked against the wrong keys. An empty `audience` matches
/// nothing; the Workload API refuses it earlier with `InvalidArgument` (WL-16).
///
/// Claims are only trusted after the signature verifies: before that, only
/// what is needed to pick the key (`kid`, the subject's trust domain) is read.
pub fn validate(
    token: &str,
    td: &TrustDomain,
    jwks: &[u8],
    audience: &str,
    now: i64,
) -> Result<ValidatedJwt, JwtError> {
    let parts = split(token)?;
    let header = parse_header(&parts.header)?;
    let claims: Map<String, Value> =
        serde_json::from_slice(&parts.claims).map_err(|_| JwtError::Malformed {
            reason: "the claims are not a JSON object",
        })?;

    let spiffe_id = subject(&claims)?;
    if !spiffe_id.is_member_of(td) {
        return Err(JwtError::TrustDomainMismatch {
            subject: spiffe_id.to_string(),
            trust_domain: td.to_string(),
        });
    }

    let keys = bundle_keys(jwks)?;
    let key = keys
        .iter()
        .filter_map(Value::as_object)
        .filter(|k| is_usable_jwt_key(k))
        .find(|k| k.get("kid").and_then(Value::as_str) == Some(header.kid.as_str()))
        .ok_or_else(|| JwtError::KeyNotFound {
            kid: echo(&header.kid),
        })?;
    verify(
        header.alg,
        key,
        &header.kid,
        parts.signing_input.as_bytes(),
        &parts.signature,
    )?;

    let expiry = match claims.get("exp") {
        None | Some(Value::Null) => return Err(JwtError::MissingExpiry),
        Some(v) => numeric_date(v).ok_or(JwtError::InvalidExpiry)?,
    };
    if now.saturating_sub(EXPIRY_LEEWAY_SECS) > expiry {
        return Err(JwtError::Expired { exp: expiry, now });
    }
    match claims.get("nbf") {
        None | Some(Value::Null) => {}
        Some(v) => {
            let nbf = numeric_date(v).ok_or(JwtError::InvalidNotBefore)?;
            if now.saturating_add(EXPIRY_LEEWAY_SECS) < nbf {
                return Err(JwtError::NotYetValid { nbf, now });
            }
        }
    }

    let aud = audiences(&claims)?;
    if audience.is_empty() || !aud.iter().any(|a| a == audience) {
        return Err(JwtError::AudienceMismatch {
            audience: echo(audience),
        });
    }

    Ok(ValidatedJwt {
        spiffe_id,
        audience: aud,
        expiry,
        claims,
    })
}

/// The JWKS document with only `jwt-svid` keys (what FetchJWTBundles serves: WL-15 says x509 keys must not be included). Keeps spiffe_sequence and spiffe_refresh_hint.
///
/// Every other top-level member is kept as is, so the served document stays
/// the same bundle (same sequence) minus the keys workloads must not see.
pub fn jwt_only_bundle(jwks: &[u8]) -> Result<Vec<u8>, JwtError> {
    let mut doc = bundle_document(jwks)?;
    match doc.get_mut("keys") {
        Some(Value::Array(keys)) => keys.retain(|k| {
            k.as_object().and_then(|k| k.get("use")).and_then(Value::as_str) == Some(JWT_SVID_USE)
        }),
        Some(_) => return Err(bad_keys_member()),
        None => return Err(missing_keys_member()),
    }
    serde_json::to_vec(&doc).map_err(|_| JwtError::InvalidBundle {
        reason: "it cannot be serialized again",
    })
}

/// The three segments of a compact JWS, decoded.
struct Parts<'a> {
    header: Vec<u8>,
    claims: Vec<u8>,
    signature: Vec<u8>,
    /// `BASE64URL(header) || '.' || BASE64URL(claims)`, what the signature covers.
    signing_input: &'a str,
}

fn split(token: &str) -> Result<Parts<'_>, JwtError> {
    let malformed = |reason| JwtError::Malformed { reason };
    if token.trim_start().starts_with('{') {
        return Err(malformed("the JWS JSON serialization is not allowed"));
    }
    let (signing_input, signature) = token
        .rsplit_once('.')
        .ok_or_else(|| malformed("expected three dot-separated parts"))?;
    let (header, claims) = signing_input
        .split_once('.')
        .ok_or_else(|| malformed("expected three dot-separated parts"))?;
    if claims.contains('.') {
        return Err(malformed("expected three dot-separated parts"));
    }
    if header.is_empty() || claims.is_empty() {
        return Err(malformed("the header or the claims segment is empty"));
    }
    let decode = |segment: &str, reason| B64URL.decode(segment).map_err(|_| malformed(reason));
    Ok(Parts {
        header: decode(header, "the header is not unpadded base64url")?,
        claims: decode(claims, "the claims are not unpadded base64url")?,
        signature: decode(signature, "the signature is not unpadded base64url")?,
        signing_input,
    })
}

/// A JWS `alg` the JWT-SVID profile allows (JWT-03).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
    Rs256,
    Rs384,
    Rs512,
    Es256,
    Es384,
    Es512,
    Ps256,
    Ps384,
    Ps512,
}

impl Alg {
    fn parse(alg: &str) -> Option<Self> {
        Some(match alg {
            "RS256" => Self::Rs256,
            "RS384" => Self::Rs384,
            "RS512" => Self::Rs512,
            "ES256" => Self::Es256,
            "ES384" => Self::Es384,
            "ES512" => Self::Es512,
            "PS256" => Self::Ps256,
            "PS384" => Self::Ps384,
            "PS512" => Self::Ps512,
            _ => return None,
        })
    }

    fn rsa_params(self) -> Option<&'static RsaParameters> {
        Some(match self {
            Self::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            Self::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
            Self::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
            Self::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
            Self::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
            Self::Ps512 => &signature::RSA_PSS_2048_8192_SHA512,
            Self::Es256 | Self::Es384 | Self::Es512 => return None,
        })
    }
}

struct Header {
    alg: Alg,
    kid: String,
}

fn parse_header(bytes: &[u8]) -> Result<Header, JwtError> {
    let header: Map<String, Value> = serde_json::from_slice(bytes).map_err(|_| JwtError::Malformed {
        reason: "the header is not a JSON object",
    })?;
    if let Some(field) = header
        .keys()
        .find(|k| !matches!(k.as_str(), "alg" | "kid" | "typ"))
    {
        return Err(JwtError::UnexpectedHeader { field: echo(field) });
    }
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .and_then(Alg::parse)
        .ok_or_else(|| JwtError::UnsupportedAlgorithm {
            alg: describe(header.get("alg")),
        })?;
    match header.get("typ") {
        None => {}
        Some(Value::String(t)) if t == "JWT" || t == "JOSE" => {}
        Some(other) => {
            return Err(JwtError::BadType {
                typ: describe(Some(other)),
            });
        }
    }
    let kid = match header.get("kid") {
        Some(Value::String(kid)) if !kid.is_empty() => kid.clone(),
        _ => return Err(JwtError::MissingKeyId),
    };
    Ok(Header { alg, kid })
}

fn subject(claims: &Map<String, Value>) -> Result<SpiffeId, JwtError> {
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or(JwtError::MissingSubject)?;
    parse_svid_id(sub).map_err(JwtError::InvalidSubject)
}

/// `aud` as a list: RFC 7519 allows a single string as well as an array, and
/// go-spiffe issuers may send either.
fn audiences(claims: &Map<String, Value>) -> Result<Vec<String>, JwtError> {
    let aud = match claims.get("aud") {
        None | Some(Value::Null) => return Err(JwtError::MissingAudience),
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or(JwtError::InvalidAudience)?,
        Some(_) => return Err(JwtError::InvalidAudience),
    };
    if aud.iter().all(String::is_empty) {
        return Err(JwtError::MissingAudience);
    }
    Ok(aud)
}

/// A NumericDate (RFC 7519 §2): seconds, possibly fractional; rounded down and
/// clamped to `i64`.
fn numeric_date(v: &Value) -> Option<i64> {
    let n = v.as_number()?;
    n.as_i64()
        .or_else(|| n.as_u64().map(|_| i64::MAX))
        .or_else(|| n.as_f64().map(|f| f.floor() as i64))
}

fn bundle_document(jwks: &[u8]) -> Result<Map<String, Value>, JwtError> {
    serde_json::from_slice(jwks).map_err(|_| JwtError::InvalidBundle {
        reason: "it is not a JSON object",
    })
}

fn bundle_keys(jwks: &[u8]) -> Result<Vec<Value>, JwtError> {
    match bundle_document(jwks)?.remove("keys") {
        Some(Value::Array(keys)) => Ok(keys),
        Some(_) => Err(bad_keys_member()),
        None => Err(missing_keys_member()),
    }
}

fn missing_keys_member() -> JwtError {
    JwtError::InvalidBundle {
        reason: "it has no keys member",
    }
}

fn bad_keys_member() -> JwtError {
    JwtError::InvalidBundle {
        reason: "its keys member is not an array",
    }
}

/// Whether a bundle entry may verify JWT-SVIDs at all: `use` is exactly
/// `jwt-svid` (BND-10) and `kty` is one this validator knows (BND-06 says to
/// ignore the others rather than fail the whole bundle).
fn is_usable_jwt_key(key: &Map<String, Value>) -> bool {
    key.get("use").and_then(Value::as_str) == Some(JWT_SVID_USE)
        && matches!(key.get("kty").and_then(Value::as_str), Some("EC" | "RSA"))
}

fn verify(alg: Alg, key: &Map<String, Value>, kid: &str, message: &[u8], sig: &[u8]) -> Result<(), JwtError> {
    let unusable = |reason| JwtError::UnusableKey {
        kid: echo(kid),
        reason,
    };
    let bad_signature = || JwtError::BadSignature { kid: echo(kid) };
    let kty = key.get("kty").and_then(Value::as_str);
    let member = |name: &str, reason| {
        key.get(name)
            .and_then(Value::as_str)
            .and_then(|v| B64URL.decode(v).ok())
            .ok_or_else(|| unusable(reason))
    };
    if let Some(params) = alg.rsa_params() {
        if kty != Some("RSA") {
            return Err(unusable("the token's RS/PS algorithm needs an RSA key"));
        }
        let n = member("n", "n is missing or not base64url")?;
        let e = member("e", "e is missing or not base64url")?;
        let n = strip_leading_zeros(&n);
        let e = strip_leading_zeros(&e);
        if !(2048..=8192).contains(&bit_len(n)) {
            return Err(unusable("the RSA modulus must be 2048 to 8192 bits"));
        }
        if e.len() > 5 || e.last().is_none_or(|b| b & 1 == 0) || bit_len(e) < 2 {
            return Err(unusable(
                "the RSA exponent must be odd, at least 3 and at most 33 bits",
            ));
        }
        return RsaPublicKeyComponents { n, e }
            .verify(params, message, sig)
            .map_err(|_| bad_signature());
    }
    let (crv, coordinate_len, algorithm) = match alg {
        Alg::Es256 => ("P-256", 32, &signature::ECDSA_P256_SHA256_FIXED),
        Alg::Es384 => ("P-384", 48, &signature::ECDSA_P384_SHA384_FIXED),
        _ => {
            return Err(JwtError::AlgorithmNotImplemented {
                alg: format!("{alg:?}").to_uppercase(),
            });
        }
    };
    if kty != Some("EC") {
        return Err(unusable("the token's ES algorithm needs an EC key"));
    }
    if key.get("crv").and_then(Value::as_str) != Some(crv) {
        return Err(unusable("the key's curve does not match the token's algorithm"));
    }
    let x = member("x", "x is missing or not base64url")?;
    let y = member("y", "y is missing or not base64url")?;
    if x.len() != coordinate_len || y.len() != coordinate_len {
        return Err(unusable("x and y must be full-length coordinates of the curve"));
    }
    // Uncompressed SEC1 point: 0x04 || X || Y. A point that is not on the
    // curve fails inside ring and is reported as a bad signature.
    let mut point = Vec::with_capacity(1 + 2 * coordinate_len);
    point.push(0x04);
    point.extend_from_slice(&x);
    point.extend_from_slice(&y);
    UnparsedPublicKey::new(algorithm, point)
        .verify(message, sig)
        .map_err(|_| bad_signature())
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

/// Bit length of a big-endian integer without leading zero bytes.
fn bit_len(bytes: &[u8]) -> usize {
    match bytes.first() {
        None => 0,
        Some(&first) => bytes.len() * 8 - first.leading_zeros() as usize,
    }
}

/// An attacker-chosen string, cut short for an error message.
fn echo(s: &str) -> String {
    match s.char_indices().nth(MAX_ECHO_CHARS) {
        Some((end, _)) => format!("{}...", &s[..end]),
        None => s.to_owned(),
    }
}

/// A header value for an error message: strings quoted, anything else as JSON.
fn describe(v: Option<&Value>) -> String {
    match v {
        None => "(missing)".to_owned(),
        Some(v) => echo(&v.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use ring::rand::SystemRandom;
    use ring::signature::{
        ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair,
        EcdsaSigningAlgorithm, KeyPair, RsaKeyPair,
    };
    use serde_json::json;

    const NOW: i64 = 1_700_000_000;
    const AUDIENCE: &str = "spiffe://example.org/ns/db/sa/postgres";
    const SUBJECT: &str = "spiffe://example.org/ns/web/sa/frontend";

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    /// A test signer; the JWK is built the way control-plane/src/jwt.rs does.
    struct EcSigner {
        kid: String,
        key: EcdsaKeyPair,
        crv: &'static str,
        alg: &'static str,
    }

    fn ec_signer(kid: &str, alg: &'static EcdsaSigningAlgorithm) -> EcSigner {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        let (crv, alg) = if std::ptr::eq(alg, &ECDSA_P256_SHA256_FIXED_SIGNING) {
            ("P-256", "ES256")
        } else {
            ("P-384", "ES384")
        };
        EcSigner {
            kid: kid.to_owned(),
            key,
            crv,
            alg,
        }
    }

    fn es256(kid: &str) -> EcSigner {
        ec_signer(kid, &ECDSA_P256_SHA256_FIXED_SIGNING)
    }

    impl EcSigner {
        fn jwk(&self, key_use: &str) -> Value {
            let point = self.key.public_key().as_ref();
            let len = (point.len() - 1) / 2;
            json!({
                "kty": "EC",
                "crv": self.crv,
                "x": B64URL.encode(&point[1..1 + len]),
                "y": B64URL.encode(&point[1 + len..]),
                "kid": self.kid,
                "use": key_use,
            })
        }

        fn header(&self) -> Value {
            json!({ "alg": self.alg, "kid": self.kid, "typ": "JWT" })
        }

        fn sign(&self, header: &Value, claims: &Value) -> String {
            let input = signing_input(header, claims);
            let sig = self.key.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
            format!("{input}.{}", B64URL.encode(sig.as_ref()))
        }

        fn token(&self, claims: &Value) -> String {
            self.sign(&self.header(), claims)
        }
    }

    fn signing_input(header: &Value, claims: &Value) -> String {
        format!(
            "{}.{}",
            B64URL.encode(header.to_string()),
            B64URL.encode(claims.to_string())
        )
    }

    fn claims() -> Value {
        json!({ "sub": SUBJECT, "aud": [AUDIENCE], "exp": NOW + 300, "iat": NOW })
    }

    fn bundle(keys: &[Value]) -> Vec<u8> {
        json!({ "keys": keys, "spiffe_sequence": 3, "spiffe_refresh_hint": 300 })
            .to_string()
            .into_bytes()
    }

    fn check(token: &str, jwks: &[u8]) -> Result<ValidatedJwt, JwtError> {
        validate(token, &td(), jwks, AUDIENCE, NOW)
    }

    #[test]
    fn valid_es256_token_is_accepted() {
        let signer = es256("k1");
        let other = es256("k0");
        let jwks = bundle(&[other.jwk("jwt-svid"), signer.jwk("jwt-svid")]);
        let jwt = check(&signer.token(&claims()), &jwks).unwrap();
        assert_eq!(jwt.spiffe_id.to_string(), SUBJECT);
        assert_eq!(jwt.audience, vec![AUDIENCE.to_owned()]);
        assert_eq!(jwt.expiry, NOW + 300);
        assert_eq!(jwt.claims.get("iat"), Some(&json!(NOW)));
        assert_eq!(jwt.claims.get("sub"), Some(&json!(SUBJECT)));
    }

    #[test]
    fn jwt03_es384_token_is_accepted() {
        let signer = ec_signer("k384", &ECDSA_P384_SHA384_FIXED_SIGNING);
        let jwks = bundle(&[signer.jwk("jwt-svid")]);
        check(&signer.token(&claims()), &jwks).unwrap();
    }

    #[test]
    fn jwt03_rs256_and_ps256_tokens_are_accepted() {
        let pkcs8 = base64::engine::general_purpose::STANDARD
            .decode(TEST_RSA_PKCS8)
            .unwrap();
        let key = RsaKeyPair::from_pkcs8(&pkcs8).unwrap();
        let public = RsaPublicKeyComponents::<Vec<u8>>::from(key.public());
        let jwks = bundle(&[json!({
            "kty": "RSA",
            "n": B64URL.encode(&public.n),
            "e": B64URL.encode(&public.e),
            "kid": "rsa",
            "use": "jwt-svid",
        })]);
        for (alg, encoding) in [
            (
                "RS256",
                &signature::RSA_PKCS1_SHA256 as &dyn signature::RsaEncoding,
            ),
            ("PS256", &signature::RSA_PSS_SHA256),
            ("RS512", &signature::RSA_PKCS1_SHA512),
        ] {
            let input = signing_input(&json!({ "alg": alg, "kid": "rsa" }), &claims());
            let mut sig = vec![0; key.public().modulus_len()];
            key.sign(encoding, &SystemRandom::new(), input.as_bytes(), &mut sig)
                .unwrap();
            let token = format!("{input}.{}", B64URL.encode(&sig));
            check(&token, &jwks).unwrap();
            // The same key under an EC algorithm is refused for the key, not the signature.
            let input = signing_input(&json!({ "alg": "ES256", "kid": "rsa" }), &claims());
            let token = format!("{input}.{}", B64URL.encode(&sig));
            assert!(matches!(check(&token, &jwks), Err(JwtError::UnusableKey { .. })));
        }
    }

    #[test]
    fn jwt03_es512_is_allowed_but_not_implemented() {
        let signer = es256("k1");
        let jwks = bundle(&[signer.jwk("jwt-svid")]);
        let token = signer.sign(&json!({ "alg": "ES512", "kid": "k1" }), &claims());
        assert_eq!(
            check(&token, &jwks).unwrap_err(),
            JwtError::AlgorithmNotImplemented { alg: "ES512".into() }
        );
    }

    #[test]
    fn jwt06_wrong_audience_is_refused() {
        let signer = es256("k1");
        let jwks = bundle(&[signer.jwk("jwt-svid")]);
        let token = signer.token(&claims());
        let err = validate(&token, &td(), &jwks, "spiffe://example.org/ns/other/sa/x", NOW).unwrap_err();
        assert!(matches!(err, JwtError::AudienceMismatch { .. }));
        assert!(err.to_string().contains("(rule JWT-06)"), "{err}");
        // An empty expected audience never matches, even an empty aud entry.
        let mut c = claims();
        c["aud"] = json!(["", AUDIENCE]);
        let err = validate(&signer.token(&c), &td(), &jwks, "", NOW).unwrap_err();
        assert!(matches!(err, JwtError::AudienceMismatch { .. }));
    }

    #[test]
    fn jwt06_aud_as_plain_string_is_accepted() {
        let signer = es256("k1");
        let jwks = bundle(&[signer.jwk("jwt-svid")]);
        let mut c = claims();
        c["aud"] = json!(AUDIENCE);
        let jwt = check(&signer.token(&c), &jwks).unwrap();
        assert_eq!(jwt.audience, vec![AUDIENCE.to_owned()]);
    }

    #[test]
    fn jwt06_missing_or_empty_aud_is_refused() {
        let signer = es256("k1");
        let jwks = bundle(&[signer.jwk("jwt-svid")]);
        for aud in [Value::Null, json!([]), json!("")] {
            let mut c = claims();
            c["aud"] = aud;
            assert_eq!(
                check(&signer.token(&c), &jwks).unwrap_err(),
                JwtError::MissingAudience
            );
        }
        let mut c = claims();
        c.as_object_mut().unwrap().remove("aud");
        assert_eq!(
            check(&signer.token(&c), &jwks).unwrap_err(),
            JwtError::MissingAudience
        );
        c["aud"] = json!([AUDIENCE, 7]);
        assert_eq!(
            check(&signer.token(&c), &jwks).unwrap_err(),
            JwtError::InvalidAudience
        );
    }

    #[test]
    fn jwt07_expired_token_is_refused_after_the_leeway() {
        let signer = es256("k1");
        let jwks = bundle(&[signer.jwk("jwt-svid")]);
        let mut c = claims();
        c["exp"] = json!(NOW - EXPIRY_LEEWAY_SECS - 1);
        let err = check(&signer.token(&c), &jwks).unwrap_err();
        assert!(matches!(err, JwtError::Expired { .. }));
        assert!(err.to_string().contains("(rule JWT-07)"), "{err}");
        // Within the leeway it still passes.
        c["exp"] = json!(NOW - EXPIRY_LEEWAY_SECS);
        check(&signer.token(&c), &jwks).unwrap();
    }

    #[test]
    fn jwt07_missing_exp_is_refused() {
        let signer = es256("k1");
        let jwks = bundle(&[signer.jwk("jwt-svid")]);
        let mut c = claims();
        c.as_object_mut().unwrap().remove("exp");
        assert_eq!(
            check(&signer.token(&c), &jwks).unwrap_err(),
            JwtError::MissingExpiry
        );
        c["exp"] = json!("tomorrow");
        assert_eq!(
            check(&signer.token(&c), &jwks).unwrap_err(),
            JwtError::InvalidExpiry
        );
    }

    #[test]
    fn rfc7519_future_nbf_is_refused() {
        let signer = es256("k1");
        let jwks = bundle(&[signer.jwk("jwt-svid")]);
        let mut c = claims();
        c["nbf"] = json!(NOW + 120);
        assert!(matches!(
            check(&signer.token(&c), &jwks),
            Err(JwtError::NotYetValid { .. })
        ));
        c["nbf"] = json!(NOW + 10);
        check(&signer.token(&c), &jwks).unwrap();
    }

    #[test]
    fn jwt03_alg_none_is_refused() {
        let signer = es256("k1");
        let jwks = bundle(&[signer.jwk("jwt-svid")]);
        let token = format!(
            "{}.",
            signing_input(&json!({ "alg": "none", "kid": "k1" }), &claims())
        );
        let err = check(&token, &jwks).unwrap_err();
        assert_eq!(
            err,
            JwtError::UnsupportedAlgorithm {
                alg: "\"none\"".into()
            }
        );
        assert!(err.to_string().contains("(rule JWT-03)"), "{err}");
        let token = format!("{}.", signing_input(&json!({ "kid": "k1" }), &claims()));
        assert!(matches!(
            check(&token, &jwks),
            Err(JwtError::UnsupportedAlgorithm { .. })
        ));
    }

    #[test]
    fn jwt03_hs256_is_refused() {
        // The classic confusion attack: HMAC keyed with the public JWK.
        let signer = es256("k1");
        let jwk = signer.jwk("jwt-svid");
        let jwks = bundle(std::slice::from_ref(&jwk));
        let input = signing_input(&json!({ "alg": "HS256", "kid": "k1", "typ": "JWT" }), &claims());
        let mac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, jwk.to_string().as_bytes());
        let tag = ring::hmac::sign(&mac_key, input.as_bytes());
        let token = format!("{input}.{}", B64URL.encode(tag.as_ref()));
        assert!(matches!(
            check(&token, &jwks),
            Err(JwtError::UnsupportedAlgorithm { .. })
        ));
    }

    #[test]
    fn jwt02_extra_header_field_is_refused() {
        let signer = es256("k1");
        let jwks = bundle(&[signer.jwk("jwt-svid")]);
        let mut header = signer.header();
        header["jku"] = json!("https://attacker.example/jwks");
        let err = check(&signer.sign(&header, &claims()), &jwks).unwrap_err();
        assert_eq!(err, JwtError::UnexpectedHeader { field: "jku".into() });
        assert!(err.to_string().contains("(rule JWT-02)"), "{err}");
    }

    #[test]
    fn jwt04_typ_foo_is_refused() {
        let signer = es256("k1");
        let jwks = bundle(&[signer.jwk("jwt-svid")]);
        let mut header = signer.header();
        header["typ"] = json!("foo");
        let err = check(&signer.sign(&header, &claims()), &jwks).unwrap_err();
        assert!(matches!(err, JwtError::BadType { .. }));
        assert!(err.to_string().contains("(rule JWT-04)"), "{err}");
    }

    #[test]
    fn jwt04_typ_jose_or_absent_is_accepted() {
        let signer = es256("k1");
        let jwks = bundle(&[signer.jwk("jwt-svid")]);
        let mut header = signer.header();
        header["typ"] = json!("JOSE");
        check(&signer.sign(&header, &claims()), &jwks).unwrap();
        header.as_object_mut().unwrap().remove("typ");
        check(&signer.sign(&header, &claims()), &jwks).unwrap();
    }

    #[test]
    fn jwt01_json_serialization_and_bad_segments_are_refused() {
        let signer = es256("k1");
        let jwks = bundle(&[signer.jwk("jwt-svid")]);
        let token = signer.token(&claims());
        let json_form = json!({ "payload": "x", "signatures": [] }).to_string();
        let five_parts = format!("{token}.a.b");
        let padded = format!("{token}==");
        for bad in [
            json_form.as_str(),
            "",
            "abc",
            "a.b",
            five_parts.as_str(),
            padded.as_str(),
        ] {
            let err = check(bad, &jwks).unwrap_err();
            assert!(matches!(err, JwtError::Malformed { .. }), "{bad}: {err}");
            assert!(err.to_string().contains("(rule JWT-01)"), "{err}");
        }
    }

    #[test]
    fn bnd09_missing_kid_is_refused() {
        let signer = es256("k1");
        let jwks = bundle(&[signer.jwk("jwt-svid")]);
        let token = signer.sign(&json!({ "alg": "ES256", "typ": "JWT" }), &claims());
        assert_eq!(check(&token, &jwks).unwrap_err(), JwtError::MissingKeyId);
    }

    #[test]
    fn bnd10_unknown_kid_is_refused() {
        let signer = es256("k1");
        let other = es256("k2");
        let jwks = bundle(&[other.jwk("jwt-svid")]);
        let err = check(&signer.token(&claims()), &jwks).unwrap_err();
        assert_eq!(err, JwtError::KeyNotFound { kid: "k1".into() });
        assert!(err.to_string().contains("BND-10"), "{err}");
    }

    #[test]
    fn bnd10_kid_only_on_an_x509_svid_key_is_refused() {
        let signer = es256("k1");
        let jwks = bundle(&[signer.jwk("x509-svid")]);
        assert_eq!(
            check(&signer.token(&claims()), &jwks).unwrap_err(),
            JwtError::KeyNotFound { kid: "k1".into() }
        );
    }

    #[test]
    fn bnd07_empty_bundle_refuses_everything() {
        let signer = es256("k1");
        assert!(matches!(
            check(&signer.token(&claims()), &bundle(&[])),
            Err(JwtError::KeyNotFound { .. })
        ));
        assert!(matches!(
            check(&signer.token(&claims()), b"{}"),
            Err(JwtError::InvalidBundle { .. })
        ));
        assert!(matches!(
            check(&signer.token(&claims()), b""),
            Err(JwtError::InvalidBundle { .. })
        ));
    }

    #[test]
    fn bnd06_keys_with_unknown_kty_or_use_are_ignored() {
        let signer = es256("k1");
        let mut no_use = signer.jwk("jwt-svid");
        no_use.as_object_mut().unwrap().remove("use");
        let jwks = bundle(&[
            json!({ "kty": "OKP", "crv": "Ed25519", "x": "AAAA", "kid": "k1", "use": "jwt-svid" }),
            json!({ "kty": "EC", "kid": "k1", "use": "wit-svid" }),
            json!("not a key"),
            no_use,
            signer.jwk("jwt-svid"),
        ]);
        check(&signer.token(&claims()), &jwks).unwrap();
    }

    #[test]
    fn tampered_signature_is_refused() {
        let signer = es256("k1");
        let jwks = bundle(&[signer.jwk("jwt-svid")]);
        let token = signer.token(&claims());
        let (input, sig) = token.rsplit_once('.').unwrap();
        let mut sig = B64URL.decode(sig).unwrap();
        sig[10] ^= 0x01;
        let tampered = format!("{input}.{}", B64URL.encode(&sig));
        let err = check(&tampered, &jwks).unwrap_err();
        assert_eq!(err, JwtError::BadSignature { kid: "k1".into() });

        // Claims swapped under a valid signature are refused too.
        let (_, original_sig) = token.rsplit_once('.').unwrap();
        let mut c = claims();
        c["aud"] = json!(["spiffe://example.org/ns/web/sa/attacker"]);
        let forged = format!("{}.{original_sig}", signing_input(&signer.header(), &c));
        assert!(matches!(
            check(&forged, &jwks),
            Err(JwtError::BadSignature { .. })
        ));

        // A key of the wrong curve for the algorithm is refused as unusable.
        let p384 = ec_signer("k1", &ECDSA_P384_SHA384_FIXED_SIGNING);
        let jwks = bundle(&[p384.jwk("jwt-svid")]);
        assert!(matches!(check(&token, &jwks), Err(JwtError::UnusableKey { .. })));
    }

    #[test]
    fn wl17_sub_in_another_trust_domain_is_refused() {
        let signer = es256("k1");
        let jwks = bundle(&[signer.jwk("jwt-svid")]);
        let mut c = claims();
        c["sub"] = json!("spiffe://other.org/ns/web/sa/frontend");
        let err = check(&signer.token(&c), &jwks).unwrap_err();
        assert!(matches!(err, JwtError::TrustDomainMismatch { .. }));
        assert!(err.to_string().contains("(rule WL-17)"), "{err}");
    }

    #[test]
    fn jwt05_missing_or_invalid_sub_is_refused() {
        let signer = es256("k1");
        let jwks = bundle(&[signer.jwk("jwt-svid")]);
        let mut c = claims();
        c.as_object_mut().unwrap().remove("sub");
        assert_eq!(
            check(&signer.token(&c), &jwks).unwrap_err(),
            JwtError::MissingSubject
        );
        for sub in [
            "spiffe://example.org",
            "https://example.org/ns/web",
            "spiffe://example.org/a//b",
        ] {
            c["sub"] = json!(sub);
            let err = check(&signer.token(&c), &jwks).unwrap_err();
            assert!(matches!(err, JwtError::InvalidSubject(_)), "{sub}: {err}");
            assert!(err.to_string().contains("(rule JWT-05)"), "{err}");
        }
    }

    #[test]
    fn wl15_jwt_only_bundle_drops_x509_keys_and_keeps_sequence() {
        let signer = es256("k1");
        let x509 =
            json!({ "kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "use": "x509-svid", "x5c": ["AAAA"] });
        let jwks = bundle(&[x509, signer.jwk("jwt-svid")]);
        let out: Value = serde_json::from_slice(&jwt_only_bundle(&jwks).unwrap()).unwrap();
        assert_eq!(out["keys"], json!([signer.jwk("jwt-svid")]));
        assert_eq!(out["spiffe_sequence"], json!(3));
        assert_eq!(out["spiffe_refresh_hint"], json!(300));
        // The filtered document still validates tokens.
        let filtered = jwt_only_bundle(&jwks).unwrap();
        check(&signer.token(&claims()), &filtered).unwrap();
        assert!(matches!(
            jwt_only_bundle(br#"{"keys": {}}"#),
            Err(JwtError::InvalidBundle { .. })
        ));
    }

    #[test]
    fn errors_do_not_echo_long_attacker_values() {
        let signer = es256("k1");
        let jwks = bundle(&[signer.jwk("jwt-svid")]);
        let long = "x".repeat(10_000);
        let header = json!({ "alg": "ES256", "kid": long });
        let err = check(&signer.sign(&header, &claims()), &jwks).unwrap_err();
        assert!(err.to_string().len() < 400, "{err}");
    }

    /// A 2048-bit RSA key made for these tests only (`openssl genpkey`), as
    /// base64 PKCS#8 DER: `ring` cannot generate RSA keys.
    const TEST_RSA_PKCS8: &str = concat!(
        "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQDSK1rKN+0FG3CVlMfqQyXMAlTU2/l9iYXsQJI4/GuCyTnb",
        "noxzYrvFwZ5DZWsyVYklh52ABxsXRUsLfBsVMStiLsW7yMgFwj0HOYC6RCxnjoosW/WEnb/zLP2SEr35qkDRaWs8Jr2nYhCx",
        "/AfXF5KQwYVE9JdjNHVz7nnRNVWDp7mjsupirvzk1BpTSO2g6WnwJgZIdpJFHOBWkudpSWqq/x2kHY76gs7fsQQr6GbUq2Bt",
        "lvmbFKUQRW7ekuQmm+NCM4ZFc0ZfEUXkPtG2i8RRdHLBuWEDcrwvpDnKjiNqc3QF0NhKN11vZcxd54FaiYEznI2HXoPWkbCM",
        "pi59vyIVAgMBAAECggEAIN1rN9qJe6Y4E4f9wA4Kg82shtG0QLOH5/ML+pHMXRoK7GMtauC6ZLj7fuYF3oveI6qCkFHsJFYv",
        "X0cjtAtpkZOnU49Y6f+fC/lrvhTpjbMOO9QQf1GswcHcECLSps8/DhAqVvBm8V0GJ9L1xeaXgn/kj20hHEAIit20mmi469p+",
        "r2HE6Wb8vSXj9H21BGeoYBdptXupKokSImFSpYWuhTSCtRY2hPrhVaic2D0F35Jc92527bPL5MPM+UvH+Nc78YzGuIH8m1Yu",
        "HPvHUVHdWWMzIo03/VduASNYFs3kAk3JtWykGXAmOD8A6jZrXRiAnamwgvxCv5czjX2Xgq8ayQKBgQDy/EDH4zg04QkN9VJe",
        "fONvuJvL3fjlEuXrBXlJK15gNYKdVVOArgu5EVajOyWxjDQuSaxA2QfqD6MEyYCePgZNgdRpN2+QWG4a9Gfsu265TQ0ae+KK",
        "VWTsRLiMeYl8OuE7P0SVbDW2RsYdO7D9H0BIXSgh5U/xTNsIT7GDkEpPPQKBgQDdbSNA40xv2E/9Fqw5nouWd1Gg95sBZGSx",
        "MqnFI6/zLJzu+opXj1HwQQyo8ty4zYijGSIv0G0gG2OnGXe8EQi4/BYww1T8h6BT1/SDWDisPL0DQpBzVVvSafjXjCiVxR5H",
        "AkDoqBstryW1qRVcLqZJFthissfHpIMNKhxt63lLuQKBgQC1fqYEqDv7g3t36Z405aQcdxAoHw0iThNekSAe/z3nLxD45BsT",
        "Ku2mtsS3+B4XmFoBmRYI+hNnSXbCxKBFkp6ylh9K2BWFBAh6KcTWlsoFrv/yoEZ+fXp84HfYtY90M6a40nEwCzuzgvnILCXv",
        "a8BgTPUFHHuyCW4xrxUw6D4ZIQKBgEfd/141J/75L2UOsdF1wwqQKZ9cHiRCiGf28KE6pwX/SeRKzxICQ27+PfSr9rXIh/uf",
        "0bfBJ1oPabW3j2QsBy+7KhyjmXbpMkFkS0lCHgrRH+vp8+ZrIwVVPd3/8MBDnUMg2R5qSX/3Y/7lJTipL3Fzh8HpEuyaWaqx",
        "K08F6XWJAoGAQ13hVc0TuOKvwm5zowSD5+uc9AaUughfC8tnL/Ikj+Ja9K8ss8vdmlYUrKpdFahkrh1KwE3k7aLajNAlxQou",
        "xzUOsMzAG7vwe7lUNkXQREwbTXjZyQNiHJVTkAGw79HFUINYUEhwH6A4TyRT/3wyKzTNHaE25vXZPYugq116duM=",
    );
}
