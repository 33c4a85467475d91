//! The auth map: which identity pairs are mutually authenticated, and until
//! when (kernel monotonic time). One trait, two implementations: the pinned
//! BPF map the kernel reads, and an in-memory map for tests and for agents
//! running without a datapath.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use aya::maps::{Map, MapData};
use keyway_common::{AuthKey, AuthValue, maps};

use super::{ConfigSlot, DatapathError};
use keyway_identity::lock::Recover;

/// Capability: record, forget and list authenticated pairs.
pub trait AuthMap: Send + Sync + std::fmt::Debug {
    /// Marks the pair authenticated until `expiry_ns` (see [`super::monotonic_ns`]).
    fn upsert(&self, key: AuthKey, expiry_ns: u64) -> Result<(), DatapathError>;
    /// Forgets the pair; true if it was there.
    fn remove(&self, key: &AuthKey) -> Result<bool, DatapathError>;
    fn get(&self, key: &AuthKey) -> Result<Option<u64>, DatapathError>;
    fn entries(&self) -> Result<Vec<(AuthKey, u64)>, DatapathError>;
}

/// The kernel's auth map, opened from its pin. Removing an entry or
/// shortening its expiry bumps the datapath epoch, so flows that were let
/// through on the old entry are judged again on their next packet.
pub struct PinnedAuthMap {
    map: Mutex<aya::maps::HashMap<MapData, AuthKey, AuthValue>>,
    config: Arc<ConfigSlot>,
}

impl std::fmt::Debug for PinnedAuthMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedAuthMap").finish_non_exhaustive()
    }
}

impl PinnedAuthMap {
    /// Opens the auth map pinned in `pin_dir` (by a running or earlier agent).
    pub fn open(pin_dir: &Path) -> Result<PinnedAuthMap, DatapathError> {
        let config = Arc::new(ConfigSlot::open(pin_dir)?);
        Self::open_with(pin_dir, config)
    }

    pub(super) fn open_with(pin_dir: &Path, config: Arc<ConfigSlot>) -> Result<PinnedAuthMap, DatapathError> {
        let path = pin_dir.join(maps::AUTH);
        let data = MapData::from_pin(&path).map_err(|e| DatapathError::map(maps::AUTH, e))?;
        let map = Map::from_map_data(data).map_err(|e| DatapathError::map(maps::AUTH, e))?;
        let map = aya::maps::HashMap::try_from(map).map_err(|e| DatapathError::map(maps::AUTH, e))?;
        Ok(PinnedAuthMap {
            map: Mutex::new(map),
            config,
        })
    }
}

impl AuthMap for PinnedAuthMap {
    /// Written one kernel clock tick early ([`super::sys::kernel_clock_lag_ns`]):
    /// the datapath's clock may run that far behind, and an entry must not
    /// be honoured past its expiry (a stalled tick, under heavy VM steal,
    /// can still hold that clock back a few ticks).
    fn upsert(&self, key: AuthKey, expiry_ns: u64) -> Result<(), DatapathError> {
        let expiry_ns = expiry_ns.saturating_sub(super::sys::kernel_clock_lag_ns());
        let mut map = self.map.locked();
        let shortened = match map.get(&key, 0) {
            Ok(old) => old.expiry_ns > expiry_ns,
            Err(_) => false,
        };
        map.insert(key, AuthValue { expiry_ns }, 0)
            .map_err(|e| DatapathError::map(maps::AUTH, e))?;
        drop(map);
        if shortened {
            self.config.bump_epoch()?;
        }
        Ok(())
    }

    fn remove(&self, key: &AuthKey) -> Result<bool, DatapathError> {
        let mut map = self.map.locked();
        let removed = match map.remove(key) {
            Ok(()) => true,
            Err(aya::maps::MapError::KeyNotFound | aya::maps::MapError::ElementNotFound) => false,
            Err(e) => return Err(DatapathError::map(maps::AUTH, e)),
        };
        drop(map);
        if removed {
            self.config.bump_epoch()?;
        }
        Ok(removed)
    }

    fn get(&self, key: &AuthKey) -> Result<Option<u64>, DatapathError> {
        let map = self.map.locked();
        match map.get(key, 0) {
            Ok(v) => Ok(Some(v.expiry_ns)),
            Err(aya::maps::MapError::KeyNotFound | aya::maps::MapError::ElementNotFound) => Ok(None),
            Err(e) => Err(DatapathError::map(maps::AUTH, e)),
        }
    }

    fn entries(&self) -> Result<Vec<(AuthKey, u64)>, DatapathError> {
        let map = self.map.locked();
        let mut out = Vec::new();
        for item in map.iter() {
            let (k, v) = item.map_err(|e| DatapathError::map(maps::AUTH, e))?;
            out.push((k, v.expiry_ns));
        }
        Ok(out)
    }
}

/// An auth map in memory: for tests of the code that drives it, and for an
/// agent running without the datapath (nothing enforces it then).
#[derive(Debug, Default)]
pub struct MemoryAuthMap {
    entries: Mutex<HashMap<AuthKey, u64>>,
}

impl AuthMap for MemoryAuthMap {
    fn upsert(&self, key: AuthKey, expiry_ns: u64) -> Result<(), DatapathError> {
        self.entries.locked().insert(key, expiry_ns);
        Ok(())
    }

    fn remove(&self, key: &AuthKey) -> Result<bool, DatapathError> {
        Ok(self.entries.locked().remove(key).is_some())
    }

    fn get(&self, key: &AuthKey) -> Result<Option<u64>, DatapathError> {
        Ok(self.entries.locked().get(key).copied())
    }

    fn entries(&self) -> Result<Vec<(AuthKey, u64)>, DatapathError> {
        Ok(self.entries.locked().iter().map(|(k, v)| (*k, *v)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(remote: u32) -> AuthKey {
        AuthKey {
            local_id: 300,
            remote_id: remote,
            remote_node_id: 2,
            auth_type: keyway_common::auth_type::MTLS_SPIFFE,
            _pad: 0,
        }
    }

    #[test]
    fn memory_map_records_and_forgets_pairs() {
        let m = MemoryAuthMap::default();
        m.upsert(key(301), 10).unwrap();
        m.upsert(key(302), 20).unwrap();
        m.upsert(key(301), 15).unwrap();
        assert_eq!(m.get(&key(301)).unwrap(), Some(15));
        assert!(m.remove(&key(302)).unwrap());
        assert!(!m.remove(&key(302)).unwrap());
        assert_eq!(m.entries().unwrap(), vec![(key(301), 15)]);
    }
}
