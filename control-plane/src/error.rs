//! The error every control-plane operation returns: why a call was refused,
//! as the gRPC code the SPIFFE specs use. A leaf: the core, its servers and
//! the attestors all use it, and it uses none of them.

use crate::{ca, csr, store::StoreError};

/// Why a call was refused. Each maps to the gRPC code the SPIFFE specs use.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The kind of refusal, for log limiter keys and metrics (never the
    /// message, which repeats caller input).
    pub fn code_name(&self) -> &'static str {
        match self {
            ApiError::InvalidArgument(_) => "invalid_argument",
            ApiError::Unauthenticated(_) => "unauthenticated",
            ApiError::PermissionDenied(_) => "permission_denied",
            ApiError::FailedPrecondition(_) => "failed_precondition",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        use tonic::Status;
        match e {
            ApiError::InvalidArgument(m) => Status::invalid_argument(m),
            ApiError::Unauthenticated(m) => Status::unauthenticated(m),
            ApiError::PermissionDenied(m) => Status::permission_denied(m),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
            ApiError::Unavailable(m) => Status::unavailable(m),
            ApiError::Internal(m) => Status::internal(m),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::TokenRefused(p) => ApiError::PermissionDenied(format!("join token refused: {p}")),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<ca::CaError> for ApiError {
    fn from(e: ca::CaError) -> Self {
        match e {
            ca::CaError::AlreadyPrepared(_) | ca::CaError::NothingPrepared => {
                ApiError::FailedPrecondition(e.to_string())
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<csr::CsrError> for ApiError {
    fn from(e: csr::CsrError) -> Self {
        ApiError::InvalidArgument(e.to_string())
    }
}
