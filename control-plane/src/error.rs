//! The error every control-plane operation returns: why a call was refused,
//! as the gRPC code the SPIFFE specs use. Below the core, its servers and
//! the attestors, which all use it; it uses only the errors it converts
//! from (`ca`, `csr`, `store`).

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
    /// Something on our side failed; `source` is the cause where there is
    /// one (the store's, the CA's), kept for the error chain. The caller is
    /// told `message` only.
    #[error("internal error: {message}")]
    Internal {
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl ApiError {
    /// An internal failure that `message` describes in full.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::Internal {
            message: message.into(),
            source: None,
        }
    }

    /// An internal failure caused by `source`, whose message the caller is
    /// told.
    pub fn internal_from(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        ApiError::Internal {
            message: source.to_string(),
            source: Some(Box::new(source)),
        }
    }

    /// The kind of refusal, for log limiter keys and metrics (never the
    /// message, which repeats caller input).
    pub fn code_name(&self) -> &'static str {
        match self {
            ApiError::InvalidArgument(_) => "invalid_argument",
            ApiError::Unauthenticated(_) => "unauthenticated",
            ApiError::PermissionDenied(_) => "permission_denied",
            ApiError::FailedPrecondition(_) => "failed_precondition",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal { .. } => "internal",
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
            ApiError::Internal { message, .. } => Status::internal(message),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::TokenRefused(p) => ApiError::PermissionDenied(format!("join token refused: {p}")),
            other => ApiError::internal_from(other),
        }
    }
}

impl From<ca::CaError> for ApiError {
    fn from(e: ca::CaError) -> Self {
        match e {
            ca::CaError::AlreadyPrepared(_) | ca::CaError::NothingPrepared => {
                ApiError::FailedPrecondition(e.to_string())
            }
            other => ApiError::internal_from(other),
        }
    }
}

impl From<csr::CsrError> for ApiError {
    fn from(e: csr::CsrError) -> Self {
        ApiError::InvalidArgument(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_internal_error_keeps_its_cause_and_tells_the_caller_only_the_message() {
        let io = std::io::Error::other("disk on fire");
        let e: ApiError = StoreError::backend_from("cannot write the issuance log", io).into();
        assert_eq!(
            e.to_string(),
            "internal error: storage error: cannot write the issuance log"
        );
        let store = std::error::Error::source(&e).expect("the store's error");
        assert_eq!(store.source().expect("the I/O error").to_string(), "disk on fire");
        let status = tonic::Status::from(e);
        assert_eq!(status.code(), tonic::Code::Internal);
        assert_eq!(status.message(), "storage error: cannot write the issuance log");
    }
}
