//! The signing authority: CA material, X509-SVID issuance, the bundle, and the
//! two-phase rotation schedule.
//!
//! [`Authority`] is an immutable view built from a stored [`CaState`]; every
//! change (rotation step) produces a new state, which is persisted and then
//! turned into a new `Authority`. The schedule ([`next_step`]) is a pure
//! function of the state and the time, so it is tested without waiting.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use keyway_identity::{SpiffeId, TrustBundle, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use serde_json::json;
use time::OffsetDateTime;

use crate::jwt::{self, JwtSigner};
use crate::model::{CaPhase, CaRecord, CaState, Secret};

/// NotBefore is backdated this much to absorb clock skew between nodes.
pub const BACKDATE_SECS: i64 = 10;
/// Clients re-fetch bundles at least this often when not streaming (BND-04).
pub const REFRESH_HINT_SECS: u32 = 300;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("key generation failed")]
    Crypto,
    #[error("stored CA material is unusable: {0}")]
    Corrupt(String),
    #[error("there is no active CA")]
    NoActive,
    #[error("a prepared CA already exists (id {0}); run `control-plane ca activate` to switch to it")]
    AlreadyPrepared(String),
    #[error("there is no prepared CA; run `control-plane ca prepare` first")]
    NothingPrepared,
    #[error("upstream CA: {0}")]
    Upstream(String),
    #[error("stored CA material is unusable: {0}")]
    Jwk(#[from] JwkError),
}

