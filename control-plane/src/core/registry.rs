//! The registry: workloads, their numeric identities, nodes and policies,
//! from standalone documents (`apply`, `delete`) or from Kubernetes' watch
//! caches (`apply_sourced`), published with its compiled policy as one
//! [`Cluster`] per change; identities no workload uses are collected.

use super::*;
use keyway_identity::lock::Recover;

/// Kubernetes mode's view of the API server (see [`ControlPlane::apply_sourced`]).
#[derive(Debug, Default)]
pub(super) struct Sourced {
    /// By namespace/name (the registry's order).
    workloads: std::collections::BTreeMap<String, SourcedWorkload>,
    /// By namespace/name: the last valid version of each policy.
    policies: std::collections::BTreeMap<String, PolicyRecord>,
    /// Grows with every change, so the published revision does too.
    generation: u64,
    /// The stored identities the workloads were last resolved against, and
    /// their numbers by [`crate::store::identity_key`]: rebuilt only when
    /// the stored identities change, not per batch.
    resolved: Option<(Vec<crate::model::IdentityRecord>, HashMap<String, u32>)>,
    /// Grows each time `resolved` is rebuilt; a workload resolved since
    /// (whose record did not change) keeps its identity without a lookup.
    resolution: u64,
}

/// A workload of Kubernetes mode's view. The record is shared with the
/// published registry (a publish copies a pointer, not the record); its
/// `identity` is filled from the store at publish.
#[derive(Debug)]
pub(super) struct SourcedWorkload {
    record: Arc<WorkloadRecord>,
    /// [`crate::store::identity_key`] of the record, computed once.
    identity_key: String,
    /// The [`Sourced::resolution`] `record.identity` was set at (0: never).
    resolved_at: u64,
}

impl SourcedWorkload {
    fn new(w: WorkloadRecord) -> Self {
        let identity_key = crate::store::identity_key(&w.namespace, &w.service_account, &w.labels);
        Self {
            record: Arc::new(WorkloadRecord { identity: 0, ..w }),
            identity_key,
            resolved_at: 0,
        }
    }
}

/// Changes to Kubernetes mode's view: per namespace/name, the record now
/// (`None`: gone).
#[derive(Debug, Default)]
pub struct SourcedChanges {
    pub workloads: Vec<(String, Option<WorkloadRecord>)>,
    pub policies: Vec<(String, Option<PolicyRecord>)>,
}

impl SourcedChanges {
    pub fn is_empty(&self) -> bool {
        self.workloads.is_empty() && self.policies.is_empty()
    }
}

/// What [`ControlPlane::apply_sourced`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SourcedOutcome {
    /// Records that differed from what was held.
    pub changed: usize,
    /// Identities this call allocated in the store (leader only).
    pub allocated: usize,
    /// Workloads held back because their identity is not allocated yet
    /// (a replica that does not lead waits for the leader to allocate).
    pub waiting: usize,
}

impl ControlPlane {
    /// Every published version of the cluster view: the registry's records
    /// and the policy compiled from them.
    pub fn subscribe_cluster(&self) -> watch::Receiver<Arc<Cluster>> {
        self.inner.cluster.subscribe()
    }

