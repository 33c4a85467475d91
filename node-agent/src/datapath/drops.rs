//! The kernel's per-CPU drop counters (`KEYWAY_DROPS`, indexed by drop
//! reason), read from the pinned map: `keyway_datapath_drops_total` reads
//! them at scrape time, so the hot path pays nothing extra.

use std::path::Path;
use std::sync::Mutex;

use aya::maps::{MapData, PerCpuArray};
use keyway_common::maps;

use super::{DatapathError, open_pinned};
use keyway_identity::lock::Recover;

/// A handle on the pinned drop counters.
pub struct DropCounters {
    map: Mutex<PerCpuArray<MapData, u64>>,
}

impl std::fmt::Debug for DropCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DropCounters").finish_non_exhaustive()
    }
}

impl DropCounters {
    /// Opens the counters a loaded datapath pinned in `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let map = PerCpuArray::try_from(open_pinned(pin_dir, maps::DROPS)?)
            .map_err(|e| DatapathError::map(maps::DROPS, e))?;
        Ok(Self { map: Mutex::new(map) })
    }

    /// Drops so far per reason (summed over CPUs), reasons with none left out.
    pub fn read(&self) -> Result<Vec<(u8, u64)>, DatapathError> {
        let map = self.map.locked();
        let mut out = Vec::new();
        for reason in 1..maps::DROPS_SLOTS {
            let per_cpu = map
                .get(&reason, 0)
                .map_err(|e| DatapathError::map(maps::DROPS, e))?;
            let total: u64 = per_cpu.iter().sum();
            if total > 0 {
                out.push((reason as u8, total));
            }
        }
        Ok(out)
    }
}
