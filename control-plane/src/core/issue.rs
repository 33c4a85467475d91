//! Issuance: workload X509- and JWT-SVIDs for attested nodes and for the
//! admin API, node SVID renewals, the control plane's own serving SVID, and
//! the issuance log's retention.

use super::*;

impl ControlPlane {
    /// Issues (and logs) a certificate for `spiffe_id` from a CSR, with a
    /// serial number tag for node SVIDs.
    pub(super) async fn issue(
        &self,
        csr_der: &[u8],
        spiffe_id: &SpiffeId,
        ttl: Duration,
        requester: &str,
        kind: IssuedKind,
        serial_tag: Option<u32>,
    ) -> Result<Issued, ApiError> {
        let started = std::time::Instant::now();
        let public_key =
            csr::check(csr_der, &spiffe_id.to_string()).map_err(|e| self.refuse(Refusal::BadCsr, e))?;
        let now = now_unix();
        let issued = self
            .authority()
            .issue(&public_key, spiffe_id, ttl, now, serial_tag)?;
        self.inner
            .store
            .log_issuance(&IssuanceRecord {
                serial: issued.serial.clone(),
                spiffe_id: spiffe_id.to_string(),
                requester: requester.to_owned(),
                ca_id: issued.ca_id.clone(),
                issued_at: now,
                not_after: issued.not_after,
            })
            .await?;
        self.inner.metrics.issued(kind, started);
        Ok(issued)
    }

    /// Issues the control plane's own serving SVID and publishes it to the
    /// TLS listener.
    pub async fn renew_own_svid(&self) -> Result<SystemTime, ApiError> {
        let (key, csr_der) = keyway_identity::csr::generate().map_err(ApiError::internal_from)?;
        let id = spiffe_id::control_plane_id(&self.inner.cfg.trust_domain);
        let issued = self
            .issue(
                &csr_der,
                &id,
                self.inner.cfg.node_svid_ttl,
                "control-plane",
                IssuedKind::ControlPlane,
                None,
            )
            .await?;
        let svid =
            keyway_identity::Svid::new(issued.chain, key.serialize_der()).map_err(ApiError::internal_from)?;
        let certified = svid.certified_key().map_err(ApiError::internal_from)?;
        self.inner.own_cert.send_replace(Some(certified));
        Ok(svid.not_after())
    }

    /// Prunes the issuance log to `--issuance-*` (leader only; others
    /// return `None`), and records what it holds in the metrics.
    pub async fn prune_issuance_log(&self) -> Result<Option<crate::store::PruneOutcome>, ApiError> {
        if !self.is_leader() {
            return Ok(None);
        }
        let keep = self.inner.cfg.issuance_retention;
        let out = self.inner.store.prune_issuance(&keep, now_unix()).await?;
        self.inner.metrics.issuance_log(&out);
        if out.removed > 0 {
            info!(
                removed = out.removed,
                kept = out.kept,
                kept_bytes = out.kept_bytes,
                "issuance log pruned"
            );
        }
        if out.unreadable > 0 {
            warn!(
                unreadable = out.unreadable,
                "issuance records that cannot be read are kept; see the store"
            );
        }
        Ok(Some(out))
    }

    /// Prunes the issuance log until `shutdown`: soon after start, then a
    /// few times per retention margin (at most every five minutes).
    pub async fn run_issuance_retention(&self, mut shutdown: watch::Receiver<bool>) {
        let margin = self.inner.cfg.issuance_retention.after_expiry;
        // Each prune reads the whole log: not more often than every 10 s.
        let every = (margin / 4).clamp(Duration::from_secs(10), Duration::from_secs(300));
        let mut wait = every.min(Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
            wait = every;
            if let Err(e) = self.prune_issuance_log().await {
                warn!(error = %e, "pruning the issuance log failed; retrying later");
            }
        }
    }