    /// Forgets the numeric identities no workload has used for `grace`
    /// (leader only; others return 0). `unused` remembers since when each
    /// was seen unused; it lives with the caller's loop, so a restart only
    /// delays collection. Returns how many were forgotten.
    pub async fn collect_unused_identities(
        &self,
        unused: &mut HashMap<u32, tokio::time::Instant>,
        grace: Duration,
    ) -> Result<usize, ApiError> {
        if !self.is_leader() || !*self.inner.view_ready.borrow() {
            // A replica whose watch caches have not synced knows no pod:
            // every identity would look unused.
            unused.clear();
            return Ok(0);
        }
        let now = tokio::time::Instant::now();
        // Under the registry lock, so no workload starts using an identity
        // between this look and its collection.
        let _guard = self.inner.registry_lock.lock().await;
        let cluster = self.cluster();
        let used: HashSet<u32> = cluster.records.workloads.iter().map(|w| w.identity).collect();
        let idle: HashSet<u32> = cluster
            .records
            .identities
            .iter()
            .map(|i| i.id)
            .filter(|id| !used.contains(id))
            .collect();
        unused.retain(|id, _| idle.contains(id));
        for id in &idle {
            unused.entry(*id).or_insert(now);
        }
        let due: Vec<u32> = unused
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= grace)
            .map(|(id, _)| *id)
            .collect();
        if due.is_empty() {
            return Ok(0);
        }
        let n = self.inner.store.forget_identities(&due).await?;
        for id in &due {
            unused.remove(id);
        }
        if n > 0 {
            info!(forgotten = n, "unused numeric identities collected");
            self.refresh_registry().await?;
        }
        Ok(n)
    }

    /// Collects unused identities until `shutdown`, a few times per grace
    /// period (at most every five minutes).
    pub async fn run_identity_gc(&self, mut shutdown: watch::Receiver<bool>) {
        let grace = self.inner.cfg.identity_gc_grace;
        let every = (grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(300));
        let mut unused = HashMap::new();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
            if let Err(e) = self.collect_unused_identities(&mut unused, grace).await {
                warn!(error = %e, "collecting unused identities failed; retrying later");
            }
        }
    }

    /// Applies Workload and KeywayNetworkPolicy documents: all of them, or
    /// none when any is invalid.
    pub async fn apply(&self, yaml: &str) -> Result<ApplyOutcome, ApiError> {
        self.refuse_in_kubernetes_mode()?;
        let docs = crate::documents::parse_documents(
            yaml,
            &self.inner.cfg.trust_domain,
            self.inner.ca_cfg.max_svid_ttl(),
        )
        .map_err(ApiError::InvalidArgument)?;
        let _guard = self.inner.registry_lock.lock().await;
        self.check_policy_budgets(&docs.workloads, &docs.policies)?;
        let outcome = self.inner.store.apply(docs.workloads, docs.policies).await?;
        self.refresh_registry().await?;
        Ok(outcome)
    }

    /// Refuses an apply that would leave a policy over its entry budget
    /// (one it brings, or one already stored that its workloads would
    /// enlarge), naming the policy and the figures; nothing is stored then.
    pub(super) fn check_policy_budgets(
        &self,
        workloads: &[WorkloadRecord],
        policies: &[PolicyRecord],
    ) -> Result<(), ApiError> {
        use crate::model::IdentityRecord;
        use crate::store::{identity_key, identity_labels};
        let current = self.cluster();
        let records = &current.records;
        let applied: HashSet<String> = workloads.iter().map(WorkloadRecord::key).collect();
        let mut by_key: HashMap<String, IdentityRecord> = records
            .identities
            .iter()
            .map(|i| {
                (
                    identity_key(&i.namespace, &i.service_account, &i.labels),
                    i.clone(),
                )
            })
            .collect();
        let mut used: HashSet<u32> = records
            .workloads
            .iter()
            .filter(|w| !applied.contains(&w.key()))
            .map(|w| w.identity)
            .collect();
        // New identities get stand-in numbers above any real one.
        let mut next = u32::MAX;
        for w in workloads {
            let labels = identity_labels(&w.labels);
            let key = identity_key(&w.namespace, &w.service_account, &labels);
            let id = by_key
                .entry(key)
                .or_insert_with(|| {
                    next -= 1;
                    IdentityRecord {
                        id: next,
                        spiffe_id: w.spiffe_id.clone(),
                        namespace: w.namespace.clone(),
                        service_account: w.service_account.clone(),
                        labels,
                    }
                })
                .id;
            used.insert(id);
        }
        let identities: Vec<IdentityRecord> = by_key.into_values().filter(|i| used.contains(&i.id)).collect();
        let incoming: HashSet<String> = policies.iter().map(PolicyRecord::key).collect();
        let mut all: Vec<PolicyRecord> = records
            .policies
            .iter()
            .filter(|p| !incoming.contains(&p.key()))
            .cloned()
            .collect();
        all.extend(policies.iter().cloned());
        let refused = crate::policy::refusals(&identities, &all, self.inner.cfg.policy_budget);
        let new: Vec<String> = refused
            .iter()
            .filter(|(k, _)| !current.policy.refused.contains_key(*k))
            .map(|(k, why)| format!("KeywayNetworkPolicy {k}: {why}"))
            .collect();
        if new.is_empty() {
            Ok(())
        } else {
            Err(ApiError::InvalidArgument(format!(
                "refused, nothing applied: {}",
                new.join("; ")
            )))
        }
    }

    /// Deletes the Workload and KeywayNetworkPolicy documents a YAML file
    /// names (by kind, namespace and name), all or nothing. Their numeric
    /// identities stay allocated, so the same workload applied again gets
    /// the same one; agents stop receiving an identity once no workload uses
    /// it.
    pub async fn delete(&self, yaml: &str) -> Result<ApplyOutcome, ApiError> {
        self.refuse_in_kubernetes_mode()?;
        let refs = crate::documents::parse_refs(yaml).map_err(ApiError::InvalidArgument)?;
        let _guard = self.inner.registry_lock.lock().await;
        let outcome = self.inner.store.delete(refs).await?;
        self.refresh_registry().await?;
        Ok(outcome)
    }

    pub(super) fn refuse_in_kubernetes_mode(&self) -> Result<(), ApiError> {
        if self.inner.cfg.kubernetes {
            return Err(ApiError::FailedPrecondition(
                "this control plane runs in Kubernetes mode: workloads come from Pods and policies from \
                 KeywayNetworkPolicy/NetworkPolicy objects; use kubectl apply"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Kubernetes mode: takes what changed in the watch caches (pods as
    /// workloads, policies) into the view the registry is built from, and
    /// publishes. Nothing is stored but numeric identities: the leader
    /// allocates one for each new (namespace, service account, labels), in
    /// one store call per batch; a replica that does not lead holds such
    /// workloads back until the leader's allocation reaches its store.
    /// A workload whose identity exists costs no store write.
    pub async fn apply_sourced(&self, changes: SourcedChanges) -> Result<SourcedOutcome, ApiError> {
        let Some(sourced) = self.inner.sourced.get() else {
            return Err(ApiError::FailedPrecondition(
                "only Kubernetes mode reads workloads from the API server".into(),
            ));
        };
        let _guard = self.inner.registry_lock.lock().await;
        let mut out = SourcedOutcome::default();
        let generation;
        {
            let mut view = sourced.locked();
            for (key, mut record) in changes.workloads {
                // The identity is the view's (the watch caches do not know it).
                let same = match (view.workloads.get(&key), record.as_mut()) {
                    (Some(held), Some(new)) => {
                        new.identity = held.record.identity;
                        *held.record == *new
                    }
                    (None, None) => true,
                    _ => false,
                };
                if same {
                    continue;
                }
                out.changed += 1;
                match record {
                    Some(w) => {
                        view.workloads.insert(key, SourcedWorkload::new(w));
                    }
                    None => {
                        view.workloads.remove(&key);
                    }
                }
            }
            for (key, record) in changes.policies {
                if view.policies.get(&key) == record.as_ref() {
                    continue;
                }
                out.changed += 1;
                match record {
                    Some(p) => view.policies.insert(key, p),
                    None => view.policies.remove(&key),
                };
            }
            if out.changed > 0 {
                view.generation += 1;
            }
            generation = view.generation;
        }
        let leader = self.is_leader();
        let waiting = self
            .inner
            .sourced_waiting
            .load(std::sync::atomic::Ordering::Relaxed);
        let published = self
            .inner
            .sourced_published
            .load(std::sync::atomic::Ordering::Relaxed);
        // Nothing new: the view was published as it is (a batch retried
        // after a store error was taken into the view, not published), and
        // no workload waits for an identity this replica now allocates (it
        // just took the lead).
        if out.changed == 0 && published == generation && !(leader && waiting > 0) {
            return Ok(out);
        }
        let stored = self.inner.store.registry().await?;
        let previous = self.cluster();
        let (mut records, mut unresolved) =
            merge_sourced(self.inner.sourced.get(), stored, &previous.records.workloads);
        if leader && !unresolved.is_empty() {
            let wanted: Vec<crate::model::IdentityRecord> = unresolved
                .iter()
                .map(|w| crate::model::IdentityRecord {
                    id: 0,
                    spiffe_id: w.spiffe_id.clone(),
                    namespace: w.namespace.clone(),
                    service_account: w.service_account.clone(),
                    labels: crate::store::identity_labels(&w.labels),
                })
                .collect();
            let before = records.identities.len();
            self.inner.store.allocate_identities(&wanted).await?;
            let stored = self.inner.store.registry().await?;
            out.allocated = stored.identities.len().saturating_sub(before);
            (records, unresolved) =
                merge_sourced(self.inner.sourced.get(), stored, &previous.records.workloads);
        }
        out.waiting = unresolved.len();
        self.inner
            .sourced_waiting
            .store(out.waiting, std::sync::atomic::Ordering::Relaxed);
        self.publish_cluster(records);
        self.inner
            .sourced_published
            .store(generation, std::sync::atomic::Ordering::Relaxed);
        Ok(out)
    }

    /// From now on workloads and policies are what Kubernetes mode's
    /// watchers report ([`ControlPlane::apply_sourced`]), not stored ones.
    pub fn read_workloads_from_kubernetes(&self) {
        let _ = self.inner.sourced.set(std::sync::Mutex::new(Sourced::default()));
        self.inner.view_ready.send_replace(false);
    }

    /// Kubernetes mode: the watch caches synced and the view was published
    /// once; identity collection may judge what is unused from now on.
    pub fn sourced_synced(&self) {
        self.inner.view_ready.send_replace(true);
    }

    /// Returns once the published registry describes the cluster (at once
    /// outside Kubernetes mode; in it, after the first publish from synced
    /// watch caches). A Sync stream waits for this before its snapshot: a
    /// restarted control plane would otherwise send every agent a complete
    /// view with no workloads, and each agent would withdraw its pods'
    /// entries until the caches synced.
    pub async fn view_ready(&self) {
        let mut ready = self.inner.view_ready.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = ready.wait_for(|r| *r).await;
    }

    /// How many workloads Kubernetes mode's view holds (0 otherwise).
    pub fn sourced_len(&self) -> usize {
        self.inner.sourced.get().map_or(0, |s| s.locked().workloads.len())
    }

    /// Kubernetes mode: the keys (namespace/name) of the workloads and
    /// policies in the view.
    pub fn sourced_keys(&self) -> (Vec<String>, Vec<String>) {
        self.inner.sourced.get().map_or_else(Default::default, |s| {
            let view = s.locked();
            (
                view.workloads.keys().cloned().collect(),
                view.policies.keys().cloned().collect(),
            )
        })
    }

    /// Publishes the stored registry, compiling policy only when the records
    /// changed.
    pub(super) async fn refresh_registry(&self) -> Result<(), ApiError> {
        let stored = self.inner.store.registry().await?;
        let previous = self.cluster();
        let (mut records, unresolved) =
            merge_sourced(self.inner.sourced.get(), stored, &previous.records.workloads);
        if self.inner.sourced.get().is_none() {
            // Read back from the store, every record is a new copy.
            crate::sync::share_unchanged(&previous.records.workloads, &mut records.workloads);
        }
        self.inner
            .sourced_waiting
            .store(unresolved.len(), std::sync::atomic::Ordering::Relaxed);
        self.publish_cluster(records);
        Ok(())
    }

    pub(super) fn publish_cluster(&self, records: RegistrySnapshot) {
        if self.inner.cluster.borrow().records == records {
            return;
        }
        let previous = self.inner.cluster.borrow().clone();
        let cluster = Arc::new(previous.next(records, self.inner.cfg.policy_budget));
        let before = previous.policy.refused.clone();
        for (policy, why) in cluster
            .policy
            .refused
            .iter()
            .filter(|(k, _)| !before.contains_key(*k))
        {
            warn!(%policy, reason = %why, "policy over its entry budget: not compiled, its endpoints default-deny");
        }
        info!(
            revision = cluster.records.revision,
            policies = cluster.records.policies.len(),
            policy_entries = cluster.policy.len(),
            "registry changed"
        );
        self.inner.cluster.send_replace(cluster);
    }

    /// The cluster view now (see [`ControlPlane::subscribe_cluster`]).
    pub fn cluster(&self) -> Arc<Cluster> {
        self.inner.cluster.borrow().clone()
    }
}

/// The registry the control plane serves: the stored one, and in Kubernetes
/// mode the workloads and policies of the watch caches, each workload with
/// the identity the store allocated for it. Workloads with no identity yet
/// are returned apart, and held meanwhile as `previous` (the published
/// workloads) had them: a pod relabelled on a replica that does not lead
/// keeps its old identity (labels and number, its new addresses and node)
/// until the leader's allocation reaches this replica, as a Cilium endpoint
/// keeps its identity until the new one is allocated, instead of vanishing
/// from its node. A workload not published before waits unseen.
fn merge_sourced(
    sourced: Option<&std::sync::Mutex<Sourced>>,
    mut stored: RegistrySnapshot,
    previous: &[Arc<WorkloadRecord>],
) -> (RegistrySnapshot, Vec<WorkloadRecord>) {
    let Some(sourced) = sourced else {
        return (stored, Vec::new());
    };
    let mut guard = sourced.locked();
    let view = &mut *guard;
    if !view
        .resolved
        .as_ref()
        .is_some_and(|(from, _)| *from == stored.identities)
    {
        // An identity two replicas allocated at once has two numbers: the
        // lowest is used, and the other, unused, is collected.
        let mut by_key: HashMap<String, u32> = HashMap::with_capacity(stored.identities.len());
        for i in &stored.identities {
            let key = crate::store::identity_key(&i.namespace, &i.service_account, &i.labels);
            by_key
                .entry(key)
                .and_modify(|id| *id = (*id).min(i.id))
                .or_insert(i.id);
        }
        view.resolved = Some((stored.identities.clone(), by_key));
        view.resolution += 1;
    }
    let by_key = &view.resolved.as_ref().expect("just set").1;
    // Each record is shared with the view: only a record whose identity
    // changed is copied (once; a new one is not shared yet). A record
    // resolved against these identities before is not looked up again.
    let mut workloads = Vec::with_capacity(view.workloads.len());
    let mut unresolved = Vec::new();
    for w in view.workloads.values_mut() {
        if w.resolved_at == view.resolution {
            workloads.push(Arc::clone(&w.record));
            continue;
        }
        match by_key.get(&w.identity_key) {
            Some(id) => {
                if w.record.identity != *id {
                    Arc::make_mut(&mut w.record).identity = *id;
                }
                w.resolved_at = view.resolution;
                workloads.push(Arc::clone(&w.record));
            }
            None => {
                let r = &w.record;
                // `previous` is in the same (namespace/name) order.
                if let Ok(i) = previous.binary_search_by(|p| {
                    crate::store::key_order(&p.namespace, &p.name, &r.namespace, &r.name)
                }) {
                    workloads.push(Arc::new(WorkloadRecord {
                        node: r.node.clone(),
                        ips: r.ips.clone(),
                        ..(*previous[i]).clone()
                    }));
                }
                unresolved.push((**r).clone());
            }
        }
    }
    // In key order already (a BTreeMap by namespace/name).
    stored.workloads = workloads;
    stored.policies = view.policies.values().cloned().collect();
    stored.revision += view.generation;
    (stored, unresolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_take_the_lowest_number_of_a_duplicated_identity_and_keep_theirs_while_relabelled() {
        let ident = |id: u32, sa: &str| crate::model::IdentityRecord {
            id,
            spiffe_id: format!("spiffe://td/ns/default/sa/{sa}"),
            namespace: "default".into(),
            service_account: sa.into(),
            labels: Default::default(),
        };
        let wl = |name: &str, sa: &str| WorkloadRecord {
            namespace: "default".into(),
            name: name.into(),
            service_account: sa.into(),
            node: "n1".into(),
            ips: vec![],
            labels: Default::default(),
            selectors: vec![],
            svid_ttl_secs: None,
            identity: 0,
            spiffe_id: format!("spiffe://td/ns/default/sa/{sa}"),
        };
        let sourced = std::sync::Mutex::new(Sourced {
            workloads: [wl("a", "web"), wl("b", "new")]
                .into_iter()
                .map(|w| (w.key(), SourcedWorkload::new(w)))
                .collect(),
            ..Default::default()
        });
        // This replica's store has seen one allocation of "web" so far.
        let first = RegistrySnapshot {
            identities: vec![ident(300, "web")],
            ..Default::default()
        };
        let (merged, _) = merge_sourced(Some(&sourced), first, &[]);
        assert_eq!(merged.workloads[0].identity, 300);
        let stored = RegistrySnapshot {
            // Two replicas allocated "web" at once: 300 and 257. The
            // workload resolved before takes the lower number as soon as
            // it is stored (resolutions are kept only while the stored
            // identities stay the same).
            identities: vec![ident(300, "web"), ident(256, "api"), ident(257, "web")],
            ..Default::default()
        };
        let (merged, unresolved) = merge_sourced(Some(&sourced), stored.clone(), &[]);
        assert_eq!(
            merged
                .workloads
                .iter()
                .map(|w| (w.name.as_str(), w.identity))
                .collect::<Vec<_>>(),
            vec![("a", 257)]
        );
        assert_eq!(
            unresolved.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(),
            vec!["b"]
        );
        assert_eq!(
            merged.identities.len(),
            3,
            "the unused duplicate stays visible to the collector"
        );
        // Publishing again shares the records instead of copying them
        // (what keeps a 100k-pod view in memory once).
        let (again, _) = merge_sourced(Some(&sourced), stored.clone(), &merged.workloads);
        assert!(
            again
                .workloads
                .iter()
                .zip(&merged.workloads)
                .all(|(a, b)| Arc::ptr_eq(a, b))
        );

        // "a" is relabelled (and moves) before its new identity is
        // allocated: it keeps its old identity at its new address.
        let published = merged.workloads.clone();
        {
            let mut view = sourced.lock().unwrap();
            let a = view.workloads.get_mut("default/a").unwrap();
            let mut w = (*a.record).clone();
            w.labels.insert("tier".into(), "gold".into());
            w.ips = vec!["10.0.0.9".into()];
            *a = SourcedWorkload::new(w);
        }
        let (merged, unresolved) = merge_sourced(Some(&sourced), stored, &published);
        let held: Vec<_> = merged
            .workloads
            .iter()
            .map(|w| (w.name.as_str(), w.identity, w.labels.len(), w.ips.clone()))
            .collect();
        assert_eq!(held, vec![("a", 257, 0, vec!["10.0.0.9".to_string()])]);
        assert_eq!(
            unresolved.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(),
            vec!["a", "b"],
            "still waiting for its identity"
        );
    }
}
