//! Workload SVIDs: one task per identity owns its key and renewal, and the
//! cache publishes the set of current SVIDs through a `watch` that the
//! Workload API streams subscribe to.
//!
//! Rules (DESIGN.md section 5): renew at 50% of the lifetime with ±5% jitter;
//! never drop a still-valid SVID because a renewal failed; exponential backoff
//! per identity; one CA call in flight per identity (each task makes its calls
//! in sequence); identities that leave the node are forgotten and their keys
//! dropped (and zeroed).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use keyway_identity::Svid;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::control_plane::ControlPlaneClient;
use crate::state::NodeState;

/// Current SVIDs by SPIFFE ID.
pub type SvidSet = Arc<BTreeMap<String, Svid>>;

/// When to renew an SVID received at `received`: 50% of its remaining
/// lifetime, ±5% of the lifetime.
pub fn renew_after(svid: &Svid, received: SystemTime, jitter: f64) -> Duration {
    let lifetime = svid.not_after().duration_since(received).unwrap_or_default();
    let fraction = 0.5 + (jitter.clamp(0.0, 1.0) - 0.5) * 0.1;
    lifetime.mul_f64(fraction)
}

/// What a rotation task reports to the cache.
#[derive(Debug)]
enum Event {
    Issued(String, Svid),
    Expired(String),
}

/// Keeps one SVID per identity placed on this node.
#[derive(Debug)]
pub struct SvidCache {
    svids: watch::Sender<SvidSet>,
    rotations: watch::Sender<u64>,
}

impl SvidCache {
    pub fn new() -> Self {
        Self {
            svids: watch::channel(Arc::new(BTreeMap::new())).0,
            rotations: watch::channel(0).0,
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<SvidSet> {
        self.svids.subscribe()
    }

    /// Counts SVIDs issued so far (metrics, tests).
    pub fn rotations(&self) -> watch::Receiver<u64> {
        self.rotations.subscribe()
    }

    /// Runs until `shutdown`: follows the node state, starts and stops one
    /// rotation task per identity, and publishes the SVID set.
    pub async fn run(
        &self,
        mut state: watch::Receiver<Arc<NodeState>>,
        client: watch::Receiver<Option<ControlPlaneClient>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let (tx, mut rx) = mpsc::channel::<Event>(64);
        let mut tasks: BTreeMap<String, JoinHandle<()>> = BTreeMap::new();
        loop {
            let wanted = state.borrow_and_update().local_spiffe_ids();
            for id in &wanted {
                if !tasks.contains_key(id) {
                    debug!(spiffe_id = %id, "identity placed on this node");
                    tasks.insert(
                        id.clone(),
                        tokio::spawn(rotate(id.clone(), client.clone(), tx.clone())),
                    );
                }
            }
            let gone: Vec<String> = tasks.keys().filter(|id| !wanted.contains(id)).cloned().collect();
            for id in gone {
                if let Some(task) = tasks.remove(&id) {
                    task.abort();
                }
                info!(spiffe_id = %id, "identity left this node; its SVID and key are dropped");
                self.svids.send_if_modified(|set| {
                    if !set.contains_key(&id) {
                        return false;
                    }
                    let mut next = (**set).clone();
                    next.remove(&id);
                    *set = Arc::new(next);
                    true
                });
            }
            tokio::select! {
                r = state.changed() => if r.is_err() { break },
                Some(event) = rx.recv() => {
                    match event {
                        Event::Issued(id, svid) if tasks.contains_key(&id) => {
                            self.svids.send_modify(|set| {
                                let mut next = (**set).clone();
                                next.insert(id, svid);
                                *set = Arc::new(next);
                            });
                            self.rotations.send_modify(|n| *n += 1);
                        }
                        Event::Expired(id) => {
                            self.svids.send_if_modified(|set| {
                                let mut next = (**set).clone();
                                let changed = next.remove(&id).is_some();
                                *set = Arc::new(next);
                                changed
                            });
                        }
                        Event::Issued(..) => {}
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
        for (_, task) in tasks {
            task.abort();
        }
    }
}

impl Default for SvidCache {
    fn default() -> Self {
        Self::new()
    }
}

/// The life of one identity's SVID: obtain, renew at half-life, back off on
/// failure while the current SVID stays in use, report expiry.
async fn rotate(
    id: String,
    mut client: watch::Receiver<Option<ControlPlaneClient>>,
    tx: mpsc::Sender<Event>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let mut current: Option<Svid> = None;
    let mut failures_logged = false;
    loop {
        let maybe_client = client.borrow_and_update().clone();
        let result = match maybe_client {
            Some(mut c) => c.sign_workload(&id).await.map_err(|e| e.to_string()),
            None => Err("not connected to the control plane".to_string()),
        };
        let wait = match result {
            Ok(svid) => {
                backoff.reset();
                failures_logged = false;
                let received = SystemTime::now();
                let wait = renew_after(&svid, received, keyway_identity::jitter::unit());
                debug!(spiffe_id = %id, renew_in = ?wait, "SVID issued");
                current = Some(svid.clone());
                if tx.send(Event::Issued(id.clone(), svid)).await.is_err() {
                    return;
                }
                wait
            }
            Err(reason) => {
                if !failures_logged {
                    warn!(spiffe_id = %id, %reason, "SVID renewal failed; keeping the current SVID while it is valid");
                    failures_logged = true;
                }
                let delay = backoff.next_delay();
                // Never wait past the current SVID's expiry without reporting it.
                if let Some(svid) = &current {
                    let left = svid
                        .not_after()
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    if left.is_zero() {
                        current = None;
                        if tx.send(Event::Expired(id.clone())).await.is_err() {
                            return;
                        }
                    }
                }
                delay
            }
        };
        // After a failure, a (re)connection is a reason to try again at once.
        let last_failed = failures_logged;
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            r = client.changed(), if last_failed => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svid_with_ttl(secs: u64) -> Svid {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::URI("spiffe://td/a".try_into().unwrap())];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::seconds(10);
        p.not_after = now + time::Duration::seconds(secs as i64);
        let cert = p.signed_by(&key, &issuer).unwrap();
        Svid::new(vec![cert.der().to_vec()], key.serialize_der()).unwrap()
    }

    #[test]
    fn renews_at_half_life_within_five_percent() {
        let svid = svid_with_ttl(1000);
        let now = SystemTime::now();
        let lo = renew_after(&svid, now, 0.0).as_secs_f64();
        let mid = renew_after(&svid, now, 0.5).as_secs_f64();
        let hi = renew_after(&svid, now, 1.0).as_secs_f64();
        assert!((mid - 500.0).abs() < 2.0, "{mid}");
        assert!((lo - 450.0).abs() < 2.0, "{lo}");
        assert!((hi - 550.0).abs() < 2.0, "{hi}");
    }
}
