//! CA rotation: the steps (prepare, activate, retire), published to every
//! TLS config and sync stream at once, and the schedule that takes them.

use super::*;

impl ControlPlane {
    pub(super) fn publish_authority(&self, authority: Arc<Authority>) {
        self.inner.bundle.send_if_modified(|b| {
            if b.sequence() == authority.bundle().sequence() {
                return false;
            }
            *b = authority.bundle();
            true
        });
        self.inner.authority.send_replace(authority);
    }

    /// Runs one rotation step now (manual `ca prepare` / `ca activate`, or
    /// the scheduler).
    pub async fn rotate(&self, step: Step) -> Result<Arc<Authority>, ApiError> {
        if !self.is_leader() {
            return Err(ApiError::FailedPrecondition(
                "this replica is not the leader; CA rotation steps run on the leader (see the Lease's holderIdentity)".into(),
            ));
        }
        let _guard = self.inner.ca_lock.lock().await;
        let current = self.authority();
        let next_state: CaState = ca::apply_step(&self.inner.ca_cfg, current.state(), &step, now_unix())?;
        let next = Arc::new(Authority::new(
            self.inner.cfg.trust_domain.clone(),
            next_state,
            self.inner.ca_cfg.max_svid_ttl(),
        )?);
        self.inner.store.save_ca(next.state()).await?;
        self.inner.metrics.rotated(match step {
            Step::Prepare => RotationStep::Prepare,
            Step::Activate => RotationStep::Activate,
            Step::Retire(_) => RotationStep::Retire,
        });
        info!(
            ?step,
            sequence = next.state().bundle_sequence,
            active = next.active_id(),
            "CA rotation step"
        );
        self.publish_authority(next.clone());
        if step == Step::Activate {
            // Serve with an SVID from the new CA from now on.
            self.renew_own_svid().await?;
        }
        Ok(next)
    }

    /// Drives automatic rotation and renews the serving SVID until `shutdown`.
    pub async fn run_schedule(&self, mut shutdown: watch::Receiver<bool>) {
        let mut own_renew_at = tokio::time::Instant::now() + self.inner.cfg.node_svid_ttl / 2;
        loop {
            let now = now_unix();
            let next = ca::next_step(self.authority().state(), self.inner.ca_cfg.max_svid_ttl());
            let wait_ca = next
                .as_ref()
                .map(|(_, due)| Duration::from_secs((*due - now).max(0) as u64))
                .unwrap_or(Duration::from_secs(3600));
            // Wall-clock schedules are re-evaluated at least every minute so
            // a clock jump is noticed.
            let wait_ca = wait_ca.min(Duration::from_secs(60));
            tokio::select! {
                _ = tokio::time::sleep(wait_ca) => {
                    if self.is_leader()
                        && let Some((step, due)) = ca::next_step(self.authority().state(), self.inner.ca_cfg.max_svid_ttl())
                        && due <= now_unix()
                            && let Err(e) = self.rotate(step.clone()).await {
                                warn!(?step, error = %e, "scheduled CA rotation step failed; retrying in a minute");
                                tokio::time::sleep(Duration::from_secs(60).min(self.inner.ca_cfg.ca_ttl / 12)).await;
                            }
                }
                _ = tokio::time::sleep_until(own_renew_at) => {
                    match self.renew_own_svid().await {
                        Ok(_) => own_renew_at = tokio::time::Instant::now() + self.inner.cfg.node_svid_ttl / 2,
                        Err(e) => {
                            warn!(error = %e, "renewing the control plane's SVID failed; retrying");
                            own_renew_at = tokio::time::Instant::now() + Duration::from_secs(10);
                        }
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
