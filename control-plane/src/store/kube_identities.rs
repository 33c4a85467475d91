//! Numeric identities in the Kubernetes store: one ConfigMap per identity,
//! `keyway-identity-<number>` (label `keyway.dev/component: identity`,
//! key `identity.json`: the [`IdentityRecord`]), the way Cilium keeps one
//! `CiliumIdentity` per identity. Pods are never copied anywhere: the
//! control plane reads them from its watch cache and asks here only for the
//! number of each (namespace, service account, identity labels).
//!
//! # Allocation
//!
//! 1. A number comes from a block this process reserved by raising
//!    `next_identity` in `keyway-state` (a conditional write, so two replicas
//!    never reserve the same block). One write reserves
//!    [`IDENTITY_BLOCK`] numbers or as many as a batch needs.
//! 2. The identity object is created under that number. Create fails with
//!    AlreadyExists when the name is taken, so the number can never be given
//!    to a second identity even if the counter were wrong: the next number
//!    is tried.
//!
//! Crash safety across the two objects: the counter is written first. A
//! crash after the reservation and before the create leaves numbers that
//! nothing uses (a gap); it never leaves an object the counter does not
//! cover, so numbers are never handed out twice, and deleted identities'
//! numbers stay below the counter and are never reused.
//!
//! Only the leader allocates. Around a leadership change two replicas can,
//! for a moment, both allocate for the same new identity; both objects are
//! valid, lookups resolve an identity to its *lowest* number, and the other
//! one has no workload and is collected after the grace period.
//!
//! The objects are read through a watch (one per process, label-selected),
//! so a lookup costs no API call and every replica sees new identities as
//! they are created.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, PostParams};

use super::kube_index::{self, Index};
use super::{StoreError, StoreResult, identity_key, identity_labels};
use crate::model::IdentityRecord;

pub(super) const IDENTITY_PREFIX: &str = "keyway-identity-";
pub(super) const IDENTITY_COMPONENT: &str = "identity";
const IDENTITY_DATA_KEY: &str = "identity.json";
/// Numbers reserved per write of `next_identity`.
pub(super) const IDENTITY_BLOCK: u64 = 64;
/// Identity objects created at once.
const CREATES_IN_FLIGHT: usize = 16;

pub(super) fn identity_object_name(id: u32) -> String {
    format!("{IDENTITY_PREFIX}{id}")
}

/// The identities this process knows of, from the watch and its own writes.
#[derive(Debug, Default)]
pub(super) struct IdentityIndex {
    by_id: BTreeMap<u32, IdentityRecord>,
    /// Allocation key -> numbers (normally one; lowest wins).
    by_key: HashMap<String, BTreeSet<u32>>,
    /// Numbers reserved by this process and not used yet.
    reserved: std::ops::Range<u64>,
}

impl IdentityIndex {
    pub(super) fn insert(&mut self, rec: IdentityRecord) {
        let key = identity_key(&rec.namespace, &rec.service_account, &rec.labels);
        if let Some(old) = self.by_id.insert(rec.id, rec.clone()) {
            self.unlink(&old);
        }
        self.by_key.entry(key).or_default().insert(rec.id);
    }

    pub(super) fn remove(&mut self, id: u32) -> bool {
        match self.by_id.remove(&id) {
            Some(old) => {
                self.unlink(&old);
                true
            }
            None => false,
        }
    }

    fn unlink(&mut self, rec: &IdentityRecord) {
        let key = identity_key(&rec.namespace, &rec.service_account, &rec.labels);
        if let Some(ids) = self.by_key.get_mut(&key) {
            ids.remove(&rec.id);
            if ids.is_empty() {
                self.by_key.remove(&key);
            }
        }
    }

    pub(super) fn lookup(&self, key: &str) -> Option<&IdentityRecord> {
        let id = self.by_key.get(key)?.first()?;
        self.by_id.get(id)
    }

    /// Every identity object, by number, duplicates included: an identity
    /// that two replicas allocated at once has two numbers, the lowest is
    /// the one in use ([`IdentityIndex::lookup`], and the registry merge
    /// picks it too), and the other is unused, so the identity collector
    /// deletes it after its grace period.
    pub(super) fn all(&self) -> Vec<IdentityRecord> {
        self.by_id.values().cloned().collect()
    }

