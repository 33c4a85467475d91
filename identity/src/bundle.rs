//! A trust domain's bundle as validators use it: the X.509 authorities (as parsed
//! trust anchors) and the JWKS document with its sequence number.
//!
//! A bundle may hold an upstream root shared with other trust domains
//! (`control-plane serve --upstream-ca-cert`). Path validation alone would then
//! let any CA under that root mint this trust domain's SVIDs, so every
//! intermediate CA on a validated path must also be scoped to the leaf's trust
//! domain ([`check_ca_scope`]).

use std::cell::RefCell;
use std::time::SystemTime;

use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use spiffe::TrustDomain;
use x509_parser::extensions::{GeneralName, ParsedExtension};

use crate::x509::{self, LeafInfo, SvidError};

/// Which end of a TLS connection a certificate authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// One trust domain's bundle. Cheap to share behind an `Arc`; a new sequence
/// means a new value, never a mutation.
#[derive(Clone)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    sequence: u64,
    authorities: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
    jwks: Vec<u8>,
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundle")
            .field("trust_domain", &self.trust_domain.to_string())
            .field("sequence", &self.sequence)
            .field("authorities", &self.authorities.len())
            .finish()
    }
}

impl TrustBundle {
    /// Builds a bundle from DER CA certificates. `jwks` is the SPIFFE bundle
    /// document (may be empty where only X.509 is needed).
    pub fn new(
        trust_domain: TrustDomain,
        sequence: u64,
        authorities: Vec<Vec<u8>>,
        jwks: Vec<u8>,
    ) -> Result<Self, SvidError> {
        let authorities: Vec<CertificateDer<'static>> =
            authorities.into_iter().map(CertificateDer::from).collect();
        let anchors = authorities
            .iter()
            .map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| SvidError::Parse(format!("bundle authority: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            trust_domain,
            sequence,
            authorities,
            anchors,
            jwks,
        })
    }

    /// Reads a PEM file of CA certificates (what `control-plane bundle show`
    /// prints and `node-agent run --trust-bundle` takes).
    pub fn from_pem(trust_domain: TrustDomain, pem: &str) -> Result<Self, SvidError> {
        let certs = crate::pem::decode_certs(pem).map_err(SvidError::Parse)?;
        Self::new(trust_domain, 0, certs, Vec::new())
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    pub fn authorities(&self) -> &[CertificateDer<'static>] {
        &self.authorities
    }

    pub fn jwks(&self) -> &[u8] {
        &self.jwks
    }

    /// The authorities as concatenated DER, the Workload API's bundle encoding.
    pub fn concatenated_der(&self) -> Vec<u8> {
        self.authorities.iter().flat_map(|c| c.iter().copied()).collect()
    }

    pub fn to_pem(&self) -> String {
        crate::pem::encode_certs(self.authorities.iter().map(|c| c.as_ref()))
    }

    /// Validates an X509-SVID chain (leaf first) for `usage` at `now`: the
    /// leaf's trust domain must be this bundle's (X5-17), the path must verify
    /// (X5-15), every intermediate CA on it must be scoped to that trust domain
    /// ([`check_ca_scope`]; X5-05, X5-14) and the leaf must pass the SVID rules
    /// (X5-16). A leaf signed directly by a bundle authority has no
    /// intermediates to check.
    pub fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        now: SystemTime,
        usage: Usage,
    ) -> Result<LeafInfo, SvidError> {
        let (leaf, intermediates) = chain.split_first().ok_or(SvidError::EmptyChain)?;
        let info = x509::inspect_leaf(leaf)?;
        let td = info.spiffe_id.trust_domain();
        if td.to_string() != self.trust_domain.to_string() {
            return Err(SvidError::NoBundle(td.to_string()));
        }
        if self.anchors.is_empty() {
            return Err(SvidError::EmptyBundle(td.to_string()));
        }
        let end_entity =
            webpki::EndEntityCert::try_from(leaf).map_err(|e| SvidError::Chain(e.to_string()))?;
        let now = UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
        let eku = match usage {
            Usage::Server => webpki::KeyUsage::server_auth(),
            Usage::Client => webpki::KeyUsage::client_auth(),
        };
        // The scope check runs inside path building, so a peer that also sent
        // an unrelated certificate still validates through its scoped path.
        let unscoped: RefCell<Option<ScopeError>> = RefCell::new(None);
        let scoped = |path: &webpki::VerifiedPath<'_>| {
            for ca in path.intermediate_certificates() {
                if let Err(e) = check_ca_scope(&self.trust_domain, &ca.der()) {
                    *unscoped.borrow_mut() = Some(e);
                    return Err(webpki::Error::NameConstraintViolation);
                }
            }
            Ok(())
        };
        end_entity
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &self.anchors,
                intermediates,
                now,
                eku,
                None,
                Some(&scoped),
            )
            .map_err(|e| {
                let explained = unscoped.take().or_else(|| match e {
                    webpki::Error::NameConstraintViolation => {
                        uri_constrained_ca(&self.trust_domain, intermediates)
                    }
                    _ => None,
                });
                SvidError::Chain(explained.map_or_else(|| format!("{e:?}"), |s| s.to_string()))
            })?;
        Ok(info)
    }
}

