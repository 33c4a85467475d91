//! In-memory indexes of the Kubernetes store's one-object-per-record kinds
//! (numeric identities, node records), filled by one list at start-up and
//! then by a label-selected watch, so reads cost no API call and every
//! replica sees the others' writes as they are made.

use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use keyway_identity::lock::Recover;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

/// A kind of record kept one ConfigMap each, and the index of it.
pub(super) trait Index: Default + Send + 'static {
    type Record: Send + 'static;
    /// What the records are, for logs ("identity objects").
    const WHAT: &'static str;
    /// The value of the `keyway.dev/component` label of its objects.
    const COMPONENT: &'static str;

    /// The record an object holds; `None` for one that cannot be read
    /// (logged: skipped, never guessed at).
    fn parse(cm: &ConfigMap) -> Option<Self::Record>;
    /// Whether inserting `rec` changed the index.
    fn upsert(&mut self, rec: Self::Record) -> bool;
    /// Whether removing the record of the object `name` changed the index.
    fn remove_object(&mut self, name: &str) -> bool;
    /// Replaces everything (a relist); whether that changed the index.
    fn replace_all(&mut self, records: Vec<Self::Record>) -> bool;
}

pub(super) type Shared<I> = Arc<Mutex<I>>;

/// The index, whatever a panicking holder left (every change to an index
/// is a single insert or remove, so it is never half-made).
pub(super) fn lock<I>(index: &Shared<I>) -> MutexGuard<'_, I> {
    index.locked()
}

pub(super) fn selector<I: Index>() -> String {
    format!("{}={}", super::kube_api::COMPONENT, I::COMPONENT)
}

/// Every object of the kind, read page by page, into a new index.
pub(super) async fn load<I: Index>(api: &Api<ConfigMap>) -> Result<Shared<I>, kube::Error> {
    let mut params = ListParams::default().labels(&selector::<I>()).limit(500);
    let mut records = Vec::new();
    loop {
        let page = api.list(&params).await?;
        records.extend(page.items.iter().filter_map(I::parse));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    let mut index = I::default();
    index.replace_all(records);
    Ok(Arc::new(Mutex::new(index)))
}

/// Follows the objects into `index` until aborted, bumping `changes` on
/// every change to the index. This process's own writes are put in the
/// index when they succeed, so their watch events change nothing and only
/// other replicas' writes signal.
pub(super) async fn follow<I: Index>(api: Api<ConfigMap>, index: Shared<I>, changes: watch::Sender<u64>) {
    let stream = watcher(api, watcher::Config::default().labels(&selector::<I>())).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut relist: Option<Vec<I::Record>> = None;
    let mut failing = false;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "watch on {} failed; retrying with backoff", I::WHAT);
                    failing = true;
                }
                continue;
            }
        };
        failing = false;
        let changed = match event {
            watcher::Event::Init => {
                relist = Some(Vec::new());
                false
            }
            watcher::Event::InitApply(cm) => {
                if let (Some(list), Some(rec)) = (relist.as_mut(), I::parse(&cm)) {
                    list.push(rec);
                }
                false
            }
            watcher::Event::InitDone => lock(&index).replace_all(relist.take().unwrap_or_default()),
            watcher::Event::Apply(cm) => I::parse(&cm).is_some_and(|rec| lock(&index).upsert(rec)),
            watcher::Event::Delete(cm) => cm
                .metadata
                .name
                .as_deref()
                .is_some_and(|name| lock(&index).remove_object(name)),
        };
        if changed {
            changes.send_modify(|n| *n += 1);
        }
    }
}
