//! Node records and join tokens in the Kubernetes store: one ConfigMap
//! each, so `keyway-state` holds only counters and nothing grows with the
//! number of nodes or tokens.
//!
//! | Object                               | Key          | Holds               |
//! |--------------------------------------|--------------|---------------------|
//! | ConfigMaps `keyway-node-<node>`      | `node.json`  | one [`NodeRecord`]  |
//! | ConfigMaps `keyway-join-token-<hex>` | `token.json` | one [`JoinTokenRecord`] |
//!
//! A node whose name does not fit a ConfigMap name after the prefix (over
//! 241 characters, or not a DNS subdomain) is stored under `keyway-nodeh-`
//! and 40 hex digits of the SHA-256 of its name. No plain name can take that
//! form (plain names all start `keyway-node-`), so two nodes never share an
//! object; the record inside names the node, an object whose record names
//! another node is skipped, and every write checks the record it read is
//! the caller's. A join token's object is named after the hex SHA-256 the caller
//! passes; the token itself is never stored.
//!
//! Node objects are read through a watch ([`super::kube_index`]), so the
//! registry costs no API call; join tokens are read when presented.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;

use super::kube_index::Index;
use super::{StoreError, StoreResult};
use crate::model::{JoinTokenRecord, NodeRecord};

pub(super) const NODE_PREFIX: &str = "keyway-node-";
/// For names that do not fit; never a prefix of a plain name.
const HASHED_NODE_PREFIX: &str = "keyway-nodeh-";
pub(super) const NODE_COMPONENT: &str = "node";
const NODE_KEY: &str = "node.json";
pub(super) const TOKEN_PREFIX: &str = "keyway-join-token-";
pub(super) const TOKEN_COMPONENT: &str = "join-token";
const TOKEN_KEY: &str = "token.json";
/// Kubernetes object names are DNS subdomains of at most 253 characters.
const NAME_LIMIT: usize = 253;

fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_LIMIT
        && name.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

/// The object that holds `node`'s record.
pub(super) fn node_object_name(node: &str) -> String {
    let plain = format!("{NODE_PREFIX}{node}");
    if is_dns_subdomain(&plain) {
        return plain;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, node.as_bytes());
    let hex: String = digest.as_ref()[..20].iter().map(|b| format!("{b:02x}")).collect();
    format!("{HASHED_NODE_PREFIX}{hex}")
}

/// The object that holds the join token whose SHA-256 is `hash_hex`.
pub(super) fn token_object_name(hash_hex: &str) -> String {
    format!("{TOKEN_PREFIX}{hash_hex}")
}

fn with_record<T: serde::Serialize>(
    mut cm: ConfigMap,
    key: &str,
    record: &T,
    writer: &str,
    what: &str,
) -> StoreResult<ConfigMap> {
    let json = serde_json::to_string(record)
        .map_err(|e| StoreError::backend_from(format!("cannot encode {what}: {e}"), e))?;
    cm.data = Some(BTreeMap::from([(key.to_owned(), json)]));
    cm.metadata
        .annotations
        .get_or_insert_default()
        .insert(super::kube_api::LAST_WRITER.to_owned(), writer.to_owned());
    Ok(cm)
}

/// `cm` (a node object as read, or a new one when `None`) holding `rec`.
pub(super) fn node_configmap(
    cm: Option<ConfigMap>,
    rec: &NodeRecord,
    writer: &str,
) -> StoreResult<ConfigMap> {
    let cm = cm.unwrap_or_else(|| ConfigMap {
        metadata: super::kube_api::object_meta(&node_object_name(&rec.name), NODE_COMPONENT),
        ..Default::default()
    });
    with_record(
        cm,
        NODE_KEY,
        rec,
        writer,
        &format!("the record of node {}", rec.name),
    )
}

/// `cm` (a token object as read, or a new one when `None`) holding `rec`.
pub(super) fn token_configmap(
    cm: Option<ConfigMap>,
    hash_hex: &str,
    rec: &JoinTokenRecord,
    writer: &str,
) -> StoreResult<ConfigMap> {
    let cm = cm.unwrap_or_else(|| ConfigMap {
        metadata: super::kube_api::object_meta(&token_object_name(hash_hex), TOKEN_COMPONENT),
        ..Default::default()
    });
    with_record(cm, TOKEN_KEY, rec, writer, "a join token")
}

