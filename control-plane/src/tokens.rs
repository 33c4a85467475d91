//! Join tokens: random, single-use, expiring. Only their SHA-256 is stored, so
//! a copy of the store does not let anyone attest.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ring::rand::{SecureRandom, SystemRandom};

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
