//! Node identity: attestation (with the [`crate::attest::NodeAttestor`] of
//! the method), the node's registration and its mutual-auth addresses,
//! revocation, authenticating a node SVID, and join tokens.

use super::*;

/// Looks up a Node's addresses (Kubernetes mode): `None` while the Node is
/// not known (yet).
pub type NodeAddresses = Arc<dyn Fn(&str) -> Option<Vec<std::net::IpAddr>> + Send + Sync>;

/// A node SVID as returned to an agent.
#[derive(Debug, Clone)]
pub struct NodeSvid {
    pub spiffe_id: SpiffeId,
    pub issued: Issued,
    pub node: NodeRecord,
}

impl ControlPlane {
    /// Accepts the proofs `attestor` checks for node attestation (its
    /// method's first attestor stays).
    pub fn enable_attestor(&self, attestor: Arc<dyn NodeAttestor>) {
        let _ = self.inner.attestors[attestor.method() as usize].set(attestor);
    }

    /// Checks the mutual-auth addresses agents advertise against their
    /// Node's addresses (Kubernetes mode): a node may not point its peers,
    /// and their handshakes, at an address that is not its own.
    pub fn check_node_addresses_with(&self, lookup: NodeAddresses) {
        let _ = self.inner.node_addresses.set(lookup);
    }

    /// Node attestation: checks the node name, the CSR and the proof (with
    /// the method's [`NodeAttestor`]), then signs the node SVID and registers
    /// the node, consuming a single-use proof in the same store write.
    ///
    /// Cheapest refusal first: a join token is looked up (a hash and one
    /// read, no lock) before the CSR is checked or anything is signed, so a
    /// flood of bad tokens costs no signature checks; a Kubernetes token is
    /// reviewed (a call to the API server) only for a request whose CSR
    /// holds. In Kubernetes mode join tokens are off unless
    /// `--allow-join-tokens` turns them on: agents there attest with their
    /// projected service account token.
    pub async fn attest(
        &self,
        method: Method,
        proof: &str,
        node: &str,
        csr_der: &[u8],
    ) -> Result<NodeSvid, ApiError> {
        let started = std::time::Instant::now();
        let Some(attestor) = self.inner.attestors[method as usize].get() else {
            let (reason, why) = method.off();
            return Err(self.refuse(reason, ApiError::FailedPrecondition(why.into())));
        };
        let bad = |e: String| self.refuse(Refusal::BadRequest, ApiError::InvalidArgument(e));
        spiffe_id::check_name("node name", node).map_err(|e| bad(e.to_string()))?;
        let id = spiffe_id::node_id(&self.inner.cfg.trust_domain, node).map_err(|e| bad(e.to_string()))?;
        let refused = |r: Refused| match r.reason {
            Some(reason) => self.refuse(reason, r.error),
            None => r.error,
        };
        let checked_first = if attestor.proof_before_csr() {
            Some(attestor.verify(proof, node).await.map_err(refused)?)
        } else {
            None
        };
        let public_key = csr::check(csr_der, &id.to_string()).map_err(|e| self.refuse(Refusal::BadCsr, e))?;
        let attested = match checked_first {
            Some(attested) => attested,
            None => attestor.verify(proof, node).await.map_err(refused)?,
        };
        // Signed under the registry lock: when the node's registration
        // begins is decided with nothing able to revoke it in between.
        let _guard = self.inner.registry_lock.lock().await;
        let (now, registration, issued, record) = self.issue_node_svid(&public_key, &id, node)?;
        let store = &self.inner.store;
        let node_rec = match &attested.consumes {
            // Consuming is what makes a proof single-use: two attempts with
            // the same token both pass its check, one of them consumes.
            Some(key) => store
                .consume_join_token(key, node, now, registration, &record)
                .await
                .map_err(|e| match e {
                    StoreError::TokenRefused(_) => self.refuse(Refusal::TokenRefused, e),
                    other => other.into(),
                })?,
            None => store.register_node(node, now, registration, &record).await?,
        };
        self.refresh_registry().await?;
        self.inner.metrics.issued(IssuedKind::Node, started);
        info!(
            node,
            node_id = node_rec.node_id,
            pod = attested.pod.as_ref().map(tracing::field::display),
            "node attested with a {}",
            method.describe()
        );
        Ok(NodeSvid {
            spiffe_id: id,
            issued,
            node: node_rec,
        })
    }

