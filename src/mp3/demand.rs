//! When one stream's lazy output runs (MP3, or Ogg/Opus), [`Demand`]: while
//! nobody listens the stream only keeps its recent Opus packets
//! ([`History`]); the first listener (its ring turned from idle to warming)
//! starts the `mp3-<id>` (or `ogg-<id>`) thread with a copy of that history,
//! which it turns into the burst at once (decoding and encoding, or paging)
//! before going live; the thread stops again [`LINGER`] after
//! the last listener left. The relay's packets reach the history and, while
//! the thread runs, its bounded queue, under one short lock, so the hand-over
//! from history to queue loses and repeats nothing.
//!
//! Lock order: this state, then the ring's (a joining listener takes the
//! ring's alone and calls [`Demand::start`] after releasing it).

use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::counters::{bump, PipelineCounters};
use super::fanout::Fanout;
use super::history::History;
use super::pipeline::{MakeOutput, Output};
use super::{Mp3Config, Mp3Error, OpusPacket, PACKET_QUEUE};
use crate::sync::lock;

/// How long a pipeline keeps running after its last listener left. Long
/// enough that a player that probes and reconnects, or the next of several
/// announcements, finds it running (no second warm-up, same timeline); short
/// against a stream's life, so an unlistened stream soon costs nothing again.
pub const LINGER: Duration = Duration::from_secs(5);

/// Everything behind the demand's lock.
struct State {
    history: History,
    /// The running pipeline's queue; `None` while idle.
    live: Option<SyncSender<OpusPacket>>,
    /// The relay dropped the stream's sink: the stream has ended.
    ended: bool,
}

/// One stream's demand for one output: shared by the relay's sink, the
/// fan-out (which starts it) and the pipeline thread (which stops it).
pub(crate) struct Demand {
    config: Mp3Config,
    /// What the pipeline thread makes of the packets.
    make_output: MakeOutput,
    fanout: Arc<Fanout>,
    counters: Arc<PipelineCounters>,
    state: Mutex<State>,
}

impl Demand {
    pub(crate) fn new(
        config: Mp3Config,
        fanout: Arc<Fanout>,
        counters: Arc<PipelineCounters>,
        make_output: MakeOutput,
    ) -> Arc<Self> {
        let history = History::new(config.history_ms());
        Arc::new(Self {
            config,
            make_output,
            fanout,
            counters,
            state: Mutex::new(State {
                history,
                live: None,
                ended: false,
            }),
        })
    }

    pub(crate) fn fanout(&self) -> &Arc<Fanout> {
        &self.fanout
    }

