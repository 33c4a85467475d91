//! Randomness for spreading work in time (retries, renewals, refreshes,
//! elections), so a fleet that saw the same event does not act in lockstep.
//! Never for secrets or serial numbers: those use `ring`'s generator
//! directly and fail when it fails.

use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};

/// A uniformly random fraction in [0, 1). If the system's generator fails,
/// 0.5: an unspread wait is still a valid wait.
pub fn unit() -> f64 {
    let mut b = [0u8; 4];
    if SystemRandom::new().fill(&mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

/// `d` scaled by a factor drawn uniformly from [`lo`, `hi`).
pub fn between(d: Duration, lo: f64, hi: f64) -> Duration {
    d.mul_f64(lo + (hi - lo) * unit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_stay_in_their_range_and_spread_over_it() {
        let d = Duration::from_secs(100);
        let draws: Vec<Duration> = (0..2000).map(|_| between(d, 0.5, 0.7)).collect();
        assert!(
            draws
                .iter()
                .all(|x| *x >= Duration::from_secs(50) && *x < Duration::from_secs(70))
        );
        // Spread: both ends of the range are reached (2000 draws miss a
        // tenth of it with probability 0.9^2000).
        assert!(draws.iter().any(|x| *x < Duration::from_secs(52)));
        assert!(draws.iter().any(|x| *x >= Duration::from_secs(68)));
        let u: Vec<f64> = (0..2000).map(|_| unit()).collect();
        assert!(u.iter().all(|x| (0.0..1.0).contains(x)));
    }
}