fn corrupt(cm: &ConfigMap, key: &str, reason: String) -> StoreError {
    StoreError::Corrupt {
        what: format!(
            "ConfigMap {} key {key}",
            cm.metadata.name.as_deref().unwrap_or("?")
        ),
        reason,
    }
}

/// The record of `node` an object holds (checked against the caller).
pub(super) fn node_record_of(cm: &ConfigMap, node: &str) -> StoreResult<NodeRecord> {
    let rec = node_record(cm)?;
    if rec.name != node {
        return Err(corrupt(
            cm,
            NODE_KEY,
            format!("it holds node {:?}, not {node:?}", rec.name),
        ));
    }
    Ok(rec)
}

/// The node record an object holds, checked against the object's name.
pub(super) fn node_record(cm: &ConfigMap) -> StoreResult<NodeRecord> {
    let rec: NodeRecord = read_record(cm, NODE_KEY)?;
    if cm.metadata.name.as_deref() != Some(node_object_name(&rec.name).as_str()) {
        return Err(corrupt(
            cm,
            NODE_KEY,
            format!("it holds node {:?}, whose object has another name", rec.name),
        ));
    }
    Ok(rec)
}

/// The join token an object holds.
pub(super) fn token_record(cm: &ConfigMap) -> StoreResult<JoinTokenRecord> {
    read_record(cm, TOKEN_KEY)
}

/// The JSON record under `key` of an object; a missing key or a record that
/// does not parse is corrupt (named with the object and the key).
fn read_record<T: serde::de::DeserializeOwned>(cm: &ConfigMap, key: &str) -> StoreResult<T> {
    let raw = cm
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .ok_or_else(|| corrupt(cm, key, "the key is missing".into()))?;
    serde_json::from_str(raw).map_err(|e| corrupt(cm, key, e.to_string()))
}

/// The attested nodes this process knows of, from the watch and its own
/// writes.
#[derive(Debug, Default)]
pub(super) struct NodeIndex {
    by_name: BTreeMap<String, NodeRecord>,
    /// Grows with every change, so the registry's revision does.
    revision: u64,
    /// The registrations seen to go (revocations), newest last, at most
    /// [`REVOKED_REMEMBERED`]: a record is never created again under one.
    revoked: std::collections::VecDeque<(String, u32)>,
}

/// Revoked registrations a process remembers. A caller can hold a
/// registration only until its view catches up with the revocation
/// (moments), and a restarted process builds its view from the objects.
const REVOKED_REMEMBERED: usize = 4096;

impl NodeIndex {
    pub(super) fn get(&self, node: &str) -> Option<&NodeRecord> {
        self.by_name.get(node)
    }

    pub(super) fn all(&self) -> Vec<NodeRecord> {
        self.by_name.values().cloned().collect()
    }

    pub(super) fn revision(&self) -> u64 {
        self.revision
    }

    pub(super) fn remove(&mut self, node: &str) -> bool {
        let Some(gone) = self.by_name.remove(node) else {
            return false;
        };
        self.revision += 1;
        if self.revoked.len() == REVOKED_REMEMBERED {
            self.revoked.pop_front();
        }
        self.revoked.push_back((gone.name, gone.registration));
        true
    }

    /// Whether `registration` of `node` was seen to go.
    pub(super) fn was_revoked(&self, node: &str, registration: u32) -> bool {
        self.revoked.iter().any(|(n, r)| n == node && *r == registration)
    }
}

impl Index for NodeIndex {
    type Record = NodeRecord;
    const WHAT: &'static str = "node objects";
    const COMPONENT: &'static str = NODE_COMPONENT;

    fn parse(cm: &ConfigMap) -> Option<NodeRecord> {
        node_record(cm)
            .inspect_err(|e| tracing::warn!(error = %e, "node object cannot be read; skipped"))
            .ok()
    }

    fn upsert(&mut self, rec: NodeRecord) -> bool {
        if self.by_name.get(&rec.name) == Some(&rec) {
            return false;
        }
        self.by_name.insert(rec.name.clone(), rec);
        self.revision += 1;
        true
    }

