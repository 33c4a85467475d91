//! Upstream-CA mode under attack, end to end on real sockets: the real
//! `control-plane serve` signs with an intermediate of an upstream root R, and
//! the bundle holds R alone. Another trust domain's CA under the same root
//! (intermediate B) mints this trust domain's identities: a fake control plane
//! must not get an agent's join token, and a forged node SVID must not get a
//! real one. Rules X5-05 (a signing certificate names its trust domain) and
//! X5-15 (path validation).

use std::sync::Arc;
use std::time::Duration;

use keyway_identity::tls::{self, PeerMatch};
use keyway_identity::{Svid, TrustBundle, spiffe_id};
use keyway_tests::{Binary, TD, trust_domain};
use node_agent::control_plane::{self, ClientError, ControlPlaneClient};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};

/// A CA of the test PKI.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
    der: Vec<u8>,
}

impl Ca {
    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_params(&self.params, &self.key)
    }

    fn root(name: &str) -> Self {
        let params = ca_params(name, None);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        Self { params, key, der }
    }

    fn intermediate(&self, name: &str, uri_san: &str) -> Self {
        let params = ca_params(name, Some(uri_san));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let der = params.signed_by(&key, &self.issuer()).unwrap().der().to_vec();
        Self { params, key, der }
    }

    /// An X509-SVID for `id` shaped like Keyway's own, chained through this CA.
    fn mint(&self, id: &str, serial: Option<&[u8]>) -> Svid {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Keyway");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
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
        params.serial_number = serial.map(SerialNumber::from_slice);
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = params.signed_by(&key, &self.issuer()).unwrap().der().to_vec();
        Svid::new(vec![leaf, self.der.clone()], key.serialize_der()).unwrap()
    }
}

fn ca_params(name: &str, uri_san: Option<&str>) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = uri_san
        .map(|u| SanType::URI(u.to_string().try_into().unwrap()))
        .into_iter()
        .collect();
    params
}

/// A TLS server presenting `svid` to whoever connects: the attacker's fake
/// control plane. It reports every byte a client sends after the handshake
/// (up to `secret` or end of stream) and then hangs up.
async fn fake_control_plane(svid: &Svid, secret: String) -> (String, mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (_keep, cert) = watch::channel(Some(svid.certified_key().unwrap()));
    std::mem::forget(_keep);
    let mut config = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(tls::SvidResolver(cert)));
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (heard, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let heard = heard.clone();
            let secret = secret.clone();
            tokio::spawn(async move {
                // A refused handshake means the client sent nothing.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    let _ = heard.send(Vec::new());
                    return;
                };
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let read_all = async {
                    while let Ok(n @ 1..) = tls.read(&mut buf).await {
                        got.extend_from_slice(&buf[..n]);
                        if got.windows(secret.len()).any(|w| w == secret.as_bytes()) {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(10), read_all).await;
                let _ = heard.send(got);
            });
        }
    });
    (addr, rx)
}

fn upstream_files(dir: &std::path::Path, ours: &Ca, root: &Ca) -> (String, String) {
    let cert = dir.join("upstream.pem");
    let key = dir.join("upstream.key");
    // The upstream CA first, then the root: the root is what goes in the bundle.
    std::fs::write(
        &cert,
        keyway_identity::pem::encode_certs([ours.der.as_slice(), root.der.as_slice()]),
    )
    .unwrap();
    std::fs::write(&key, ours.key.serialize_pem()).unwrap();
    (cert.display().to_string(), key.display().to_string())
}

