//! Exponential backoff with full jitter, one per peer or identity, reset on
//! success.

use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};

/// A random fraction in [0, 1).
pub fn unit_random() -> f64 {
    let mut b = [0u8; 4];
    if SystemRandom::new().fill(&mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The next delay: uniformly random in [cap/2, cap], where cap doubles per
    /// attempt up to `max`. Half-jitter keeps a floor so a flapping peer is
    /// not hammered, and spreads a fleet reconnecting at once.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        cap.mul_f64(0.5 + 0.5 * unit_random())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_secs(2));
        }
        assert!(b.next_delay() >= Duration::from_secs(1), "stays near the cap");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