    /// Whether an attestation attempt from `source` is within its rate
    /// (counted and refused otherwise). Attestation is the one call that
    /// needs no certificate, so it is the cheapest to flood.
    pub fn attest_admitted(&self, source: std::net::IpAddr) -> bool {
        if self.inner.attest_rate.admit(source) {
            return true;
        }
        self.inner.metrics.refused(Refusal::RateLimited);
        false
    }

    /// Signs a node SVID for an attested node and the issuance record the
    /// store writes with the node's registration (one atomic step).
    ///
    /// The SVID's serial number carries the node's registration tag: the
    /// current one, or a fresh random one when this attestation begins a new
    /// registration (the node unknown, or revoked), returned for the store
    /// to record. So no SVID of an earlier, revoked registration ever passes
    /// [`ControlPlane::authenticate_node`] again. Call with the registry
    /// lock held, so the registration cannot change in between.
    pub(super) fn issue_node_svid(
        &self,
        public_key: &rcgen::SubjectPublicKeyInfo,
        id: &SpiffeId,
        node: &str,
    ) -> Result<(i64, u32, Issued, IssuanceRecord), ApiError> {
        let registration = match self.node(node) {
            Some(rec) => rec.registration,
            None => crate::tokens::random_u32().map_err(|_| ApiError::internal("no randomness"))?,
        };
        let now = now_unix();
        let issued = self.authority().issue(
            public_key,
            id,
            self.inner.cfg.node_svid_ttl,
            now,
            Some(registration),
        )?;
        let record = IssuanceRecord {
            serial: issued.serial.clone(),
            spiffe_id: id.to_string(),
            requester: node.to_owned(),
            ca_id: issued.ca_id.clone(),
            issued_at: now,
            not_after: issued.not_after,
        };
        Ok((now, registration, issued, record))
    }

    /// Revokes a node: its record is deleted, so its SVID is refused from now
    /// on (renewal included), its Sync stream ends, and every agent drops it
    /// from the node table and flushes the auth entries it vouched for. A
    /// new attestation starts a new registration; SVIDs from before the
    /// revocation stay refused (see [`NodeRecord::registration`]).
    pub async fn revoke_node(&self, node: &str) -> Result<bool, ApiError> {
        let _guard = self.inner.registry_lock.lock().await;
        let revoked = self.inner.store.revoke_node(node).await?;
        if revoked {
            warn!(node, "node revoked");
            self.refresh_registry().await?;
        }
        Ok(revoked)
    }

    /// The registered node behind a node SVID: refused when the node is not
    /// registered (never attested, or revoked) or the certificate predates
    /// its current registration (a key from before a revocation).
    pub fn authenticate_node(
        &self,
        node: &str,
        cert_serial_tag: Option<u32>,
    ) -> Result<NodeRecord, ApiError> {
        let Some(record) = self.node(node) else {
            self.inner.metrics.refused(Refusal::NotAttested);
            return Err(ApiError::PermissionDenied(format!(
                "node {node} is not attested with this control plane (never attested, or revoked); attest again"
            )));
        };
        if record.registration != 0 && cert_serial_tag != Some(record.registration) {
            self.inner.metrics.refused(Refusal::Revoked);
            return Err(ApiError::PermissionDenied(format!(
                "this node SVID for {node} was issued before the node's current registration (it was revoked \
                 since); attest again"
            )));
        }
        Ok(record)
    }

    /// The attested node record for `node`, if any.
    pub fn node(&self, node: &str) -> Option<NodeRecord> {
        self.inner
            .cluster
            .borrow()
            .records
            .nodes
            .iter()
            .find(|n| n.name == node)
            .cloned()
    }

    /// Records where `node`'s agent takes mutual-auth handshakes (what it
    /// sent when opening Sync), so every node's node table carries them. The
    /// addresses are checked first: one bad value refuses them all and
    /// stores nothing. A write happens only when they changed.
    pub async fn set_node_addresses(&self, node: &str, addresses: &[String]) -> Result<(), ApiError> {
        let addresses = check_auth_addresses(addresses)
            .map_err(|e| self.refuse(Refusal::BadAddresses, ApiError::InvalidArgument(e)))?;
        if let Some(lookup) = self.inner.node_addresses.get() {
            let Some(own) = lookup(node) else {
                return Err(ApiError::Unavailable(format!(
                    "Node {node} is not in this control plane's cache yet; retry shortly"
                )));
            };
            for (i, a) in addresses.iter().enumerate() {
                let ip = a.parse::<std::net::SocketAddr>().map(|s| s.ip()).ok();
                if !ip.is_some_and(|ip| own.contains(&ip)) {
                    return Err(self.refuse(
                        Refusal::BadAddresses,
                        ApiError::InvalidArgument(format!(
                            "auth_addresses[{i}]: {a} is not an address of Node {node} (its addresses: {}); \
                             advertise one of the Node's own addresses (--auth-address)",
                            own.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                        )),
                    ));
                }
            }
        }
        let current = self.node(node).ok_or_else(|| {
            self.refuse(
                Refusal::NotAttested,
                ApiError::PermissionDenied(format!("node {node} is not attested")),
            )
        })?;
        if current.addresses == addresses {
            return Ok(());
        }
        let _guard = self.inner.registry_lock.lock().await;
        match self
            .inner
            .store
            .set_node_addresses(node, addresses.clone())
            .await?
        {
            None => {
                return Err(ApiError::PermissionDenied(format!("node {node} is not attested")));
            }
            Some(false) => {}
            Some(true) => {
                info!(node, addresses = ?addresses, "node mutual-auth addresses changed");
                self.refresh_registry().await?;
            }
        }
        Ok(())
    }