fn refusal_text(e: &ClientError) -> String {
    match e {
        ClientError::Connect { reason, .. } => reason.clone(),
        ClientError::Refused(s) => format!("{:?}: {}", s.code(), s.message()),
        other => other.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_trust_domains_ca_under_the_same_upstream_root_cannot_impersonate_this_one() {
    let dir = tempfile::tempdir().unwrap();
    let root = Ca::root("Shared Upstream Root");
    let ours = root.intermediate(&format!("Upstream CA for {TD}"), &format!("spiffe://{TD}"));
    let theirs = root.intermediate("Upstream CA for other.td", "spiffe://other.td");
    let (cert, key) = upstream_files(dir.path(), &ours, &root);
    let cp = Binary::spawn(
        &dir.path().join("cp"),
        &["--upstream-ca-cert", &cert, "--upstream-ca-key", &key],
    );
    let shown = cp.ok(&["bundle", "show"]);
    let bundle = Arc::new(TrustBundle::from_pem(trust_domain(), &shown).unwrap());
    assert_eq!(
        bundle
            .authorities()
            .iter()
            .map(|c| c.to_vec())
            .collect::<Vec<_>>(),
        vec![root.der.clone()],
        "the bundle is the shared upstream root alone"
    );
    let (_b, bundle_rx) = watch::channel(bundle.clone());

    // The legitimate path: a node attests with a join token, gets a node SVID
    // chained through the upstream CA, and uses it.
    let token = cp.ok(&["token", "create", "--node", "node-a"]).trim().to_owned();
    let node_a = control_plane::attest_with_join_token(&cp.listen, bundle.clone(), "node-a", &token)
        .await
        .expect("a node attests against the upstream-CA control plane");
    assert_eq!(node_a.svid.chain().len(), 3, "leaf, Keyway CA, upstream CA");
    let (_c, cert_rx) = watch::channel(Some(node_a.svid.certified_key().unwrap()));
    let mut client = ControlPlaneClient::connect(&cp.listen, bundle_rx.clone(), cert_rx)
        .await
        .unwrap();
    client
        .renew_node_svid()
        .await
        .expect("the node SVID authenticates the node");

    // (a) A fake control plane with a B-minted control-plane SVID: the agent
    // must refuse it before sending its join token.
    let fake = theirs.mint(&spiffe_id::control_plane_id(&trust_domain()).to_string(), None);
    let token_b = cp.ok(&["token", "create", "--node", "node-b"]).trim().to_owned();
    let (fake_addr, mut heard) = fake_control_plane(&fake, token_b.clone()).await;
    let err = control_plane::attest_with_join_token(&fake_addr, bundle.clone(), "node-b", &token_b)
        .await
        .expect_err("an agent must not attest to a control plane minted by another trust domain's CA");
    assert!(
        matches!(err, ClientError::Connect { .. }),
        "refused while connecting: {err}"
    );
    let leaked = heard.recv().await.unwrap_or_default();
    assert!(
        !leaked.windows(token_b.len()).any(|w| w == token_b.as_bytes()),
        "the join token reached the fake control plane"
    );
    // The same refusal through a plain rustls client with Keyway's verifier
    // says what is wrong and what to do.
    let config = tls::client_config(
        bundle_rx.clone(),
        PeerMatch::Exact(spiffe_id::control_plane_id(&trust_domain())),
        None,
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(&fake_addr).await.unwrap();
    let err = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("keyway-control-plane").unwrap(), tcp)
        .await
        .expect_err("the handshake must fail");
    let msg = err.to_string();
    assert!(
        msg.contains("\"CN=Upstream CA for other.td\" is not constrained to trust domain example.org")
            && msg.contains("needs the URI SAN spiffe://example.org"),
        "{msg}"
    );

    // (b) A node SVID for node-a minted by B, carrying node-a's registration
    // tag (its serial is in every certificate node-a presents): the control
    // plane must refuse it at the TLS layer and issue nothing.
    let forged = theirs.mint(
        &format!("spiffe://{TD}/keyway/node/node-a"),
        Some(node_a.svid.serial()),
    );
    let (_f, forged_rx) = watch::channel(Some(forged.certified_key().unwrap()));
    let result = match ControlPlaneClient::connect(&cp.listen, bundle_rx.clone(), forged_rx).await {
        Err(e) => Err(e),
        // TLS 1.3 reports a refused client certificate on first use.
        Ok(mut c) => c.renew_node_svid().await,
    };
    match result {
        Ok(stolen) => panic!(
            "a node SVID minted by another trust domain's CA was accepted: the control plane issued {} to it",
            stolen.svid.spiffe_id()
        ),
        Err(e) => {
            let text = refusal_text(&e);
            let tls_layer = match &e {
                ClientError::Connect { .. } => true,
                // The gRPC call never reached the service: the transport failed
                // (which code depends on when the connection died).
                ClientError::Refused(s) => {
                    matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                    ) && !text.contains("node")
                }
                _ => false,
            };
            assert!(tls_layer, "refused at the TLS layer, not by the service: {text}");
        }
    }

    // node-a itself is unaffected.
    client
        .renew_node_svid()
        .await
        .expect("the legitimate node still works");
}

#[test]
fn an_upstream_ca_without_our_trust_domain_is_refused_at_start_x5_05() {
    // Everything signed under it would be refused by every verifier; the
    // operator hears it once, at start, with what to change.
    let dir = tempfile::tempdir().unwrap();
    let root = Ca::root("Shared Upstream Root");
    let bare = Ca {
        params: ca_params("Unscoped Upstream CA", None),
        key: KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        der: Vec::new(),
    };
    let bare = Ca {
        der: bare
            .params
            .signed_by(&bare.key, &root.issuer())
            .unwrap()
            .der()
            .to_vec(),
        ..bare
    };
    let (cert, key) = upstream_files(dir.path(), &bare, &root);
    let out = std::process::Command::new(keyway_tests::bin("control-plane"))
        .args(["serve", "--trust-domain", TD, "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("cp"))
        .args(["--upstream-ca-cert", &cert, "--upstream-ca-key", &key])
        .env("KEYWAY_METRICS_ADDRESS", "off")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with an unscoped upstream CA");
    assert!(
        stderr.contains("\"CN=Unscoped Upstream CA\" is not constrained to trust domain example.org")
            && stderr.contains("needs the URI SAN spiffe://example.org"),
        "{stderr}"
    );
}
