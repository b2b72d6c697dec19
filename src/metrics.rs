//! Prometheus metrics: counters the relay, signalling and HTTP code bump, and
//! gauges read from the registry when `/metrics` is scraped.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub streams: IntGauge,
    pub senders: IntGauge,
    pub receivers: IntGauge,
    pub mp3_listeners: IntGauge,
    pub ogg_listeners: IntGauge,
    pub websocket_clients: IntGauge,
    pub rtp_packets_in: IntCounter,
    pub rtp_bytes_in: IntCounter,
    pub rtp_packets_out: IntCounter,
    pub rtp_bytes_out: IntCounter,
    pub rtp_protected: IntCounterVec,
    pub forward_latency: Histogram,
    pub udp_datagrams_sent: IntCounter,
    pub udp_dropped: IntCounterVec,
    pub peers_connected: IntCounterVec,
    pub peers_closed: IntCounterVec,
    pub peers_transport: IntCounterVec,
    pub ice_tcp_connections: IntGauge,
    pub ice_tcp_closed: IntCounterVec,
    pub tcp_first_bytes: IntCounterVec,
    pub handshake_seconds: Histogram,
    pub offer_answer_seconds: Histogram,
    pub mp3_listeners_dropped_slow: IntCounter,
    pub ogg_listeners_dropped_slow: IntCounter,
    pub mp3_pipelines_running: IntGauge,
    pub mp3_pipeline_starts: IntCounter,
    pub ogg_pagers_running: IntGauge,
    pub ogg_pager_starts: IntCounter,
    pub mp3_packets_decoded: IntCounter,
    pub mp3_frames_encoded: IntCounter,
    pub limit_hits: IntCounterVec,
    pub errors: IntCounterVec,
    pub whip_push_attempts: IntCounter,
    pub whip_push_failures: IntCounterVec,
    pub whip_push_live: IntGauge,
    pub icecast_pushes: IntGauge,
    pub icecast_push_connects: IntCounter,
    pub icecast_push_failures: IntCounterVec,
    pub icecast_push_refused: IntCounterVec,
}