/// Why an authority's key cannot be published as a JWK.
#[derive(Debug, thiserror::Error)]
pub enum JwkError {
    #[error("{0}")]
    Certificate(#[from] keyway_identity::x509::SvidError),
    #[error("its public key: {0}")]
    Key(#[from] x509_parser::error::X509Error),
    #[error("unsupported EC curve {0:?}")]
    Curve(Option<String>),
    #[error("EC point is not uncompressed")]
    Point,
    #[error("unsupported public key type")]
    KeyType,
}

/// An upstream CA Keyway's signing certificate is issued by.
pub struct Upstream {
    /// The upstream CA certificate first, then anything above it; the last
    /// certificate is what goes into the bundle.
    pub chain: Vec<Vec<u8>>,
    pub key: KeyPair,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("chain_len", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// What the CA needs to know to make and rotate authorities.
#[derive(Debug)]
pub struct CaConfig {
    pub trust_domain: TrustDomain,
    pub ca_ttl: Duration,
    pub upstream: Option<Upstream>,
}

impl CaConfig {
    /// The longest SVID lifetime the rotation schedule allows: an SVID signed
    /// just before activation (at 5/6 of the CA's life) must still be fully
    /// valid, so TTLs are capped at 1/6 of the CA lifetime.
    pub fn max_svid_ttl(&self) -> Duration {
        self.ca_ttl / 6
    }
}

fn at(unix: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(unix).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn random_serial() -> Result<SerialNumber, CaError> {
    tagged_serial(None)
}

/// 128 random bits (positive, always 16 bytes long); with a tag, the last
/// four bytes are the tag instead (node SVIDs carry their registration's).
fn tagged_serial(tag: Option<u32>) -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| CaError::Crypto)?;
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and always 16 bytes long
    if let Some(tag) = tag {
        bytes[12..].copy_from_slice(&tag.to_be_bytes());
    }
    Ok(SerialNumber::from_slice(&bytes))
}

/// The tag in the last four bytes of a serial number (see [`Authority::issue`]).
pub fn serial_tag(serial: &[u8]) -> Option<u32> {
    let tail: [u8; 4] = serial.get(serial.len().checked_sub(4)?..)?.try_into().ok()?;
    Some(u32::from_be_bytes(tail))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Makes a new signing authority (self-signed, or signed by `upstream`) with
/// its JWT key, valid from `now` for the configured lifetime.
pub fn new_authority(cfg: &CaConfig, now: i64, phase: CaPhase) -> Result<CaRecord, CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Keyway");
    dn.push(DnType::CommonName, format!("Keyway CA {}", cfg.trust_domain));
    params.distinguished_name = dn;
    // X5-05: a signing certificate's SPIFFE ID has no path.
    let td_uri = format!("spiffe://{}", cfg.trust_domain);
    params.subject_alt_names = vec![SanType::URI(td_uri.try_into()?)];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial()?);
    params.not_before = at(now - BACKDATE_SECS);
    let mut not_after = now + cfg.ca_ttl.as_secs() as i64;
    let cert = match &cfg.upstream {
        None => {
            params.not_after = at(not_after);
            params.self_signed(&key)?
        }
        Some(up) => {
            let upstream_cert = up
                .chain
                .first()
                .ok_or_else(|| CaError::Upstream("no upstream certificate".into()))?;
            let upstream_not_after = keyway_identity::x509::not_after(upstream_cert)
                .map_err(|e| CaError::Upstream(e.to_string()))?
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            if upstream_not_after <= now {
                return Err(CaError::Upstream(
                    "the upstream CA certificate has expired".into(),
                ));
            }
            // Every CA between Keyway's and the bundle's anchor must name this
            // trust domain (X5-05), or verifiers refuse everything we sign:
            // better said once at start than on every handshake.
            for ca in &up.chain[..up.chain.len() - 1] {
                keyway_identity::bundle::check_ca_scope(&cfg.trust_domain, ca)
                    .map_err(|e| CaError::Upstream(e.to_string()))?;
            }
            not_after = not_after.min(upstream_not_after);
            params.not_after = at(not_after);
            params.use_authority_key_identifier_extension = true;
            let issuer = Issuer::from_ca_cert_der(&upstream_cert.clone().into(), &up.key)?;
            params.signed_by(&key, &issuer)?
        }
    };
    let (jwt_kid, jwt_key) = jwt::generate_key().map_err(|_| CaError::Crypto)?;
    let id = hex(&ring::digest::digest(&ring::digest::SHA256, cert.der()).as_ref()[..8]);
    Ok(CaRecord {
        id,
        phase,
        cert_der: cert.der().to_vec(),
        key_pkcs8: Secret(key.serialize_der()),
        not_before: now - BACKDATE_SECS,
        not_after,
        superseded_at: None,
        jwt_kid,
        jwt_key_pkcs8: Secret(jwt_key),
    })
}

/// A first CA state for a new trust domain.
pub fn initial_state(cfg: &CaConfig, now: i64) -> Result<CaState, CaError> {
    Ok(CaState {
        authorities: vec![new_authority(cfg, now, CaPhase::Active)?],
        bundle_sequence: 1,
        upstream_chain: cfg.upstream.as_ref().map(|u| u.chain.clone()).unwrap_or_default(),
    })
}

/// A rotation step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Publish a new CA in the bundle.
    Prepare,
    /// Switch signing to the prepared CA.
    Activate,
    /// Drop a replaced CA from the bundle (by id).
    Retire(String),
}

/// The earliest rotation step and when it is due (unix seconds; may be in the
/// past, meaning now).
///
/// - prepare at 1/2 of the active CA's lifetime;
/// - activate at 5/6, but never less than `min(L/3, 1h)` after the prepared
///   CA appeared, so streamed bundles reach workloads first even when the
///   control plane was down at the scheduled time;
/// - retire an old CA once everything it signed has expired: SVIDs are capped
///   at `max_svid_ttl`, so that is `superseded_at + max_svid_ttl` (plus the
///   backdating margin), or its own expiry if that comes first.
pub fn next_step(state: &CaState, max_svid_ttl: Duration) -> Option<(Step, i64)> {
    let mut steps = Vec::new();
    let active = state.authorities.iter().find(|a| a.phase == CaPhase::Active)?;
    // Fractions of the CA's nominal life, from when it was made (NotBefore
    // is backdated for clock skew; that margin is not part of the schedule).
    let made = active.not_before + BACKDATE_SECS;
    let life = active.not_after - made;
    let prepared = state.authorities.iter().find(|a| a.phase == CaPhase::Prepared);
    match prepared {
        None => steps.push((Step::Prepare, made + life / 2)),
        Some(p) => {
            let grace = (life / 3).min(3600);
            let due = (made + life * 5 / 6).max(p.not_before + BACKDATE_SECS + grace);
            steps.push((Step::Activate, due));
        }
    }
    for old in state.authorities.iter().filter(|a| a.phase == CaPhase::Old) {
        let superseded = old.superseded_at.unwrap_or(old.not_before);
        let due = (superseded + max_svid_ttl.as_secs() as i64 + BACKDATE_SECS).min(old.not_after);
        steps.push((Step::Retire(old.id.clone()), due));
    }
    steps.into_iter().min_by_key(|(_, due)| *due)
}

/// Applies a step to a copy of `state`; the sequence grows because the
/// bundle's contents change with every step.
pub fn apply_step(cfg: &CaConfig, state: &CaState, step: &Step, now: i64) -> Result<CaState, CaError> {
    let mut next = state.clone();
    match step {
        Step::Prepare => {
            if let Some(p) = next.authorities.iter().find(|a| a.phase == CaPhase::Prepared) {
                return Err(CaError::AlreadyPrepared(p.id.clone()));
            }
            next.authorities.push(new_authority(cfg, now, CaPhase::Prepared)?);
        }
        Step::Activate => {
            if !next.authorities.iter().any(|a| a.phase == CaPhase::Prepared) {
                return Err(CaError::NothingPrepared);
            }
            for a in &mut next.authorities {
                match a.phase {
                    CaPhase::Active => {
                        a.phase = CaPhase::Old;
                        a.superseded_at = Some(now);
                    }
                    CaPhase::Prepared => a.phase = CaPhase::Active,
                    CaPhase::Old => {}
                }
            }
        }
        Step::Retire(id) => next
            .authorities
            .retain(|a| &a.id != id || a.phase != CaPhase::Old),
    }
    next.bundle_sequence += 1;
    Ok(next)
}

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf first, then intermediates (never the root).
    pub chain: Vec<Vec<u8>>,
    pub serial: String,
    pub not_after: i64,
    pub ca_id: String,
}