    fn take_reserved(&mut self) -> Option<u64> {
        self.reserved.next()
    }
}

impl Index for IdentityIndex {
    type Record = IdentityRecord;
    const WHAT: &'static str = "identity objects";
    const COMPONENT: &'static str = IDENTITY_COMPONENT;

    fn parse(cm: &ConfigMap) -> Option<IdentityRecord> {
        parse(cm)
    }

    fn upsert(&mut self, rec: IdentityRecord) -> bool {
        let new = self.by_id.get(&rec.id) != Some(&rec);
        self.insert(rec);
        new
    }

    fn remove_object(&mut self, name: &str) -> bool {
        let id = name.strip_prefix(IDENTITY_PREFIX).and_then(|n| n.parse().ok());
        id.is_some_and(|id| self.remove(id))
    }

    fn replace_all(&mut self, records: Vec<IdentityRecord>) -> bool {
        let before = std::mem::take(&mut self.by_id);
        self.by_key.clear();
        for r in records {
            self.insert(r);
        }
        before != self.by_id
    }
}

pub(super) type SharedIndex = kube_index::Shared<IdentityIndex>;

pub(super) fn lock(index: &SharedIndex) -> std::sync::MutexGuard<'_, IdentityIndex> {
    kube_index::lock(index)
}

pub(super) fn identity_configmap(rec: &IdentityRecord, writer: &str) -> StoreResult<ConfigMap> {
    let json = serde_json::to_string(rec)
        .map_err(|e| StoreError::backend_from(format!("cannot encode identity {}: {e}", rec.id), e))?;
    let mut meta = super::kube_api::object_meta(&identity_object_name(rec.id), IDENTITY_COMPONENT);
    meta.annotations = Some(BTreeMap::from([(
        super::kube_api::LAST_WRITER.to_owned(),
        writer.to_owned(),
    )]));
    Ok(ConfigMap {
        metadata: meta,
        data: Some(BTreeMap::from([(IDENTITY_DATA_KEY.to_owned(), json)])),
        ..Default::default()
    })
}

/// The identity an object holds; `None` for one that is not an identity
/// object or cannot be read (logged: it is skipped, never guessed at).
fn parse(cm: &ConfigMap) -> Option<IdentityRecord> {
    let name = cm.metadata.name.as_deref()?;
    let id: u32 = name.strip_prefix(IDENTITY_PREFIX)?.parse().ok()?;
    let raw = cm.data.as_ref()?.get(IDENTITY_DATA_KEY)?;
    match serde_json::from_str::<IdentityRecord>(raw) {
        Ok(rec) if rec.id == id => Some(rec),
        Ok(rec) => {
            tracing::warn!(
                configmap = name,
                id = rec.id,
                "identity object holds another number than its name; skipped"
            );
            None
        }
        Err(e) => {
            tracing::warn!(configmap = name, error = %e, "identity object cannot be read; skipped");
            None
        }
    }
}

/// What [`allocate`] needs from the store around it.
pub(super) struct Allocator<'a> {
    pub api: &'a Api<ConfigMap>,
    pub namespace: &'a str,
    pub writer: &'a str,
    pub index: &'a SharedIndex,
}

