//! When a failed WHIP push is tried again: capped exponential backoff with
//! jitter ("equal jitter": half the step fixed, half random), so that many
//! streams pushing to one far end that went away do not come back in step,
//! and a far end that keeps refusing is asked at most every [`CAP`].

use std::time::Duration;

/// The first wait.
pub const BASE: Duration = Duration::from_secs(1);
/// The longest wait.
pub const CAP: Duration = Duration::from_secs(30);

/// The waits between the attempts of one push.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The wait before the next attempt after one more failure; `random`
    /// in `0.0..1.0` places it in the upper half of its step.
    pub fn next_wait(&mut self, random: f64) -> Duration {
        let step = Self::step(self.failures);
        self.failures = self.failures.saturating_add(1);
        step / 2 + step.mul_f64(random.clamp(0.0, 1.0) / 2.0)
    }

    /// A push got through: the next failure starts from [`BASE`] again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// `BASE * 2^failures`, at most [`CAP`].
    fn step(failures: u32) -> Duration {
        let factor = 1u32 << failures.min(16);
        BASE.saturating_mul(factor).min(CAP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let mut low = Backoff::default();
        let mut high = Backoff::default();
        let secs = |d: Duration| d.as_secs_f64();
        let expected_steps = [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0];
        for step in expected_steps {
            assert_eq!(secs(low.next_wait(0.0)), step / 2.0);
            let h = secs(high.next_wait(0.999_999));
            assert!(h < step && h > step * 0.99, "{h} for step {step}");
        }
        for _ in 0..100 {
            assert!(low.next_wait(1.0) <= CAP, "never beyond the cap");
        }
        low.reset();
        assert_eq!(low.next_wait(0.0), BASE / 2);
    }

    #[test]
    fn attempts_over_a_window_stay_bounded() {
        // Even with the shortest jitter, a far end refusing for ten minutes
        // is asked 45 times (then every 15-30 s), not thousands.
        let mut b = Backoff::default();
        let (mut waited, mut attempts) = (Duration::ZERO, 1);
        while waited < Duration::from_secs(600) {
            waited += b.next_wait(0.0);
            attempts += 1;
        }
        assert_eq!(attempts, 45);
    }
}
