//! The control plane's data: the records it stores and reads (workloads,
//! identities, nodes, join tokens, the CA, the issuance log) and the
//! validated policy they carry ([`policy`]), made from the raw shape in
//! [`crate::crd`]. Near the leaves: the store, the policy compiler, the
//! registry and the core all use it, and it uses none of them.

pub mod policy;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Bytes that must never reach a log or `Debug` output (private keys).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(#[serde(with = "b64")] pub Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

mod b64_vec {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};

    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for item in v {
            seq.serialize_element(&STANDARD.encode(item))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        Vec::<String>::deserialize(d)?
            .into_iter()
            .map(|s| STANDARD.decode(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// Where a signing authority is in its life (DESIGN.md section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaPhase {
    /// In the bundle, not signing yet.
    Prepared,
    /// Signs everything new.
    Active,
    /// Replaced; stays in the bundle until nothing it signed can be valid.
    Old,
}

impl CaPhase {
    /// As `ca status` prints it and the CA expiry metric labels it.
    pub fn as_str(self) -> &'static str {
        match self {
            CaPhase::Prepared => "prepared",
            CaPhase::Active => "active",
            CaPhase::Old => "old",
        }
    }
}

/// One X.509 signing authority and the JWT key that rotates with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaRecord {
    pub id: String,
    pub phase: CaPhase,
    #[serde(with = "b64")]
    pub cert_der: Vec<u8>,
    pub key_pkcs8: Secret,
    pub not_before: i64,
    pub not_after: i64,
    /// When it stopped signing (phase `Old`).
    pub superseded_at: Option<i64>,
    pub jwt_kid: String,
    pub jwt_key_pkcs8: Secret,
}

/// All CA material, stored as one record so a rotation step is one atomic write.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CaState {
    pub authorities: Vec<CaRecord>,
    /// `spiffe_sequence` of the bundle; grows on every change of its contents.
    pub bundle_sequence: u64,
    /// With an upstream CA: the certificates above Keyway's intermediate, the
    /// last one being the root published in the bundle.
    #[serde(with = "b64_vec", default)]
    pub upstream_chain: Vec<Vec<u8>>,
}

impl CaState {
    /// The authority that signs (phase `Active`), if there is one.
    pub fn active(&self) -> Option<&CaRecord> {
        self.authorities.iter().find(|a| a.phase == CaPhase::Active)
    }
}

/// A join token as stored: only its SHA-256, never the token itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    pub node: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub consumed_at: Option<i64>,
}

/// A standalone `Workload` document after validation, with its identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadRecord {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub selectors: Vec<String>,
    pub svid_ttl_secs: Option<u64>,
    /// Filled by the store on apply.
    #[serde(default)]
    pub identity: u32,
    #[serde(default)]
    pub spiffe_id: String,
}

impl WorkloadRecord {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A KeywayNetworkPolicy after validation. Namespace and name identify it;
/// applying one with the same name replaces the old one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub namespace: String,
    pub name: String,
    pub spec: policy::PolicySpec,
}

impl PolicyRecord {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A numeric security identity: one per (namespace, service account,
/// identity-relevant labels), never reused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRecord {
    pub id: u32,
    pub spiffe_id: String,
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
}

/// An attested node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub node_id: u16,
    pub attested_at: i64,
    /// This registration's tag: chosen at random when the node is first
    /// attested (or attested again after a revocation) and carried in the
    /// serial number of every node SVID issued to it, so an SVID of an
    /// earlier, revoked registration never authenticates the node again.
    /// Records written before revocation existed load with 0 (no check).
    #[serde(default)]
    pub registration: u32,
    /// Where its agent takes mutual-authentication handshakes ("IP:PORT"),
    /// as it last advertised them when opening Sync. Records written before
    /// addresses existed load with none.
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// The kinds of document the registry stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DocumentKind {
    Workload,
    KeywayNetworkPolicy,
}

impl DocumentKind {
    /// The name `apply` and `delete` print (kubectl style, lowercase).
    pub fn noun(self) -> &'static str {
        match self {
            DocumentKind::Workload => "workload",
            DocumentKind::KeywayNetworkPolicy => "keywaynetworkpolicy",
        }
    }
}

/// A document named by kind, namespace and name (what `delete -f` reads).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DocumentRef {
    pub kind: DocumentKind,
    pub namespace: String,
    pub name: String,
}

impl DocumentRef {
    /// The store key, the same as [`WorkloadRecord::key`] and [`PolicyRecord::key`].
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One issued certificate (the issuance log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuanceRecord {
    pub serial: String,
    pub spiffe_id: String,
    /// The node that asked, `admin` for the CLI, `control-plane` for itself.
    pub requester: String,
    pub ca_id: String,
    pub issued_at: i64,
    pub not_after: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_records_written_before_addresses_still_load() {
        let old = r#"{"name":"node-a","node_id":3,"attested_at":1700000000}"#;
        let rec: NodeRecord = serde_json::from_str(old).unwrap();
        assert_eq!(rec.node_id, 3);
        assert!(rec.addresses.is_empty());
    }

    #[test]
    fn secrets_do_not_show_in_debug() {
        let s = Secret(b"private".to_vec());
        assert_eq!(format!("{s:?}"), "<redacted>");
    }
}
