//! Join tokens: random, single-use, expiring. Only their SHA-256 is stored, so
//! a copy of the store does not let anyone attest.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ring::rand::{SecureRandom, SystemRandom};

use crate::attest::{Attested, Method, NodeAttestor, Refused};
use crate::clock::now_unix;
use crate::error::ApiError;
use crate::metrics::Refusal;
use crate::store::{Store, StoreError, TokenProblem, token_problem};

/// The longest token worth hashing: ours are 47 bytes; anything much longer
/// is refused as unknown without reading the store.
pub const MAX_TOKEN_BYTES: usize = 128;

/// A new token: 32 random bytes, URL-safe.
pub fn generate() -> Result<String, ring::error::Unspecified> {
    let mut bytes = [0u8; 32];
    SystemRandom::new().fill(&mut bytes)?;
    Ok(format!("kw1.{}", B64URL.encode(bytes)))
}

/// A random 32-bit value (node registration tags).
pub fn random_u32() -> Result<u32, ring::error::Unspecified> {
    let mut bytes = [0u8; 4];
    SystemRandom::new().fill(&mut bytes)?;
    // Never 0: that is "no tag" in records written before tags existed.
    Ok(u32::from_be_bytes(bytes).max(1))
}

/// What the store keeps instead of the token.
pub fn hash(token: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .to_vec()
}

/// Join-token attestation: a token is good for the node it was made for,
/// once, until it expires. The core consumes it with the node's registration.
#[derive(Debug)]
pub struct JoinTokens {
    store: Arc<dyn Store>,
}

impl JoinTokens {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }
}

#[async_trait::async_trait]
impl NodeAttestor for JoinTokens {
    fn method(&self) -> Method {
        Method::JoinToken
    }

    fn proof_before_csr(&self) -> bool {
        true
    }

    async fn verify(&self, token: &str, node: &str) -> Result<Attested, Refused> {
        if token.is_empty() {
            return Err(Refused::new(
                Refusal::BadRequest,
                ApiError::InvalidArgument("join token is empty".into()),
            ));
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Refused::new(
                Refusal::TokenRefused,
                StoreError::TokenRefused(TokenProblem::Unknown).into(),
            ));
        }
        let key = hash(token);
        let stored = self
            .store
            .join_token(&key)
            .await
            .map_err(|e| Refused::failed(e.into()))?;
        if let Some(problem) = token_problem(stored.as_ref(), node, now_unix()) {
            return Err(Refused::new(
                Refusal::TokenRefused,
                StoreError::TokenRefused(problem).into(),
            ));
        }
        Ok(Attested {
            consumes: Some(key),
            pod: None,
        })
    }
}
