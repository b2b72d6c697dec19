//! The per-connection message rate limit: a token bucket of `per_sec`
//! messages a second, bursts of twice that.

use std::time::{Duration, Instant};

pub(super) struct RateLimit {
    pub(super) per_sec: u32,
    tokens: f64,
    last: Instant,
    last_warned: Option<Instant>,
}

/// Whether one message may be handled.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Admit {
    Yes,
    /// Refused, and the client should be told (at most once a second).
    NoSayWhy,
    No,
}

impl RateLimit {
    pub(super) fn new(per_sec: u32) -> Self {
        RateLimit {
            per_sec,
            tokens: f64::from(per_sec) * 2.0,
            last: Instant::now(),
            last_warned: None,
        }
    }

    pub(super) fn take(&mut self, now: Instant) -> Admit {
        let rate = f64::from(self.per_sec);
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate * 2.0);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Admit::Yes;
        }
        if self
            .last_warned
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.last_warned = Some(now);
            Admit::NoSayWhy
        } else {
            Admit::No
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_allows_bursts_then_refills() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10);
        let admitted = (0..25).filter(|_| r.take(t0) == Admit::Yes).count();
        assert_eq!(admitted, 20, "a burst of twice the rate");
        assert_eq!(r.take(t0), Admit::No, "told once, then silent");
        let later = t0 + Duration::from_millis(500);
        let admitted = (0..10).filter(|_| r.take(later) == Admit::Yes).count();
        assert_eq!(admitted, 5, "refills at the rate");
    }
}