/// Why an intermediate CA on a path cannot vouch for the leaf's trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    /// The CA may sign for more than the leaf's trust domain.
    #[error(
        "the intermediate CA {subject:?} is not constrained to trust domain {trust_domain} ({found}): it needs \
         the URI SAN spiffe://{trust_domain}; another trust domain's CA under the same upstream root could \
         otherwise mint {trust_domain}'s identities (rules X5-05, X5-15)"
    )]
    Unscoped {
        /// The CA certificate's subject, as an operator would search for it.
        subject: String,
        trust_domain: String,
        found: CaScope,
    },
    /// The CA limits URI names with nameConstraints, which rustls-webpki does
    /// not implement and so refuses whatever they say.
    #[error(
        "the intermediate CA {subject:?} has URI name constraints, which this verifier (rustls-webpki) cannot \
         check and so refuses (rule X5-14: many libraries reject them); give it the URI SAN \
         spiffe://{trust_domain} instead"
    )]
    UriNameConstraints { subject: String, trust_domain: String },
}

/// What an intermediate CA certificate says about the trust domains it may
/// sign for, when that is not exactly one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaScope {
    /// Neither a URI SAN nor a URI name constraint: any trust domain.
    Unscoped,
    /// URI SANs other than `spiffe://<trust domain>` (another trust domain, a
    /// path, or several IDs).
    UriSans(Vec<String>),
    /// URI name constraints permitting other or further hosts.
    PermittedUriHosts(Vec<String>),
    /// Not parseable as X.509 (webpki accepted it, x509-parser did not).
    Unreadable(String),
}

impl std::fmt::Display for CaScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CaScope::Unscoped => f.write_str("it has no URI SAN and no URI name constraint"),
            CaScope::UriSans(sans) => write!(f, "its URI SANs are {}", sans.join(", ")),
            CaScope::PermittedUriHosts(hosts) => {
                write!(
                    f,
                    "its name constraints permit the URI hosts {}",
                    hosts.join(", ")
                )
            }
            CaScope::Unreadable(e) => write!(f, "it cannot be parsed: {e}"),
        }
    }
}

/// The URI hosts a CA certificate's nameConstraints permit (RFC 5280
/// 4.2.1.10: a URI subtree is a host, or a domain when it starts with `.`).
fn permitted_uri_hosts<'a>(cert: &'a x509_parser::prelude::X509Certificate<'_>) -> Vec<&'a str> {
    cert.extensions()
        .iter()
        .filter_map(|ext| match ext.parsed_extension() {
            ParsedExtension::NameConstraints(nc) => nc.permitted_subtrees.as_ref(),
            _ => None,
        })
        .flatten()
        .filter_map(|subtree| match subtree.base {
            GeneralName::URI(host) => Some(host),
            _ => None,
        })
        .collect()
}

