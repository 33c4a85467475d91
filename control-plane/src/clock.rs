//! Wall-clock time, read in one place (a leaf: every layer may use it).

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock seconds since the Unix epoch: certificates, token expiry and
/// the stores' records need real time. 0 for a clock set before 1970.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
