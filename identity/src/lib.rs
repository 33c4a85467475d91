//! What both Keyway binaries need to agree on about SPIFFE identity: the SPIFFE ID
//! rules (with the conformance rule each check enforces), the X509-SVID leaf
//! checks, trust bundles, and rustls verifiers that authenticate peers by SPIFFE
//! ID instead of DNS name.
//!
//! Also the two small rules both binaries follow everywhere: how retries and
//! renewals are spread ([`jitter`]) and what a poisoned lock means
//! ([`lock`]).
//!
//! Kept narrow on purpose: no network, no servers, no storage (the one file
//! writer is the SVID directory both CLIs produce). Listeners, metrics and
//! readiness live in `keyway-serve`.

pub mod bundle;
pub mod csr;
pub mod duration;
pub mod jitter;
pub mod jwt;
pub mod lock;
pub mod pem;
pub mod spiffe_id;
pub mod svid;
pub mod tls;
pub mod x509;

pub use bundle::TrustBundle;
pub use spiffe::{SpiffeId, TrustDomain};
pub use spiffe_id::IdError;
pub use svid::Svid;