    pub async fn renew_node_svid(&self, node: &str, csr_der: &[u8]) -> Result<NodeSvid, ApiError> {
        let node_rec = self.node(node).ok_or_else(|| {
            self.refuse(
                Refusal::NotAttested,
                ApiError::PermissionDenied(format!("node {node} is not attested")),
            )
        })?;
        let id = spiffe_id::node_id(&self.inner.cfg.trust_domain, node)
            .map_err(|e| self.refuse(Refusal::BadRequest, ApiError::InvalidArgument(e.to_string())))?;
        let issued = self
            .issue(
                csr_der,
                &id,
                self.inner.cfg.node_svid_ttl,
                node,
                IssuedKind::Node,
                Some(node_rec.registration),
            )
            .await?;
        Ok(NodeSvid {
            spiffe_id: id,
            issued,
            node: node_rec,
        })
    }

    /// The SVID TTL for `requested` on `node`, or why the node may not have it:
    /// nodes get SVIDs only for identities with a Workload placed on them.
    pub(super) fn authorize_workload(
        &self,
        node: &str,
        requested: &str,
    ) -> Result<(SpiffeId, Duration), ApiError> {
        let id = spiffe_id::parse_svid_id_in(requested, &self.inner.cfg.trust_domain)
            .map_err(|e| self.refuse(Refusal::BadRequest, ApiError::InvalidArgument(e.to_string())))?;
        let reg = self.inner.cluster.borrow();
        let with_id: Vec<_> = reg.workloads_with(requested).collect();
        let here: Vec<_> = with_id.iter().filter(|w| w.node == node).collect();
        if here.is_empty() {
            let elsewhere: std::collections::BTreeSet<&str> =
                with_id.iter().map(|w| w.node.as_str()).collect();
            self.inner.metrics.refused(Refusal::NotPlaced);
            return Err(ApiError::PermissionDenied(if elsewhere.is_empty() {
                format!(
                    "no workload with identity {requested} exists; nodes get SVIDs only for workloads placed on them"
                )
            } else {
                format!(
                    "node {node} has no workload with identity {requested} (it runs on: {}); nodes get SVIDs only for workloads placed on them",
                    elsewhere.into_iter().collect::<Vec<_>>().join(", ")
                )
            }));
        }
        let ttl = here
            .iter()
            .filter_map(|w| w.svid_ttl_secs)
            .min()
            .map(Duration::from_secs)
            .unwrap_or(self.inner.cfg.svid_ttl);
        Ok((id, ttl))
    }

    /// Signs a workload CSR for `node`, only for an identity with a Workload
    /// placed on that node.
    pub async fn sign_workload_csr(
        &self,
        node: &str,
        requested: &str,
        csr_der: &[u8],
    ) -> Result<(SpiffeId, Issued), ApiError> {
        let (id, ttl) = self.authorize_workload(node, requested)?;
        let issued = self
            .issue(csr_der, &id, ttl, node, IssuedKind::Workload, None)
            .await?;
        Ok((id, issued))
    }

    /// Mints a JWT-SVID for a workload identity placed on `node`.
    pub fn mint_workload_jwt(
        &self,
        node: &str,
        requested: &str,
        audience: &[String],
    ) -> Result<(String, i64), ApiError> {
        self.authorize_workload(node, requested)?;
        self.mint_jwt(requested, audience, self.inner.cfg.jwt_ttl)
    }

    /// Mints an X509-SVID for any ID in the trust domain (admin only).
    pub async fn mint_x509(
        &self,
        requested: &str,
        csr_der: &[u8],
        ttl: Duration,
    ) -> Result<Issued, ApiError> {
        let id = spiffe_id::parse_svid_id_in(requested, &self.inner.cfg.trust_domain)
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        self.issue(csr_der, &id, ttl, "admin", IssuedKind::Admin, None)
            .await
    }

    pub fn mint_jwt(
        &self,
        requested: &str,
        audience: &[String],
        ttl: Duration,
    ) -> Result<(String, i64), ApiError> {
        let id = spiffe_id::parse_svid_id_in(requested, &self.inner.cfg.trust_domain)
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        if audience.is_empty() || audience.iter().any(|a| a.is_empty()) {
            return Err(ApiError::InvalidArgument(
                "at least one non-empty audience is required (rule JWT-06)".into(),
            ));
        }
        Ok(self.authority().mint_jwt(&id, audience, ttl, now_unix())?)
    }
}
