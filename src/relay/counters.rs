//! The relay's counters: kept locally on the hot path (plain integers on the
//! relay thread) and added to the shared Prometheus metrics at each
//! housekeeping tick.

use super::outbox::Outbox;
use crate::metrics::metrics;

#[derive(Default)]
pub(super) struct RelayCounters {
    /// Datagrams no peer claimed.
    pub unrouted: u64,
    /// Sender RTP packets forwarded, and their payload bytes.
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Copies sent to receivers, and their payload bytes.
    pub packets_out: u64,
    /// Of `packets_out`, those str0m protected (the rest the relay did).
    pub by_str0m: u64,
    pub bytes_out: u64,
    /// The outbox's running totals at the last publish.
    published_sent: u64,
    published_dropped: u64,
}

impl RelayCounters {
    /// Adds what was counted since the last call (and the outbox's sends,
    /// drops and latencies) to the metrics.
    pub fn publish(&mut self, out: &Outbox) {
        let m = metrics();
        m.rtp_packets_in
            .inc_by(std::mem::take(&mut self.packets_in));
        m.rtp_bytes_in.inc_by(std::mem::take(&mut self.bytes_in));
        let (out_total, by_str0m) = (
            std::mem::take(&mut self.packets_out),
            std::mem::take(&mut self.by_str0m),
        );
        m.rtp_packets_out.inc_by(out_total);
        m.rtp_protected
            .with_label_values(&["relay"])
            .inc_by(out_total - by_str0m);
        m.rtp_protected
            .with_label_values(&["str0m"])
            .inc_by(by_str0m);
        m.rtp_bytes_out.inc_by(std::mem::take(&mut self.bytes_out));
        m.udp_dropped
            .with_label_values(&["unrouted"])
            .inc_by(std::mem::take(&mut self.unrouted));
        m.udp_datagrams_sent
            .inc_by(out.sent.saturating_sub(self.published_sent));
        m.udp_dropped
            .with_label_values(&["send_failed"])
            .inc_by(out.dropped.saturating_sub(self.published_dropped));
        out.publish_latency();
        self.published_sent = out.sent;
        self.published_dropped = out.dropped;
    }
}