/// Decides whether the CA certificate `der` may issue SVIDs of `trust_domain`:
/// every URI SAN it carries is `spiffe://<trust domain>` (what Keyway's own CA
/// carries, X5-05), or its permitted URI name-constraint subtrees are exactly
/// the trust domain's host (X5-14; excluded subtrees only narrow). Trust
/// domains are compared case-insensitively (ID-15).
///
/// rustls-webpki refuses every URI name constraint during path validation, so
/// through [`TrustBundle::verify`] only the SAN form is accepted today; the
/// constraint form is decided here so that support there needs nothing new.
pub fn check_ca_scope(trust_domain: &TrustDomain, der: &[u8]) -> Result<(), ScopeError> {
    let td = trust_domain.to_string();
    let refuse = |subject: String, found: CaScope| ScopeError::Unscoped {
        subject,
        trust_domain: td.clone(),
        found,
    };
    let cert =
        x509::parse(der).map_err(|e| refuse("<unparseable>".into(), CaScope::Unreadable(e.to_string())))?;
    let want = format!("spiffe://{td}");
    let sans = x509::uri_sans(&cert);
    if !sans.is_empty() && sans.iter().all(|u| u.eq_ignore_ascii_case(&want)) {
        return Ok(());
    }
    let hosts = permitted_uri_hosts(&cert);
    if !hosts.is_empty() && hosts.iter().all(|h| h.eq_ignore_ascii_case(&td)) {
        return Ok(());
    }
    let found = if !sans.is_empty() {
        CaScope::UriSans(sans.iter().map(|s| s.to_string()).collect())
    } else if !hosts.is_empty() {
        CaScope::PermittedUriHosts(hosts.iter().map(|h| h.to_string()).collect())
    } else {
        CaScope::Unscoped
    };
    Err(refuse(cert.subject().to_string(), found))
}

