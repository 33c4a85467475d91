//! Per-source rate limits for calls that need no credentials (attestation).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use keyway_identity::lock::Recover;
use keyway_serve::PeerKey;

/// A token bucket per source address (an IPv6 source counts per /64): up
/// to `per_minute` attempts a minute, in bursts of up to a sixth of that
/// (at least 5). Bounded memory: at most [`PerSource::MAX_SOURCES`] buckets;
/// when full, buckets that have refilled are forgotten (they would admit
/// anyway), and if none has, the oldest are.
#[derive(Debug)]
pub struct PerSource {
    per_minute: u32,
    buckets: Mutex<HashMap<PeerKey, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl PerSource {
    pub const MAX_SOURCES: usize = 8192;

    /// `per_minute == 0` turns the limit off.
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn burst(&self) -> f64 {
        f64::from((self.per_minute / 6).max(5))
    }

    /// Whether `source` may make one more attempt now.
    pub fn admit(&self, source: IpAddr) -> bool {
        self.admit_at(source, Instant::now())
    }

    fn admit_at(&self, source: IpAddr, now: Instant) -> bool {
        if self.per_minute == 0 {
            return true;
        }
        let rate = f64::from(self.per_minute) / 60.0;
        let burst = self.burst();
        let mut buckets = self.buckets.locked();
        let refill = |b: &Bucket| (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        let key = PeerKey::ip(source);
        if !buckets.contains_key(&key) && buckets.len() >= Self::MAX_SOURCES {
            buckets.retain(|_, b| refill(b) < burst);
            if buckets.len() >= Self::MAX_SOURCES {
                let mut ages: Vec<Instant> = buckets.values().map(|b| b.at).collect();
                ages.sort();
                let cutoff = ages[ages.len() / 2];
                buckets.retain(|_, b| b.at > cutoff);
            }
        }
        let b = buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let tokens = refill(b);
        if tokens < 1.0 {
            return false;
        }
        *b = Bucket {
            tokens: tokens - 1.0,
            at: now,
        };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let l = PerSource::new(60);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let t = Instant::now();
        for _ in 0..10 {
            assert!(l.admit_at(a, t));
        }
        assert!(!l.admit_at(a, t), "burst of 10 spent");
        assert!(
            l.admit_at("10.0.0.2".parse().unwrap(), t),
            "other sources unaffected"
        );
        assert!(!l.admit_at(a, t + Duration::from_millis(500)));
        assert!(l.admit_at(a, t + Duration::from_millis(1100)), "one a second");
    }

    #[test]
    fn memory_stays_bounded_under_many_sources() {
        let l = PerSource::new(60);
        let t = Instant::now();
        for i in 0..(PerSource::MAX_SOURCES as u32 * 3) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            l.admit_at(ip, t + Duration::from_micros(u64::from(i)));
        }
        assert!(l.buckets.lock().unwrap().len() <= PerSource::MAX_SOURCES);
    }

    #[test]
    fn zero_turns_it_off() {
        let l = PerSource::new(0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert!((0..1000).all(|_| l.admit(a)));
    }
}