    fn remove_object(&mut self, name: &str) -> bool {
        // A plain object name is the node's own name behind the prefix; only
        // a hashed one is searched for.
        let node = match name.strip_prefix(NODE_PREFIX) {
            Some(plain) if self.by_name.contains_key(plain) && node_object_name(plain) == name => {
                Some(plain.to_owned())
            }
            _ if name.starts_with(HASHED_NODE_PREFIX) => {
                self.by_name.keys().find(|n| node_object_name(n) == name).cloned()
            }
            _ => None,
        };
        node.is_some_and(|n| self.remove(&n))
    }

    fn replace_all(&mut self, records: Vec<NodeRecord>) -> bool {
        let new: BTreeMap<String, NodeRecord> = records.into_iter().map(|r| (r.name.clone(), r)).collect();
        if new == self.by_name {
            return false;
        }
        let gone: Vec<String> = self
            .by_name
            .keys()
            .filter(|n| !new.contains_key(*n))
            .cloned()
            .collect();
        for n in gone {
            self.remove(&n);
        }
        self.by_name = new;
        self.revision += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            node_id: 1,
            attested_at: 0,
            registration: 7,
            addresses: vec![],
        }
    }

    #[test]
    fn node_objects_are_named_after_the_node_or_a_hash_when_it_does_not_fit() {
        assert_eq!(
            node_object_name("worker-1.example"),
            "keyway-node-worker-1.example"
        );
        let long = "a".repeat(250);
        for odd in ["Worker_1", long.as_str(), ""] {
            let name = node_object_name(odd);
            assert!(name.starts_with("keyway-nodeh-") && name.len() == 53, "{name}");
            assert!(is_dns_subdomain(&name));
            // A node named after the hash part cannot take the object.
            let squatter = name.trim_start_matches("keyway-nodeh-");
            assert_ne!(node_object_name(squatter), name);
            assert_ne!(node_object_name(&format!("h-{squatter}")), name);
        }
        assert_ne!(node_object_name("Worker_1"), node_object_name("Worker_2"));
    }

    #[test]
    fn a_node_object_must_hold_the_node_it_is_named_after() {
        let cm = node_configmap(None, &node("a"), "r").unwrap();
        assert_eq!(node_record(&cm).unwrap(), node("a"));
        let mut moved = cm.clone();
        moved.metadata.name = Some(node_object_name("b"));
        assert!(matches!(node_record(&moved), Err(StoreError::Corrupt { .. })));
        assert_eq!(
            <NodeIndex as Index>::parse(&moved),
            None,
            "skipped, not guessed at"
        );
        let mut empty = cm;
        empty.data = None;
        assert!(node_record(&empty).is_err());
    }

    #[test]
    fn a_deleted_object_removes_the_node_it_is_named_after() {
        let mut idx = NodeIndex::default();
        for n in ["a", "Worker_1", "b"] {
            idx.upsert(node(n));
        }
        assert!(!idx.remove_object("keyway-node-c"), "no such node");
        assert!(
            !idx.remove_object(&node_object_name("Worker_2")),
            "no such hashed node"
        );
        assert!(!idx.remove_object("keyway-state"), "not a node object");
        assert!(idx.remove_object(&node_object_name("Worker_1")));
        assert!(idx.remove_object("keyway-node-a"));
        assert_eq!(idx.by_name.keys().collect::<Vec<_>>(), vec!["b"]);
    }

    #[test]
    fn the_index_revision_grows_with_every_change_and_only_then() {
        let mut idx = NodeIndex::default();
        assert!(idx.upsert(node("a")));
        assert!(!idx.upsert(node("a")), "the same record again changes nothing");
        let mut moved = node("a");
        moved.addresses = vec!["10.0.0.1:4250".into()];
        assert!(idx.upsert(moved.clone()));
        assert_eq!(idx.revision(), 2);
        assert!(!idx.replace_all(vec![moved]));
        assert!(idx.remove_object(&node_object_name("a")));
        assert!(!idx.remove_object(&node_object_name("a")));
        assert_eq!((idx.revision(), idx.all().len()), (3, 0));
        assert!(idx.was_revoked("a", 7) && !idx.was_revoked("a", 8));
        // A relist that no longer has a node counts as its revocation.
        idx.upsert(node("b"));
        assert!(idx.replace_all(vec![]));
        assert!(idx.was_revoked("b", 7));
    }
}