impl Allocator<'_> {
    /// The identity of each of `wanted`, creating the missing ones (module
    /// docs). `reserve(n)` raises the stored counter by at least `n` and
    /// returns the reserved range.
    pub async fn allocate<F, Fut>(
        &self,
        wanted: &[IdentityRecord],
        reserve: F,
    ) -> StoreResult<Vec<IdentityRecord>>
    where
        F: Fn(u64) -> Fut,
        Fut: std::future::Future<Output = StoreResult<std::ops::Range<u64>>>,
    {
        let keys: Vec<String> = wanted
            .iter()
            .map(|w| identity_key(&w.namespace, &w.service_account, &w.labels))
            .collect();
        let missing: BTreeMap<&str, &IdentityRecord> = {
            let idx = lock(self.index);
            keys.iter()
                .zip(wanted)
                .filter(|(k, _)| idx.lookup(k).is_none())
                .map(|(k, w)| (k.as_str(), w))
                .collect()
        };
        let mut todo: Vec<IdentityRecord> = missing
            .values()
            .map(|w| IdentityRecord {
                id: 0,
                labels: identity_labels(&w.labels),
                ..(*w).clone()
            })
            .collect();
        while !todo.is_empty() {
            // Numbers for the whole batch, reserving more when short.
            let mut numbered = Vec::with_capacity(todo.len());
            for rec in todo.drain(..) {
                let next = lock(self.index).take_reserved();
                let n = match next {
                    Some(n) => n,
                    None => {
                        let want = IDENTITY_BLOCK.max((missing.len() - numbered.len()) as u64);
                        let range = reserve(want).await?;
                        let mut idx = lock(self.index);
                        idx.reserved = range;
                        idx.take_reserved().ok_or_else(|| {
                            StoreError::backend("reserved an empty block of identity numbers")
                        })?
                    }
                };
                let id = u32::try_from(n)
                    .map_err(|_| StoreError::Exhausted("numeric identities exhausted".into()))?;
                numbered.push(IdentityRecord { id, ..rec });
            }
            let results: Vec<(IdentityRecord, Result<(), kube::Error>)> = futures::stream::iter(numbered)
                .map(|rec| async move {
                    let cm = match identity_configmap(&rec, self.writer) {
                        Ok(cm) => cm,
                        Err(e) => return Err(e),
                    };
                    let r = self.api.create(&PostParams::default(), &cm).await.map(|_| ());
                    Ok((rec, r))
                })
                .buffer_unordered(CREATES_IN_FLIGHT)
                .try_collect()
                .await?;
            for (rec, r) in results {
                match r {
                    Ok(()) => lock(self.index).insert(rec),
                    // The number is taken (the counter was behind): try the next.
                    Err(e) if super::kube_api::is_already_exists(&e) => {
                        tracing::warn!(id = rec.id, "identity number already taken; allocating another");
                        todo.push(IdentityRecord { id: 0, ..rec });
                    }
                    Err(e) => {
                        return Err(super::kube_api::api_error(
                            e,
                            "create",
                            "configmaps",
                            &identity_object_name(rec.id),
                            self.namespace,
                        ));
                    }
                }
            }
        }
        let idx = lock(self.index);
        keys.iter()
            .map(|k| {
                idx.lookup(k).cloned().ok_or_else(|| {
                    StoreError::backend("an identity just allocated is missing from the index")
                })
            })
            .collect()
    }

    /// Deletes the identity objects of `ids`; returns how many existed.
    pub async fn forget(&self, ids: &[u32]) -> StoreResult<usize> {
        let mut n = 0;
        for id in ids {
            let name = identity_object_name(*id);
            match self.api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => n += 1,
                Err(e) if super::kube_api::is_not_found(&e) => {}
                Err(e) => {
                    return Err(super::kube_api::api_error(
                        e,
                        "delete",
                        "configmaps",
                        &name,
                        self.namespace,
                    ));
                }
            }
            lock(self.index).remove(*id);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u32, sa: &str) -> IdentityRecord {
        IdentityRecord {
            id,
            spiffe_id: format!("spiffe://example.org/ns/default/sa/{sa}"),
            namespace: "default".into(),
            service_account: sa.into(),
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn duplicates_resolve_to_the_lowest_number_and_removal_falls_back() {
        let mut idx = IdentityIndex::default();
        idx.insert(rec(300, "web"));
        idx.insert(rec(257, "web"));
        idx.insert(rec(256, "api"));
        let key = identity_key("default", "web", &BTreeMap::new());
        assert_eq!(idx.lookup(&key).map(|r| r.id), Some(257));
        assert_eq!(
            idx.all().iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![256, 257, 300],
            "the duplicate is listed, so the collector can see it is unused"
        );
        assert!(idx.remove(257));
        assert_eq!(idx.lookup(&key).map(|r| r.id), Some(300));
        assert!(!idx.remove(257), "already gone");
    }

    #[test]
    fn only_identity_objects_whose_name_matches_their_number_are_read() {
        let good = identity_configmap(&rec(256, "web"), "r").unwrap();
        assert_eq!(parse(&good).map(|r| r.id), Some(256));
        let mut renamed = good.clone();
        renamed.metadata.name = Some(identity_object_name(999));
        assert_eq!(
            parse(&renamed),
            None,
            "a number that disagrees with the name is skipped"
        );
        let mut other = good;
        other.metadata.name = Some("keyway-state".into());
        assert_eq!(parse(&other), None);
    }
}
