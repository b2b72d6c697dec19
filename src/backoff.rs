//! When a failed push (Icecast source, WHIP push) is tried again: capped
//! exponential backoff with "equal jitter". The `n`-th wait in a row is
//! drawn from `[d/2, d]` with `d = min(cap, base · 2ⁿ)`: never shorter than
//! half the nominal delay, so the attempts in any window have a firm bound,
//! and pushes that failed together do not retry in step.

use std::time::Duration;

/// The retry schedule of one push.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    /// Failures in a row since the last reset.
    failures: u32,
}

impl Backoff {
    /// A schedule whose first nominal wait is `base`, doubling up to `cap`.
    pub const fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            failures: 0,
        }
    }

    /// The nominal (un-jittered) delay of the next wait.
    pub fn nominal(&self) -> Duration {
        let factor = 1u32 << self.failures.min(16);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// Counts a failure and gives the wait before the next attempt;
    /// `random` in `0.0..1.0` places it in the upper half of its step.
    pub fn next_wait(&mut self, random: f64) -> Duration {
        let step = self.nominal();
        self.failures = self.failures.saturating_add(1);
        step / 2 + step.mul_f64(random.clamp(0.0, 1.0) / 2.0)
    }

    /// The next failure starts from the base again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let mut low = Backoff::new(SEC, 30 * SEC);
        let mut high = low.clone();
        let secs = |d: Duration| d.as_secs_f64();
        let expected_steps = [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0];
        for step in expected_steps {
            assert_eq!(secs(low.next_wait(0.0)), step / 2.0);
            let h = secs(high.next_wait(0.999_999));
            assert!(h < step && h > step * 0.99, "{h} for step {step}");
        }
        for _ in 0..100 {
            assert!(low.next_wait(1.0) <= 30 * SEC, "never beyond the cap");
        }
        low.reset();
        assert_eq!(low.next_wait(0.0), SEC / 2);
    }

    #[test]
    fn attempts_over_a_window_stay_bounded() {
        // Even with the shortest jitter, a far end refusing for ten minutes
        // is asked 45 times (then every 15-30 s), not thousands.
        let mut b = Backoff::new(SEC, 30 * SEC);
        let (mut waited, mut attempts) = (Duration::ZERO, 1);
        while waited < Duration::from_secs(600) {
            waited += b.next_wait(0.0);
            attempts += 1;
        }
        assert_eq!(attempts, 45);
    }

    #[test]
    fn doubles_from_base_to_cap_with_bounded_jitter() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut b = Backoff::new(Duration::from_millis(500), 15 * SEC);
        let nominal: Vec<u64> = (0..8)
            .map(|_| {
                let d = b.nominal();
                let w = b.next_wait(rng.random());
                assert!(w >= d / 2 && w <= d, "{w:?} outside [{:?}, {d:?}]", d / 2);
                d.as_millis() as u64
            })
            .collect();
        assert_eq!(nominal, [500, 1000, 2000, 4000, 8000, 15000, 15000, 15000]);
        // Many failures never overflow and stay at the cap.
        for _ in 0..100 {
            b.next_wait(rng.random());
        }
        assert_eq!(b.nominal(), 15 * SEC);
    }

    #[test]
    fn jitter_spreads_retries() {
        let mut rng = StdRng::seed_from_u64(1);
        let waits: std::collections::HashSet<Duration> = (0..20)
            .map(|_| Backoff::new(Duration::from_millis(500), 15 * SEC).next_wait(rng.random()))
            .collect();
        assert!(waits.len() > 10, "{waits:?}");
    }
}
