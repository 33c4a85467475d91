//! JWT-SVIDs (ES256, JWS compact serialization) and the JWKS entries that
//! validate them (JWT-01..07, BND-09).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::json;

/// An ES256 signing key with its `kid`.
pub struct JwtSigner {
    kid: String,
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigner")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// A fresh PKCS#8 P-256 key and a random key id.
pub fn generate_key() -> Result<(String, Vec<u8>), ring::error::Unspecified> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)?;
    let mut kid = [0u8; 16];
    ring::rand::SecureRandom::fill(&rng, &mut kid)?;
    Ok((B64URL.encode(kid), pkcs8.as_ref().to_vec()))
}

impl JwtSigner {
    pub fn new(kid: String, pkcs8: &[u8]) -> Result<Self, ring::error::KeyRejected> {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &rng)?;
        Ok(Self { kid, key, rng })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Signs a JWT-SVID. Header: only `alg`, `kid`, `typ` (JWT-02..04); claims:
    /// `sub`, `aud` (array, at least one), `exp`, `iat` (JWT-05..07).
    pub fn sign(
        &self,
        spiffe_id: &str,
        audience: &[String],
        issued_at: i64,
        expires_at: i64,
    ) -> Result<String, ring::error::Unspecified> {
        let header = json!({ "alg": "ES256", "kid": self.kid, "typ": "JWT" });
        let claims = json!({
            "sub": spiffe_id,
            "aud": audience,
            "exp": expires_at,
            "iat": issued_at,
        });
        let signing_input = format!(
            "{}.{}",
            B64URL.encode(header.to_string()),
            B64URL.encode(claims.to_string())
        );
        let sig = self.key.sign(&self.rng, signing_input.as_bytes())?;
        Ok(format!("{signing_input}.{}", B64URL.encode(sig.as_ref())))
    }

    /// This key as a bundle JWK (`use: jwt-svid`, with `kid`; BND-09).
    pub fn jwk(&self) -> serde_json::Value {
        let point = self.key.public_key().as_ref();
        // Uncompressed SEC1 point: 0x04 || X (32) || Y (32).
        json!({
            "kty": "EC",
            "crv": "P-256",
            "x": B64URL.encode(&point[1..33]),
            "y": B64URL.encode(&point[33..65]),
            "kid": self.kid,
            "use": "jwt-svid",
        })
    }
}