/// The first presented intermediate with URI name constraints, to explain a
/// bare `NameConstraintViolation` from webpki.
fn uri_constrained_ca(
    trust_domain: &TrustDomain,
    intermediates: &[CertificateDer<'_>],
) -> Option<ScopeError> {
    intermediates.iter().find_map(|der| {
        let cert = x509::parse(der).ok()?;
        (!permitted_uri_hosts(&cert).is_empty()).then(|| ScopeError::UriNameConstraints {
            subject: cert.subject().to_string(),
            trust_domain: trust_domain.to_string(),
        })
    })
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
        ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };

    use super::*;

    const TD: &str = "cluster.local";
    const CONTROL_PLANE: &str = "spiffe://cluster.local/keyway/control-plane";

    /// A CA of the test PKI: its parameters and key sign what is below it.
    struct Ca {
        params: CertificateParams,
        key: KeyPair,
        der: Vec<u8>,
    }

    impl Ca {
        fn issuer(&self) -> Issuer<'_, &KeyPair> {
            Issuer::from_params(&self.params, &self.key)
        }
    }

    fn td() -> TrustDomain {
        crate::spiffe_id::parse_trust_domain(TD).unwrap()
    }

    fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        assert!(content.len() < 128, "short-form DER lengths only");
        [&[tag, content.len() as u8][..], content].concat()
    }

    /// A nameConstraints extension (RFC 5280 4.2.1.10) permitting only these
    /// URI hosts; rcgen has no URI subtrees, so it is encoded here.
    fn uri_name_constraints(hosts: &[&str]) -> CustomExtension {
        let subtrees: Vec<u8> = hosts
            .iter()
            .flat_map(|h| der_tlv(0x30, &der_tlv(0x86, h.as_bytes())))
            .collect();
        let value = der_tlv(0x30, &der_tlv(0xa0, &subtrees));
        let mut ext = CustomExtension::from_oid_content(&[2, 5, 29, 30], value);
        ext.set_criticality(true);
        ext
    }

    fn ca_params(name: &str, uri_sans: &[&str], permitted_uri_hosts: &[&str]) -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = uri_sans
            .iter()
            .map(|u| SanType::URI(u.to_string().try_into().unwrap()))
            .collect();
        if !permitted_uri_hosts.is_empty() {
            params.custom_extensions = vec![uri_name_constraints(permitted_uri_hosts)];
        }
        params
    }

    /// The upstream root several trust domains share.
    fn root() -> Ca {
        let params = ca_params("Upstream Root", &[], &[]);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        Ca { params, key, der }
    }

    fn intermediate(parent: &Ca, name: &str, uri_sans: &[&str], permitted_uri_hosts: &[&str]) -> Ca {
        intermediate_with_key(parent, name, uri_sans, permitted_uri_hosts, None)
    }

    fn intermediate_with_key(
        parent: &Ca,
        name: &str,
        uri_sans: &[&str],
        permitted_uri_hosts: &[&str],
        key: Option<&KeyPair>,
    ) -> Ca {
        let params = ca_params(name, uri_sans, permitted_uri_hosts);
        let key = match key {
            Some(k) => KeyPair::from_pem(&k.serialize_pem()).unwrap(),
            None => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        };
        let der = params.signed_by(&key, &parent.issuer()).unwrap().der().to_vec();
        Ca { params, key, der }
    }

    /// An X509-SVID leaf as Keyway's CA makes them.
    fn leaf(issuer: &Ca, id: &str) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        params.signed_by(&key, &issuer.issuer()).unwrap().der().to_vec()
    }

    fn bundle_of(root: &Ca) -> TrustBundle {
        TrustBundle::new(td(), 1, vec![root.der.clone()], Vec::new()).unwrap()
    }

    /// Verifies `chain` (leaf first) for both TLS ends; they must agree.
    fn verify(bundle: &TrustBundle, chain: &[&[u8]]) -> Result<LeafInfo, SvidError> {
        let chain: Vec<CertificateDer<'_>> = chain.iter().map(|c| CertificateDer::from(*c)).collect();
        let server = bundle.verify(&chain, SystemTime::now(), Usage::Server);
        let client = bundle.verify(&chain, SystemTime::now(), Usage::Client);
        assert_eq!(server, client, "server and client verification disagree");
        server
    }

    fn refusal(result: Result<LeafInfo, SvidError>) -> String {
        match result {
            Err(SvidError::Chain(msg)) => msg,
            other => panic!("expected a chain refusal, got {other:?}"),
        }
    }

    #[test]
    fn an_svid_from_our_intermediate_under_a_shared_root_is_accepted() {
        let r = root();
        let a = intermediate(&r, "Keyway CA cluster.local", &["spiffe://cluster.local"], &[]);
        let info = verify(&bundle_of(&r), &[&leaf(&a, CONTROL_PLANE), &a.der]).unwrap();
        assert_eq!(info.spiffe_id.to_string(), CONTROL_PLANE);
    }

    #[test]
    fn another_trust_domains_intermediate_cannot_mint_our_identities() {
        // X5-05: a signing certificate's SPIFFE ID names the trust domain it
        // signs for; B belongs to other.td, under the same upstream root.
        let r = root();
        let b = intermediate(&r, "Keyway CA other.td", &["spiffe://other.td"], &[]);
        let msg = refusal(verify(&bundle_of(&r), &[&leaf(&b, CONTROL_PLANE), &b.der]));
        assert_eq!(
            msg,
            "the intermediate CA \"CN=Keyway CA other.td\" is not constrained to trust domain cluster.local \
             (its URI SANs are spiffe://other.td): it needs the URI SAN spiffe://cluster.local; another trust \
             domain's CA under the same upstream root could otherwise mint cluster.local's identities (rules \
             X5-05, X5-15)"
        );
    }

    #[test]
    fn an_intermediate_without_a_spiffe_id_cannot_mint_our_identities() {
        let r = root();
        let c = intermediate(&r, "Some Team CA", &[], &[]);
        let msg = refusal(verify(&bundle_of(&r), &[&leaf(&c, CONTROL_PLANE), &c.der]));
        assert!(
            msg.contains("\"CN=Some Team CA\"") && msg.contains("no URI SAN and no URI name constraint"),
            "{msg}"
        );
    }

    #[test]
    fn an_intermediate_naming_a_second_trust_domain_is_refused() {
        // A CA shared by two trust domains lets either mint the other's IDs.
        let r = root();
        let shared = intermediate(
            &r,
            "Shared CA",
            &["spiffe://cluster.local", "spiffe://other.td"],
            &[],
        );
        let msg = refusal(verify(
            &bundle_of(&r),
            &[&leaf(&shared, CONTROL_PLANE), &shared.der],
        ));
        assert!(msg.contains("spiffe://cluster.local, spiffe://other.td"), "{msg}");
        // A SPIFFE ID with a path is not a signing certificate's ID (X5-05).
        let pathy = intermediate(&r, "Pathy CA", &["spiffe://cluster.local/ca"], &[]);
        refusal(verify(
            &bundle_of(&r),
            &[&leaf(&pathy, CONTROL_PLANE), &pathy.der],
        ));
    }

    #[test]
    fn every_intermediate_on_the_path_must_be_scoped_not_just_the_issuer() {
        // An unscoped upstream intermediate above ours: whoever holds its key
        // can make a CA carrying spiffe://cluster.local, so it is refused too.
        let r = root();
        let upstream = intermediate(&r, "Org Intermediate", &[], &[]);
        let ours = intermediate(
            &upstream,
            "Keyway CA cluster.local",
            &["spiffe://cluster.local"],
            &[],
        );
        let msg = refusal(verify(
            &bundle_of(&r),
            &[&leaf(&ours, CONTROL_PLANE), &ours.der, &upstream.der],
        ));
        assert!(msg.contains("\"CN=Org Intermediate\""), "{msg}");
        // Scoped all the way up, the same shape is accepted.
        let upstream = intermediate(&r, "Org Intermediate", &["spiffe://cluster.local"], &[]);
        let ours = intermediate(
            &upstream,
            "Keyway CA cluster.local",
            &["spiffe://cluster.local"],
            &[],
        );
        verify(
            &bundle_of(&r),
            &[&leaf(&ours, CONTROL_PLANE), &ours.der, &upstream.der],
        )
        .unwrap();
    }

    #[test]
    fn a_self_signed_keyway_ca_in_the_bundle_needs_no_scope_check() {
        // Bundle authorities are trusted as configured; only intermediates
        // are checked. A root without any SPIFFE ID still signs directly.
        let r = root();
        let direct = leaf(&r, CONTROL_PLANE);
        verify(&bundle_of(&r), &[&direct]).unwrap();
        // The anchor repeated in the chain is not an intermediate either.
        verify(&bundle_of(&r), &[&direct, &r.der]).unwrap();
    }

    #[test]
    fn a_rescoped_reissue_of_our_intermediate_is_used_over_a_stale_one() {
        // The same CA key re-issued with its SPIFFE ID: a peer sending both
        // certificates still validates through the scoped one.
        let r = root();
        let stale = intermediate(&r, "Keyway CA cluster.local", &[], &[]);
        let rescoped = intermediate_with_key(
            &r,
            "Keyway CA cluster.local",
            &["spiffe://cluster.local"],
            &[],
            Some(&stale.key),
        );
        let svid = leaf(&rescoped, CONTROL_PLANE);
        verify(&bundle_of(&r), &[&svid, &stale.der, &rescoped.der]).unwrap();
        refusal(verify(&bundle_of(&r), &[&svid, &stale.der]));
    }

    #[test]
    fn a_ca_name_constrained_to_our_trust_domain_is_in_scope_but_refused_with_advice() {
        // X5-14: URI nameConstraints on signing certificates MAY be used, and
        // "many libraries reject them": rustls-webpki refuses every URI name
        // constraint during path validation. The scope decision accepts D; the
        // refusal tells the operator to use the SAN form instead.
        let r = root();
        let d = intermediate(&r, "Constrained CA", &[], &["cluster.local"]);
        assert_eq!(check_ca_scope(&td(), &d.der), Ok(()));
        let upper = intermediate(&r, "Constrained CA", &[], &["Cluster.Local"]);
        assert_eq!(check_ca_scope(&td(), &upper.der), Ok(()), "ID-15");
        let msg = refusal(verify(&bundle_of(&r), &[&leaf(&d, CONTROL_PLANE), &d.der]));
        assert!(
            msg.contains("\"CN=Constrained CA\" has URI name constraints")
                && msg.contains("give it the URI SAN spiffe://cluster.local instead"),
            "{msg}"
        );
    }

    #[test]
    fn a_ca_name_constrained_to_a_wider_or_other_domain_is_refused() {
        let r = root();
        for hosts in [
            &[".cluster.local"][..],
            &["cluster.local", "other.td"][..],
            &["other.td"][..],
            &["local"][..],
            &["spiffe://cluster.local"][..],
        ] {
            let wide = intermediate(&r, "Wide CA", &[], hosts);
            let err = check_ca_scope(&td(), &wide.der).unwrap_err();
            let msg = err.to_string();
            assert_eq!(
                err,
                ScopeError::Unscoped {
                    subject: "CN=Wide CA".into(),
                    trust_domain: TD.into(),
                    found: CaScope::PermittedUriHosts(hosts.iter().map(|h| h.to_string()).collect()),
                },
                "{msg}"
            );
            refusal(verify(&bundle_of(&r), &[&leaf(&wide, CONTROL_PLANE), &wide.der]));
        }
        // Only excluded subtrees, or only DNS ones, do not scope URIs at all.
        let mut params = ca_params("DNS-only CA", &[], &[]);
        params.name_constraints = Some(rcgen::NameConstraints {
            permitted_subtrees: vec![rcgen::GeneralSubtree::DnsName("cluster.local".into())],
            excluded_subtrees: Vec::new(),
        });
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let dns_only = Ca {
            der: params.signed_by(&key, &r.issuer()).unwrap().der().to_vec(),
            params,
            key,
        };
        let msg = refusal(verify(
            &bundle_of(&r),
            &[&leaf(&dns_only, CONTROL_PLANE), &dns_only.der],
        ));
        assert!(msg.contains("no URI SAN and no URI name constraint"), "{msg}");
    }
}
