//! Node attestation with a projected service account token.
//!
//! The agent's DaemonSet mounts a projected token with audience `keyway`,
//! bound to the agent's own pod. The control plane asks the API server
//! (TokenReview) whether the token is genuine and for whom, then requires:
//! the audience `keyway`; the configured node-agent namespace and service
//! account; a bound pod that still exists with the same UID; and that the
//! pod is scheduled to the node the agent claims. The node SVID is issued for
//! that node only. A token of a deleted pod is refused even while the API
//! server still caches its review (a 1.20 server caches them for 10 s),
//! because the pod is looked up by name and UID every time.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};

use crate::attest::{Attested, Method, NodeAttestor, Refused};
use crate::error::ApiError;
use crate::metrics::Refusal;

/// The audience agents' projected tokens carry.
pub const AUDIENCE: &str = "keyway";

/// Checks agents' service account tokens with TokenReview.
#[derive(Clone)]
pub struct TokenReviewer {
    client: kube::Client,
    namespace: String,
    service_account: String,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("namespace", &self.namespace)
            .field("service_account", &self.service_account)
            .finish_non_exhaustive()
    }
}

/// The agent pod a token proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
}

impl TokenReviewer {
    /// `agent` is the node agent's service account as `NAMESPACE/NAME`.
    pub fn new(client: kube::Client, agent: &str) -> Result<Self, String> {
        let (namespace, service_account) = agent
            .split_once('/')
            .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains('/'))
            .ok_or_else(|| format!("--agent-service-account: {agent:?} is not NAMESPACE/NAME"))?;
        Ok(Self {
            client,
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// Reviews `token` for an agent claiming to run on `node`.
    pub async fn review(&self, token: &str, node: &str) -> Result<AttestedPod, ApiError> {
        if token.is_empty() {
            return Err(ApiError::InvalidArgument(
                "the service account token is empty".into(),
            ));
        }
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..Default::default()
        };
        let reviewed = reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ApiError::Unavailable(format!("TokenReview failed, try again: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "not authenticated".into());
            return Err(ApiError::PermissionDenied(format!(
                "the Kubernetes API refused the service account token ({why}); mount a projected token \
                 with audience {AUDIENCE:?} bound to the agent's pod"
            )));
        }
        // The server says which of the requested audiences the token is for;
        // a review that does not say is not proof that it is for ours.
        if !status.audiences.iter().flatten().any(|a| a == AUDIENCE) {
            return Err(ApiError::PermissionDenied(format!(
                "the service account token is not for audience {AUDIENCE:?} (the TokenReview names {:?})",
                status.audiences.unwrap_or_default()
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let expected = format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        );
        if username != expected {
            return Err(ApiError::PermissionDenied(format!(
                "the token belongs to {username:?}, not to the node agent's service account {}/{}",
                self.namespace, self.service_account
            )));
        }
        let extra = user.extra.unwrap_or_default();
        let one = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        let (Some(pod_name), Some(pod_uid)) = (
            one("authentication.kubernetes.io/pod-name"),
            one("authentication.kubernetes.io/pod-uid"),
        ) else {
            return Err(ApiError::PermissionDenied(
                "the service account token is not bound to a pod: use a projected serviceAccountToken volume"
                    .into(),
            ));
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let pod = match pods.get_opt(&pod_name).await {
            Ok(Some(pod)) => pod,
            Ok(None) => {
                return Err(ApiError::PermissionDenied(format!(
                    "the pod the token is bound to ({}/{pod_name}) no longer exists",
                    self.namespace
                )));
            }
            Err(e) => {
                return Err(ApiError::Unavailable(format!(
                    "cannot read the agent's pod, try again: {e}"
                )));
            }
        };
        if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
            return Err(ApiError::PermissionDenied(format!(
                "the pod the token is bound to ({}/{pod_name}) no longer exists (a new pod has its name)",
                self.namespace
            )));
        }
        let pod_node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        if pod_node != node {
            return Err(ApiError::PermissionDenied(format!(
                "the agent claims node {node:?} but its pod {}/{pod_name} is scheduled to {pod_node:?}",
                self.namespace
            )));
        }
        Ok(AttestedPod {
            namespace: self.namespace.clone(),
            name: pod_name,
            uid: pod_uid,
            node: pod_node,
        })
    }
}

#[async_trait::async_trait]
impl NodeAttestor for TokenReviewer {
    fn method(&self) -> Method {
        Method::Kubernetes
    }

    fn proof_before_csr(&self) -> bool {
        false
    }

    async fn verify(&self, token: &str, node: &str) -> Result<Attested, Refused> {
        match self.review(token, node).await {
            Ok(pod) => Ok(Attested {
                consumes: None,
                pod: Some(format!("{}/{}", pod.namespace, pod.name)),
            }),
            Err(e @ ApiError::Unavailable(_)) => Err(Refused::new(Refusal::TokenreviewUnavailable, e)),
            Err(e @ (ApiError::InvalidArgument(_) | ApiError::PermissionDenied(_))) => {
                Err(Refused::new(Refusal::TokenreviewRefused, e))
            }
            Err(e) => Err(Refused::failed(e)),
        }
    }
}
