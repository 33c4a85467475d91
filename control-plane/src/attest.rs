//! Node attestation: how an agent proves which node it runs on before it gets
//! its node SVID.
//!
//! The core ([`crate::core::ControlPlane::attest`]) owns the steps every
//! method shares: the node name, the CSR, signing under the registry lock, and
//! the node's registration. A [`NodeAttestor`] only says whether a proof holds
//! for a node. There are two: join tokens ([`crate::tokens::JoinTokens`]) and
//! Kubernetes service account tokens
//! ([`crate::kubernetes::attest::TokenReviewer`]). This module is a leaf: the
//! core and both attestors use it, and it uses neither.

use crate::error::ApiError;
use crate::metrics::Refusal;

/// How a node proves who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    JoinToken,
    Kubernetes,
}

impl Method {
    /// As the log says it: "node attested with a {}".
    pub fn describe(self) -> &'static str {
        match self {
            Method::JoinToken => "join token",
            Method::Kubernetes => "Kubernetes service account token",
        }
    }

    /// Why this control plane takes no proof of this method: the counted
    /// reason and what to do instead.
    pub fn off(self) -> (Refusal, &'static str) {
        match self {
            Method::JoinToken => (
                Refusal::JoinTokensOff,
                "join-token attestation is off in Kubernetes mode: agents attest with their projected \
                 service account token (--k8s-token-file); start the control plane with \
                 --allow-join-tokens to accept join tokens too",
            ),
            Method::Kubernetes => (
                Refusal::NotKubernetes,
                "this control plane does not run in Kubernetes mode (--kubernetes); attest with a join token",
            ),
        }
    }
}

/// What a proof that holds showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attested {
    /// A single-use proof's stored key (a join token's hash). The core
    /// consumes it in the same store write that registers the node, so of
    /// two attempts with one proof exactly one wins.
    pub consumes: Option<Vec<u8>>,
    /// The agent's pod the proof is bound to, where the method binds one
    /// (logged as `pod=NAMESPACE/NAME`).
    pub pod: Option<String>,
}

/// A proof that does not hold (counted under its reason), or one that could
/// not be checked (no reason: a failure, not a refusal). `error` is what the
/// caller is told.
#[derive(Debug)]
pub struct Refused {
    pub reason: Option<Refusal>,
    pub error: ApiError,
}

impl Refused {
    pub fn new(reason: Refusal, error: ApiError) -> Self {
        Self {
            reason: Some(reason),
            error,
        }
    }

    /// The proof could not be checked (the store could not be read).
    pub fn failed(error: ApiError) -> Self {
        Self { reason: None, error }
    }
}

/// Checks one method's proofs.
#[async_trait::async_trait]
pub trait NodeAttestor: Send + Sync + std::fmt::Debug + 'static {
    fn method(&self) -> Method;

    /// Whether the proof is checked before the CSR. True when checking it
    /// is cheaper than a signature check (a join token: a hash and one store
    /// read), so a flood of bad proofs costs no signature checks. False when
    /// it costs a call to another service (TokenReview), so a malformed
    /// request costs none.
    fn proof_before_csr(&self) -> bool;

    /// Checks `proof` from an agent claiming to run on `node` (a valid node
    /// name already).
    async fn verify(&self, proof: &str, node: &str) -> Result<Attested, Refused>;
}