    /// From the relay, never blocking: keeps the packet in the history and,
    /// while the pipeline runs, queues it (dropped and counted if full).
    pub(crate) fn push(&self, packet: OpusPacket) {
        let mut state = lock(&self.state);
        if let Some(tx) = &state.live {
            match tx.try_send(packet.clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    bump(&self.counters.packets_dropped_queue_full, 1);
                }
            }
        }
        state.history.push(packet);
    }

    /// A listener turned the idle ring to warming: starts the pipeline with
    /// a copy of the history. If the stream has ended (or no thread can be
    /// had), the fan-out closes instead, so waiting listeners end.
    pub(crate) fn start(self: &Arc<Self>) {
        let mut state = lock(&self.state);
        if state.live.is_some() {
            return;
        }
        if !state.ended {
            let history = state.history.snapshot();
            let from_start = state.history.holds_start();
            let (tx, rx) = mpsc::sync_channel(PACKET_QUEUE);
            let demand = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name(format!(
                    "{}-{}",
                    self.fanout.format().name(),
                    self.fanout.stream_id()
                ))
                .spawn(move || super::pipeline::run(demand, history, from_start, rx));
            match spawned {
                Ok(_) => {
                    state.live = Some(tx);
                    return;
                }
                Err(err) => {
                    tracing::error!(stream_id = self.fanout.stream_id(), format = self.fanout.format().name(), error = %err, "pipeline thread failed to start");
                }
            }
        }
        drop(state);
        self.fanout.close();
    }

    /// The relay dropped the sink: a running pipeline drains its queue,
    /// flushes and closes the fan-out; an idle one is closed here.
    pub(crate) fn end(&self) {
        let mut state = lock(&self.state);
        state.ended = true;
        let running = state.live.take().is_some();
        drop(state);
        if !running {
            self.fanout.close();
        }
    }

    /// From the pipeline thread once nobody has listened for [`LINGER`]:
    /// turns the ring idle and the relay's packets back to the history
    /// alone, unless a listener joined meanwhile or the stream ended.
    pub(crate) fn try_stop(&self) -> bool {
        let mut state = lock(&self.state);
        if state.ended || !self.fanout.try_idle() {
            return false;
        }
        state.live = None;
        true
    }

    /// The pipeline could not set up its codecs: nothing will be published.
    pub(crate) fn failed(&self) {
        lock(&self.state).live = None;
        self.fanout.close();
    }

    /// The pipeline's output, made on its thread.
    pub(crate) fn make_output(&self) -> Result<Box<dyn Output>, Mp3Error> {
        (self.make_output)(self)
    }

    pub(crate) fn config(&self) -> &Mp3Config {
        &self.config
    }

    pub(crate) fn counters(&self) -> &Arc<PipelineCounters> {
        &self.counters
    }

    /// Whether the stream has ended.
    pub(crate) fn ended(&self) -> bool {
        lock(&self.state).ended
    }

    /// Whether the pipeline thread runs (or is starting).
    #[cfg(test)]
    pub(crate) fn running(&self) -> bool {
        lock(&self.state).live.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mp3::{try_start, Fanout};
    use std::time::Instant;

    fn opus_packets(n: usize) -> Vec<Arc<[u8]>> {
        let mut enc = opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Audio)
            .expect("encoder");
        (0..n)
            .map(|i| {
                let pcm: Vec<i16> = (0..960)
                    .map(|k| {
                        let t = (i * 960 + k) as f64 / 48_000.0;
                        (8000.0 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()) as i16
                    })
                    .collect();
                Arc::from(enc.encode_vec(&pcm, 400).expect("encode"))
            })
            .collect()
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn sink_and_demand(id: &str) -> (crate::mp3::PacketSink, Arc<Fanout>, Arc<Demand>) {
        let (sink, fanout) = try_start(id, Mp3Config::default()).expect("start");
        let demand = sink.demand().expect("lazy");
        (sink, fanout, demand)
    }

    #[test]
    fn idle_stream_only_keeps_history_until_a_listener_joins() {
        let (sink, fanout, demand) = sink_and_demand("idle");
        let packets = opus_packets(150); // 3 s
        for (i, p) in packets.iter().enumerate() {
            sink.push(i as u64, i as u64 * 960, Arc::clone(p));
        }
        assert!(!demand.running());
        assert_eq!(
            fanout.counters().packets_in,
            0,
            "nothing decoded while idle"
        );
        assert_eq!(fanout.frames_published(), 0);

        // The first listener starts the pipeline; its burst is made from the
        // history at once: the stream is 3 s old, so everything from its
        // first packet (first words), 125 frames of 24 ms.
        let listener = fanout.subscribe();
        assert!(demand.running());
        wait_until("the warm-up", || fanout.frames_published() > 0);
        assert_eq!(fanout.counters().packets_in, 150);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        let mut body = Box::pin(listener.into_stream());
        let burst = rt
            .block_on(futures_util::StreamExt::next(&mut body))
            .expect("burst")
            .expect("ok");
        let frames = fanout.frames_published();
        assert!(frames >= 117, "{frames} frames from 3 s of history");
        assert!(burst.len() >= 117 * 384, "burst of {} bytes", burst.len());
        drop(body);
        drop(sink);
        wait_until("the end", || fanout.is_closed());
    }

    #[test]
    fn a_listener_before_the_first_packet_gets_everything_live() {
        let (sink, fanout, demand) = sink_and_demand("early");
        let listener = fanout.subscribe();
        assert!(demand.running());
        assert!(listener.burst().is_empty());
        for (i, p) in opus_packets(50).iter().enumerate() {
            sink.push(i as u64, i as u64 * 960, Arc::clone(p));
        }
        drop(sink);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        let body: Vec<_> = rt.block_on(futures_util::StreamExt::collect(listener.into_stream()));
        let bytes: usize = body.iter().map(|b| b.as_ref().expect("ok").len()).sum();
        // 1 s of audio plus LAME's delay and flush: about 42 frames.
        assert!(bytes >= 41 * 384, "{bytes} bytes");
        assert_eq!(fanout.counters().packets_in, 50);
    }

    #[test]
    fn stops_after_the_last_listener_and_starts_again() {
        let (sink, fanout, demand) = sink_and_demand("again");
        let packets = opus_packets(20);
        let listener = fanout.subscribe();
        for (i, p) in packets.iter().take(10).enumerate() {
            sink.push(i as u64, i as u64 * 960, Arc::clone(p));
        }
        wait_until("decoding", || fanout.counters().packets_in == 10);
        // While a listener is there, the pipeline cannot stop.
        assert!(!demand.try_stop());
        drop(listener);
        assert_eq!(fanout.listener_count(), 0);
        assert!(demand.try_stop(), "nobody listens");
        assert!(!demand.running());
        let decoded = fanout.counters().packets_in;
        for (i, p) in packets.iter().enumerate().skip(10) {
            sink.push(i as u64 + 100, (i as u64 + 100) * 960, Arc::clone(p));
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            fanout.counters().packets_in,
            decoded,
            "idle again: no decode"
        );
        assert_eq!(fanout.listener_count(), 0);

        // A new listener restarts it from the history.
        let again = fanout.subscribe();
        assert!(demand.running());
        wait_until("the second warm-up", || {
            fanout.counters().packets_in >= decoded + 10
        });
        drop(again);
        drop(sink);
        wait_until("the end", || fanout.is_closed());
    }

    #[test]
    fn a_stream_that_ends_idle_closes_its_fanout_and_refuses_to_start() {
        let (sink, fanout, demand) = sink_and_demand("ended");
        drop(sink);
        assert!(fanout.is_closed());
        let listener = fanout.subscribe();
        assert!(!demand.running(), "an ended stream never starts");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        let body: Vec<_> = rt.block_on(futures_util::StreamExt::collect(listener.into_stream()));
        assert!(body.is_empty(), "the body just ends");
        assert_eq!(fanout.listener_count(), 0);
    }
}