fn build() -> Result<Metrics, prometheus::Error> {
    let registry = Registry::new_custom(Some("voice_relay".into()), None)?;
    let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
        let g = IntGauge::new(name, help)?;
        registry.register(Box::new(g.clone()))?;
        Ok(g)
    };
    let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
        let c = IntCounter::new(name, help)?;
        registry.register(Box::new(c.clone()))?;
        Ok(c)
    };
    let counter_vec =
        |name: &str, help: &str, label: &str| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
    let histogram =
        |name: &str, help: &str, buckets: Vec<f64>| -> Result<Histogram, prometheus::Error> {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
    Ok(Metrics {
        streams: gauge("streams", "Live streams")?,
        senders: gauge("senders", "Live senders")?,
        receivers: gauge("receivers", "WebRTC receiver legs (offered or live)")?,
        mp3_listeners: gauge("mp3_listeners", "HTTP MP3 listeners")?,
        ogg_listeners: gauge("ogg_listeners", "HTTP Ogg/Opus listeners")?,
        websocket_clients: gauge("websocket_clients", "Connected WebSocket clients")?,
        rtp_packets_in: counter("rtp_packets_in_total", "RTP packets received from senders")?,
        rtp_bytes_in: counter(
            "rtp_bytes_in_total",
            "RTP payload bytes received from senders",
        )?,
        rtp_packets_out: counter(
            "rtp_packets_out_total",
            "RTP packets forwarded to receivers",
        )?,
        rtp_bytes_out: counter(
            "rtp_bytes_out_total",
            "RTP payload bytes forwarded to receivers",
        )?,
        rtp_protected: counter_vec(
            "rtp_protected_total",
            "Forwarded RTP packets by who SRTP-protected them: the relay, or str0m before a receiver's keys were known",
            "by",
        )?,
        forward_latency: histogram(
            "forward_latency_seconds",
            "Latency the relay adds to each forwarded RTP copy: from the sender packet reaching the media socket (kernel receive timestamp) to the kernel taking the copy",
            vec![
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.003, 0.005, 0.007_5, 0.01, 0.015, 0.02,
                0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ],
        )?,
        udp_datagrams_sent: counter("udp_datagrams_sent_total", "UDP datagrams sent")?,
        udp_dropped: counter_vec(
            "udp_dropped_total",
            "UDP datagrams dropped, by reason",
            "reason",
        )?,
        peers_connected: counter_vec(
            "peers_connected_total",
            "Peers that completed ICE and DTLS, by role",
            "role",
        )?,
        peers_closed: counter_vec("peers_closed_total", "Peers closed, by reason", "reason")?,
        peers_transport: counter_vec(
            "peers_connected_transport_total",
            "Peers that completed ICE and DTLS, by the transport of their media (udp, tcp)",
            "transport",
        )?,
        ice_tcp_connections: gauge(
            "ice_tcp_connections",
            "ICE-TCP connections open in the media relay",
        )?,
        ice_tcp_closed: counter_vec(
            "ice_tcp_closed_total",
            "ICE-TCP connections closed (or refused), by reason",
            "reason",
        )?,
        tcp_first_bytes: counter_vec(
            "tcp_first_bytes_total",
            "Connections to the HTTP port by what their first bytes were: http (or TLS), ice (RFC 4571 STUN), silent (nothing in time, or closed first)",
            "kind",
        )?,
        handshake_seconds: histogram(
            "handshake_seconds",
            "Time from a peer's hand-over to the relay to ICE+DTLS connected",
            vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
        )?,
        offer_answer_seconds: histogram(
            "offer_answer_seconds",
            "Time to answer a sender's webrtc_offer",
            vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1],
        )?,
        mp3_listeners_dropped_slow: counter(
            "mp3_listeners_dropped_slow_total",
            "MP3 listeners disconnected for falling behind",
        )?,
        ogg_listeners_dropped_slow: counter(
            "ogg_listeners_dropped_slow_total",
            "Ogg/Opus listeners disconnected for falling behind",
        )?,
        mp3_pipelines_running: gauge(
            "mp3_pipelines_running",
            "MP3 pipelines decoding and encoding (streams with MP3 listeners, or left less than the linger time ago)",
        )?,
        mp3_pipeline_starts: counter(
            "mp3_pipeline_starts_total",
            "MP3 pipelines started by a stream's first listener",
        )?,
        ogg_pagers_running: gauge(
            "ogg_pagers_running",
            "Ogg pagers paging Opus packets (streams with Ogg listeners, or left less than the linger time ago)",
        )?,
        ogg_pager_starts: counter(
            "ogg_pager_starts_total",
            "Ogg pagers started by a stream's first listener",
        )?,
        mp3_packets_decoded: counter(
            "mp3_opus_packets_decoded_total",
            "Opus packets decoded for MP3 (a starting pipeline's history included)",
        )?,
        mp3_frames_encoded: counter(
            "mp3_frames_encoded_total",
            "MP3 frames encoded",
        )?,
        limit_hits: counter_vec("limit_hits_total", "Requests refused by a limit", "limit")?,
        errors: counter_vec(
            "errors_total",
            "error messages sent to WebSocket clients, by code",
            "code",
        )?,
        whip_push_attempts: counter(
            "whip_push_attempts_total",
            "WHIP push attempts (offer POSTed to a --whip-push target)",
        )?,
        whip_push_failures: counter_vec(
            "whip_push_failures_total",
            "Failed or dropped WHIP pushes, by reason (http_STATUS for a refusal, unreachable, timeout, bad_answer, ice_dtls, dropped, socket)",
            "reason",
        )?,
        whip_push_live: gauge("whip_push_live", "WHIP pushes connected now")?,
        icecast_pushes: gauge(
            "icecast_pushes",
            "Icecast source connections streaming now",
        )?,
        icecast_push_connects: counter(
            "icecast_push_connects_total",
            "Connection attempts of Icecast source pushes",
        )?,
        icecast_push_failures: counter_vec(
            "icecast_push_failures_total",
            "Icecast source connections that failed or broke, by reason",
            "reason",
        )?,
        icecast_push_refused: counter_vec(
            "icecast_push_refused_total",
            "Icecast source connections refused, by HTTP status",
            "status",
        )?,
        registry,
    })
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| match build() {
        Ok(m) => m,
        // Only reachable through a programming error (duplicate names).
        Err(e) => panic!("building metrics: {e}"),
    })
}

impl Metrics {
    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = metrics();
        m.limit_hits.with_label_values(&["streams"]).inc();
        m.rtp_packets_in.inc_by(3);
        let text = m.render();
        assert!(text.contains("# TYPE voice_relay_rtp_packets_in_total counter"));
        assert!(text.contains("voice_relay_limit_hits_total{limit=\"streams\"} 1"));
        assert!(text.contains("voice_relay_handshake_seconds_bucket"));
    }
}
