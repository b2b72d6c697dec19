//! When a source push retries after a failure: capped exponential backoff
//! with jitter. The `n`-th wait in a row is drawn from
//! `[d/2, d]` with `d = min(CAP, BASE · 2ⁿ)` ("equal jitter"): never
//! shorter than half the nominal delay, so the number of attempts in any
//! window has a firm bound, and pushes that failed together do not retry
//! in step. A connection that streamed for [`RESET_AFTER`] starts the
//! schedule over.

use std::time::Duration;

use rand::Rng;

/// The nominal first wait.
pub const BASE: Duration = Duration::from_millis(500);
/// The longest nominal wait.
pub const CAP: Duration = Duration::from_secs(15);
/// A connection that streamed this long resets the schedule.
pub const RESET_AFTER: Duration = Duration::from_secs(10);

/// The retry schedule of one push.
#[derive(Debug, Default)]
pub struct Backoff {
    /// Failures in a row since the last reset.
    failures: u32,
}

impl Backoff {
    /// The nominal (un-jittered) delay of the next wait.
    pub fn nominal(&self) -> Duration {
        let doublings = self.failures.min(16);
        BASE.saturating_mul(1 << doublings).min(CAP)
    }

    /// Counts a failure and draws the wait before the next attempt.
    pub fn next_wait(&mut self, rng: &mut impl Rng) -> Duration {
        let nominal = self.nominal();
        self.failures = self.failures.saturating_add(1);
        let half = nominal / 2;
        let jitter_ms = rng.random_range(0..=half.as_millis() as u64);
        half + Duration::from_millis(jitter_ms)
    }

    /// After a connection ended: one that streamed for [`RESET_AFTER`]
    /// starts the schedule over.
    pub fn connection_lasted(&mut self, streamed: Duration) {
        if streamed >= RESET_AFTER {
            self.failures = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn doubles_from_base_to_cap_with_bounded_jitter() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut b = Backoff::default();
        let nominal: Vec<u64> = (0..8)
            .map(|_| {
                let d = b.nominal();
                let w = b.next_wait(&mut rng);
                assert!(w >= d / 2 && w <= d, "{w:?} outside [{:?}, {d:?}]", d / 2);
                d.as_millis() as u64
            })
            .collect();
        assert_eq!(nominal, [500, 1000, 2000, 4000, 8000, 15000, 15000, 15000]);
        // Many failures never overflow and stay at the cap.
        for _ in 0..100 {
            b.next_wait(&mut rng);
        }
        assert_eq!(b.nominal(), CAP);
    }

    #[test]
    fn jitter_spreads_retries() {
        let mut rng = StdRng::seed_from_u64(1);
        let waits: std::collections::HashSet<Duration> = (0..20)
            .map(|_| Backoff::default().next_wait(&mut rng))
            .collect();
        assert!(waits.len() > 10, "{waits:?}");
    }

    #[test]
    fn only_a_long_connection_resets() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut b = Backoff::default();
        for _ in 0..4 {
            b.next_wait(&mut rng);
        }
        b.connection_lasted(RESET_AFTER - Duration::from_millis(1));
        assert_eq!(
            b.nominal(),
            BASE * 16,
            "a short connection keeps backing off"
        );
        b.connection_lasted(RESET_AFTER);
        assert_eq!(b.nominal(), BASE);
    }
}
