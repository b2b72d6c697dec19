//! The server's own view of the latency it adds: its Prometheus histogram
//! `voice_relay_forward_latency_seconds` (from the sender packet's kernel
//! receive timestamp to the kernel taking each forwarded copy), parsed from
//! `/metrics` text taken before and after a window and turned into
//! percentiles.

const NAME: &str = "voice_relay_forward_latency_seconds_bucket";

/// Cumulative bucket counts: (upper bound in seconds, count), ascending.
#[derive(Debug, Clone, PartialEq)]
pub struct Buckets(Vec<(f64, f64)>);

/// The buckets of the histogram in a Prometheus text exposition.
pub fn parse(text: &str) -> Option<Buckets> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(NAME) else {
            continue;
        };
        let (labels, value) = rest.rsplit_once(' ')?;
        let le = labels.split("le=\"").nth(1)?.split('"').next()?;
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        out.push((le, value.trim().parse().ok()?));
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    (!out.is_empty()).then_some(Buckets(out))
}

impl Buckets {
    /// Observations between `earlier` and `self`, bucket by bucket.
    pub fn since(&self, earlier: &Buckets) -> Buckets {
        Buckets(
            self.0
                .iter()
                .zip(&earlier.0)
                .map(|(a, b)| (a.0, (a.1 - b.1).max(0.0)))
                .collect(),
        )
    }

    pub fn count(&self) -> f64 {
        self.0.last().map_or(0.0, |b| b.1)
    }

    /// The `p`-th percentile in milliseconds, interpolated linearly inside
    /// its bucket (as Prometheus' `histogram_quantile` does); `None` without
    /// observations, or when it falls in the open last bucket.
    pub fn percentile_ms(&self, p: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 {
            return None;
        }
        let rank = total * p / 100.0;
        let (mut lower, mut below) = (0.0, 0.0);
        for &(le, cum) in &self.0 {
            if cum >= rank {
                if le.is_infinite() {
                    return None;
                }
                let inside = cum - below;
                let frac = if inside > 0.0 {
                    (rank - below) / inside
                } else {
                    1.0
                };
                return Some((lower + (le - lower) * frac) * 1000.0);
            }
            (lower, below) = (le, cum);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# TYPE voice_relay_forward_latency_seconds histogram
voice_relay_forward_latency_seconds_bucket{le=\"0.001\"} 10
voice_relay_forward_latency_seconds_bucket{le=\"0.002\"} 60
voice_relay_forward_latency_seconds_bucket{le=\"0.005\"} 100
voice_relay_forward_latency_seconds_bucket{le=\"+Inf\"} 100
voice_relay_forward_latency_seconds_sum 0.2
voice_relay_forward_latency_seconds_count 100
voice_relay_rtp_packets_out_total 5
";

    #[test]
    fn parses_and_interpolates() {
        let b = parse(TEXT).unwrap();
        assert_eq!(b.count(), 100.0);
        // rank 50 lies 40/50 of the way through (1 ms, 2 ms].
        assert!((b.percentile_ms(50.0).unwrap() - 1.8).abs() < 1e-9);
        // rank 5 lies halfway through (0, 1 ms].
        assert!((b.percentile_ms(5.0).unwrap() - 0.5).abs() < 1e-9);
        assert!((b.percentile_ms(100.0).unwrap() - 5.0).abs() < 1e-9);
    }

    #[test]
    fn window_is_the_difference() {
        let before = parse(TEXT).unwrap();
        let after = parse(&TEXT.replace("} 100\n", "} 300\n")).unwrap();
        let d = after.since(&before);
        assert_eq!(d.count(), 200.0);
        // All 200 new observations are in (2 ms, 5 ms].
        assert!((d.percentile_ms(50.0).unwrap() - 3.5).abs() < 1e-9);
        assert_eq!(parse("other 1\n"), None);
        assert_eq!(
            Buckets(vec![(f64::INFINITY, 0.0)]).percentile_ms(50.0),
            None
        );
    }
}
