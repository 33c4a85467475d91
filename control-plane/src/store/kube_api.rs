//! What every object the Kubernetes store writes has in common (its labels
//! and annotations), and how an API failure reads. A leaf the store and its
//! object kinds (identities, nodes, tokens, their index) share.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::StoreError;

pub(super) const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub(super) const COMPONENT: &str = "keyway.dev/component";
pub(super) const LAST_WRITER: &str = "keyway.dev/last-writer";

pub(super) fn object_meta(name: &str, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        labels: Some(BTreeMap::from([
            (MANAGED_BY.to_owned(), "keyway".to_owned()),
            (COMPONENT.to_owned(), component.to_owned()),
        ])),
        ..Default::default()
    }
}

pub(super) fn status(e: &kube::Error) -> Option<&kube::core::Status> {
    match e {
        kube::Error::Api(s) => Some(s),
        _ => None,
    }
}

pub(super) fn is_conflict(e: &kube::Error) -> bool {
    status(e).is_some_and(|s| s.is_conflict())
}

pub(super) fn is_already_exists(e: &kube::Error) -> bool {
    status(e).is_some_and(|s| s.is_already_exists())
}

pub(super) fn is_not_found(e: &kube::Error) -> bool {
    status(e).is_some_and(|s| s.is_not_found())
}

/// An API failure as a message that says what failed and what to do. The
/// API server's messages name objects and fields, never their contents.
/// `name` is empty for operations on the collection (list).
pub(super) fn api_error(
    e: kube::Error,
    verb: &str,
    resource: &str,
    name: &str,
    namespace: &str,
) -> StoreError {
    let target = if name.is_empty() {
        resource.to_owned()
    } else {
        format!("{resource}/{name}")
    };
    let message = match status(&e) {
        Some(s) if s.is_forbidden() => format!(
            "the control plane's service account cannot {verb} {resource} in namespace {namespace}: \
             check the chart's Role (the Kubernetes store needs get, list, watch, create and update \
             on configmaps and secrets)"
        ),
        Some(s) if s.code == 401 => format!(
            "the Kubernetes API server did not accept the control plane's credentials (to {verb} \
             {target} in namespace {namespace}): check its service account token"
        ),
        Some(s) if s.is_not_found() => {
            format!("cannot {verb} {target} in namespace {namespace}: not found (does the namespace exist?)")
        }
        Some(s) => format!(
            "cannot {verb} {target} in namespace {namespace}: {} {}: {}",
            s.code, s.reason, s.message
        ),
        None => format!(
            "cannot {verb} {target} in namespace {namespace}: the Kubernetes API server did not \
             answer ({e}); if this was a write, it may or may not have been applied"
        ),
    };
    StoreError::backend_from(message, e)
}