    pub async fn create_join_token(&self, node: &str, ttl: Duration) -> Result<(String, i64), ApiError> {
        spiffe_id::check_name("node name", node).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let token = crate::tokens::generate().map_err(|_| ApiError::internal("no randomness"))?;
        let now = now_unix();
        let expires_at = now + ttl.as_secs() as i64;
        self.inner
            .store
            .put_join_token(
                &crate::tokens::hash(&token),
                &JoinTokenRecord {
                    node: node.to_owned(),
                    created_at: now,
                    expires_at,
                    consumed_at: None,
                },
            )
            .await?;
        info!(node, expires_at, "join token created");
        Ok((token, expires_at))
    }
}

/// How many mutual-auth addresses one node may advertise.
pub const MAX_AUTH_ADDRESSES: usize = 16;

/// Checks the mutual-auth addresses an agent advertises and returns them in
/// canonical form (`IP:PORT`, `[IPv6]:PORT`), duplicates dropped, order kept.
/// Each must be dialable by a peer: a specific IP and a non-zero port.
pub fn check_auth_addresses(raw: &[String]) -> Result<Vec<String>, String> {
    if raw.len() > MAX_AUTH_ADDRESSES {
        return Err(format!(
            "auth_addresses: {} addresses given; at most {MAX_AUTH_ADDRESSES} are accepted",
            raw.len()
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(raw.len());
    for (i, a) in raw.iter().enumerate() {
        let addr: std::net::SocketAddr = a.parse().map_err(|_| {
            format!("auth_addresses[{i}]: {a:?} is not IP:PORT (e.g. 10.0.0.5:4250 or [fd00::5]:4250)")
        })?;
        if addr.ip().is_unspecified() || addr.ip().is_multicast() {
            return Err(format!(
                "auth_addresses[{i}]: {a:?} cannot be dialled by peers; advertise the node's own IP"
            ));
        }
        if addr.port() == 0 {
            return Err(format!(
                "auth_addresses[{i}]: {a:?} has port 0; advertise the port the agent listens on"
            ));
        }
        let canonical = addr.to_string();
        if !out.contains(&canonical) {
            out.push(canonical);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(list: &[&str]) -> Result<Vec<String>, String> {
        check_auth_addresses(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn auth_addresses_are_socket_addresses_peers_can_dial() {
        assert_eq!(check(&[]).unwrap(), Vec::<String>::new());
        assert_eq!(
            check(&["10.0.0.5:4250", "[FD00::5]:4250", "10.0.0.5:4250"]).unwrap(),
            vec!["10.0.0.5:4250", "[fd00::5]:4250"]
        );
        for (bad, want) in [
            ("10.0.0.5", "is not IP:PORT"),
            ("node-a:4250", "is not IP:PORT"),
            ("10.0.0.5:99999", "is not IP:PORT"),
            ("0.0.0.0:4250", "cannot be dialled"),
            ("[::]:4250", "cannot be dialled"),
            ("224.0.0.1:4250", "cannot be dialled"),
            ("10.0.0.5:0", "port 0"),
        ] {
            let e = check(&["10.0.0.1:4250", bad]).unwrap_err();
            assert!(
                e.starts_with("auth_addresses[1]: ") && e.contains(&format!("{bad:?}")) && e.contains(want),
                "{bad}: {e}"
            );
        }
        let many: Vec<String> = (1..=17).map(|i| format!("10.0.0.{i}:4250")).collect();
        assert!(check_auth_addresses(&many).unwrap_err().contains("at most 16"));
    }
}