/// The CA as it signs right now: built from a [`CaState`], never mutated.
pub struct Authority {
    trust_domain: TrustDomain,
    state: CaState,
    active_id: String,
    active_cert: Vec<u8>,
    active_not_after: i64,
    issuer: Issuer<'static, KeyPair>,
    jwt: JwtSigner,
    jwt_public: Vec<serde_json::Value>,
    bundle: Arc<TrustBundle>,
    max_svid_ttl: Duration,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("active_id", &self.active_id)
            .field("bundle_sequence", &self.state.bundle_sequence)
            .finish_non_exhaustive()
    }
}

impl Authority {
    pub fn new(trust_domain: TrustDomain, state: CaState, max_svid_ttl: Duration) -> Result<Self, CaError> {
        let active = state.active().ok_or(CaError::NoActive)?;
        let key = KeyPair::try_from(active.key_pkcs8.0.as_slice())
            .map_err(|e| CaError::Corrupt(format!("CA key {}: {e}", active.id)))?;
        let issuer = Issuer::from_ca_cert_der(&active.cert_der.clone().into(), key)
            .map_err(|e| CaError::Corrupt(format!("CA cert {}: {e}", active.id)))?;
        let jwt = JwtSigner::new(active.jwt_kid.clone(), &active.jwt_key_pkcs8.0)
            .map_err(|e| CaError::Corrupt(format!("JWT key {}: {e}", active.jwt_kid)))?;
        let jwt_public = state
            .authorities
            .iter()
            .map(|a| {
                JwtSigner::new(a.jwt_kid.clone(), &a.jwt_key_pkcs8.0)
                    .map(|s| s.jwk())
                    .map_err(|e| CaError::Corrupt(format!("JWT key {}: {e}", a.jwt_kid)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let x509_authorities: Vec<Vec<u8>> = match state.upstream_chain.last() {
            Some(root) => vec![root.clone()],
            None => state.authorities.iter().map(|a| a.cert_der.clone()).collect(),
        };
        let mut this = Self {
            trust_domain: trust_domain.clone(),
            active_id: active.id.clone(),
            active_cert: active.cert_der.clone(),
            active_not_after: active.not_after,
            issuer,
            jwt,
            jwt_public,
            bundle: Arc::new(
                TrustBundle::new(
                    trust_domain.clone(),
                    state.bundle_sequence,
                    x509_authorities.clone(),
                    Vec::new(),
                )
                .map_err(|e| CaError::Corrupt(e.to_string()))?,
            ),
            state,
            max_svid_ttl,
        };
        let jwks = this.jwks_document()?;
        this.bundle = Arc::new(
            TrustBundle::new(trust_domain, this.state.bundle_sequence, x509_authorities, jwks)
                .map_err(|e| CaError::Corrupt(e.to_string()))?,
        );
        Ok(this)
    }

    pub fn state(&self) -> &CaState {
        &self.state
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.bundle.clone()
    }

    pub fn max_svid_ttl(&self) -> Duration {
        self.max_svid_ttl
    }

    pub fn active_id(&self) -> &str {
        &self.active_id
    }

    /// The SPIFFE bundle document: X.509 authorities without `kid` (X5-18)
    /// and JWT keys with `kid` (BND-09), `spiffe_sequence` (BND-03) and
    /// `spiffe_refresh_hint` (BND-04).
    fn jwks_document(&self) -> Result<Vec<u8>, CaError> {
        let mut keys = Vec::new();
        for der in self.bundle.authorities() {
            let mut jwk = jwk_for_cert(der)?;
            jwk["use"] = json!("x509-svid");
            jwk["x5c"] = json!([B64.encode(der.as_ref())]);
            keys.push(jwk);
        }
        keys.extend(self.jwt_public.iter().cloned());
        let doc = json!({
            "keys": keys,
            "spiffe_sequence": self.state.bundle_sequence,
            "spiffe_refresh_hint": REFRESH_HINT_SECS,
        });
        serde_json::to_vec_pretty(&doc).map_err(|e| CaError::Corrupt(e.to_string()))
    }

    /// Issues an X509-SVID for `spiffe_id` to the holder of `public_key`.
    ///
    /// Template per X5-01..X5-13: one URI SAN, cA=false, critical keyUsage
    /// digitalSignature (+keyEncipherment, keyAgreement), EKU serverAuth and
    /// clientAuth, NotBefore backdated, NotAfter capped by the TTL limit and
    /// by the CA's own NotAfter.
    ///
    /// `serial_tag` goes in the serial number's last four bytes (node SVIDs:
    /// their node's registration, see `NodeRecord::registration`).
    pub fn issue(
        &self,
        public_key: &rcgen::SubjectPublicKeyInfo,
        spiffe_id: &SpiffeId,
        ttl: Duration,
        now: i64,
        serial_tag: Option<u32>,
    ) -> Result<Issued, CaError> {
        let ttl = ttl.min(self.max_svid_ttl).max(Duration::from_secs(1));
        let not_after = (now + ttl.as_secs() as i64).min(self.active_not_after);
        let serial = tagged_serial(serial_tag)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Keyway");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(spiffe_id.to_string().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(serial.clone());
        params.not_before = at(now - BACKDATE_SECS);
        params.not_after = at(not_after);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer)?;
        let mut chain = vec![cert.der().to_vec()];
        if !self.state.upstream_chain.is_empty() {
            chain.push(self.active_cert.clone());
            let above = &self.state.upstream_chain;
            chain.extend(above[..above.len() - 1].iter().cloned());
        }
        Ok(Issued {
            chain,
            serial: hex(&serial.to_bytes()),
            not_after,
            ca_id: self.active_id.clone(),
        })
    }

    /// Signs a JWT-SVID with the active key; TTL capped like X509-SVIDs.
    pub fn mint_jwt(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: i64,
    ) -> Result<(String, i64), CaError> {
        let ttl = ttl.min(self.max_svid_ttl).max(Duration::from_secs(1));
        let exp = (now + ttl.as_secs() as i64).min(self.active_not_after);
        let token = self
            .jwt
            .sign(&spiffe_id.to_string(), audience, now, exp)
            .map_err(|_| CaError::Crypto)?;
        Ok((token, exp))
    }
}

/// A certificate's public key as a JWK (EC P-256/P-384 or RSA).
fn jwk_for_cert(der: &[u8]) -> Result<serde_json::Value, JwkError> {
    use x509_parser::public_key::PublicKey;
    let cert = keyway_identity::x509::parse(der)?;
    let spki = cert.public_key();
    match spki.parsed()? {
        PublicKey::EC(point) => {
            let data = point.data();
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string());
            let (crv, len) = match curve.as_deref() {
                Some("1.2.840.10045.3.1.7") => ("P-256", 32),
                Some("1.3.132.0.34") => ("P-384", 48),
                other => return Err(JwkError::Curve(other.map(str::to_owned))),
            };
            if data.len() != 1 + 2 * len || data[0] != 4 {
                return Err(JwkError::Point);
            }
            Ok(json!({
                "kty": "EC",
                "crv": crv,
                "x": B64URL.encode(&data[1..1 + len]),
                "y": B64URL.encode(&data[1 + len..]),
            }))
        }
        PublicKey::RSA(rsa) => Ok(json!({
            "kty": "RSA",
            "n": B64URL.encode(rsa.modulus.strip_prefix(&[0]).unwrap_or(rsa.modulus)),
            "e": B64URL.encode(rsa.exponent),
        })),
        _ => Err(JwkError::KeyType),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(ttl_secs: u64) -> CaConfig {
        CaConfig {
            trust_domain: keyway_identity::spiffe_id::parse_trust_domain("example.org").unwrap(),
            ca_ttl: Duration::from_secs(ttl_secs),
            upstream: None,
        }
    }

    #[test]
    fn schedule_prepares_at_half_activates_at_five_sixths_retires_after_max_ttl() {
        let c = cfg(600_000);
        let t0 = 1_000_000;
        let s0 = initial_state(&c, t0).unwrap();
        let max = c.max_svid_ttl();
        let (step, due) = next_step(&s0, max).unwrap();
        assert_eq!(step, Step::Prepare);
        let life = 600_000;
        assert_eq!(due, t0 + life / 2);

        let s1 = apply_step(&c, &s0, &Step::Prepare, due).unwrap();
        assert_eq!(s1.bundle_sequence, s0.bundle_sequence + 1);
        let (step, due) = next_step(&s1, max).unwrap();
        assert_eq!(step, Step::Activate);
        assert_eq!(due, t0 + life * 5 / 6);

        let s2 = apply_step(&c, &s1, &Step::Activate, due).unwrap();
        assert_eq!(s2.bundle_sequence, s1.bundle_sequence + 1);
        let old = s2
            .authorities
            .iter()
            .find(|a| a.phase == CaPhase::Old)
            .unwrap()
            .clone();
        // The new CA's own prepare (half its life) comes first; after it, the
        // old CA retires once nothing it signed can be valid: max_svid_ttl
        // after activation, or its own expiry if earlier.
        let (step, prep_at) = next_step(&s2, max).unwrap();
        assert_eq!(step, Step::Prepare);
        let s2 = apply_step(&c, &s2, &step, prep_at).unwrap();
        let (step, retire_at) = next_step(&s2, max).unwrap();
        assert_eq!(step, Step::Retire(old.id.clone()));
        assert_eq!(
            retire_at,
            (due + max.as_secs() as i64 + BACKDATE_SECS).min(old.not_after)
        );
        assert!(
            retire_at <= old.not_after,
            "the old CA outlives everything it signed"
        );

        let s3 = apply_step(&c, &s2, &step, retire_at).unwrap();
        assert_eq!(s3.bundle_sequence, s2.bundle_sequence + 1);
        assert_eq!(s3.authorities.len(), 2, "active + prepared remain");
        assert_eq!(next_step(&s3, max).unwrap().0, Step::Activate);
    }

    #[test]
    fn late_activation_still_leaves_time_for_the_bundle_to_spread() {
        let c = cfg(6 * 86400);
        let s0 = initial_state(&c, 0).unwrap();
        // The control plane was down: it prepares long after the 5/6 mark.
        let late = 5 * 86400 + 3600;
        let s1 = apply_step(&c, &s0, &Step::Prepare, late).unwrap();
        let (step, due) = next_step(&s1, c.max_svid_ttl()).unwrap();
        assert_eq!(step, Step::Activate);
        assert_eq!(due, late + 3600, "one hour of overlap before the new CA signs");
    }

    #[test]
    fn manual_steps_out_of_order_are_refused_with_advice() {
        let c = cfg(600);
        let s0 = initial_state(&c, 0).unwrap();
        assert!(
            apply_step(&c, &s0, &Step::Activate, 1)
                .unwrap_err()
                .to_string()
                .contains("ca prepare")
        );
        let s1 = apply_step(&c, &s0, &Step::Prepare, 1).unwrap();
        assert!(
            apply_step(&c, &s1, &Step::Prepare, 2)
                .unwrap_err()
                .to_string()
                .contains("ca activate")
        );
    }

    #[test]
    fn leaf_not_after_is_capped_by_ttl_limit_and_ca_expiry() {
        let c = cfg(600);
        let now = 1_700_000_000;
        let state = initial_state(&c, now).unwrap();
        let auth = Authority::new(c.trust_domain.clone(), state, c.max_svid_ttl()).unwrap();
        let (key, csr) = keyway_identity::csr::generate().unwrap();
        let _ = key;
        let spki = crate::csr::check(&csr, "spiffe://example.org/a").unwrap();
        let id = SpiffeId::new("spiffe://example.org/a").unwrap();
        let issued = auth
            .issue(&spki, &id, Duration::from_secs(3600), now, None)
            .unwrap();
        assert_eq!(issued.not_after, now + 100, "capped at ca_ttl/6");
    }
}
