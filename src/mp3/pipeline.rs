//! The per-stream thread body: owns the warm-up (the history a starting
//! pipeline is handed, decoded and encoded at once for the first burst), the
//! receive loop that drives decode → encode → publish (coalescing bursts of
//! batches from long filled gaps), the stop once nobody has listened for
//! [`LINGER`], and the end-of-stream sequence (drain, flush LAME, publish the
//! remainder, close the fan-out). The Ogg output's thread reuses its
//! publishing and closing.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::batch::{coalesce, Batch};
use super::decode::OpusDecode;
use super::demand::{Demand, LINGER};
use super::encode::Mp3Encode;
use super::fanout::Fanout;
use super::{Mp3Error, OpusPacket};
use crate::liveness::Liveness;
use crate::metrics::metrics;

/// How often an unlistened pipeline looks whether it may stop, when no
/// packet wakes it sooner.
const IDLE_CHECK: Duration = Duration::from_millis(500);

/// Closes the fan-out however the thread exits (even by panic), so listener
/// bodies always end.
pub(crate) struct CloseOnDrop(pub(crate) Arc<Fanout>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Closes the fan-out if the thread panics (a stop leaves it open).
struct CloseOnPanic(Arc<Fanout>);

impl Drop for CloseOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.close();
        }
    }
}

/// Counts the thread in the running-pipelines gauge while it lives.
struct Running;

impl Running {
    fn new() -> Self {
        let m = metrics();
        m.mp3_pipelines_running.inc();
        m.mp3_pipeline_starts.inc();
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        metrics().mp3_pipelines_running.dec();
    }
}

/// One stream's decoder, encoder and the batches they have made.
struct Codecs {
    decoder: OpusDecode,
    encoder: Mp3Encode,
    pending: Vec<Batch>,
}

impl Codecs {
    fn new(demand: &Demand) -> Result<Self, Mp3Error> {
        let counters = Arc::clone(demand.counters());
        Ok(Self {
            decoder: OpusDecode::new(Arc::clone(&counters))?,
            encoder: Mp3Encode::new(demand.config(), counters)?,
            pending: Vec::new(),
        })
    }

    /// Decodes and encodes one packet into `pending`.
    fn packet(&mut self, packet: &OpusPacket) {
        let Self {
            decoder,
            encoder,
            pending,
        } = self;
        decoder.packet(packet.seq, packet.rtp_time, &packet.payload, &mut |pcm| {
            encoder.encode(pcm, &mut |batch| pending.push(batch))
        });
        metrics().mp3_packets_decoded.inc();
    }
}

/// The `mp3-<stream_id>` thread: warm-up from `history`, then live from
/// `rx` until the stream ends or nobody has listened for [`LINGER`].
pub(crate) fn run(
    demand: Arc<Demand>,
    history: Vec<OpusPacket>,
    from_start: bool,
    rx: Receiver<OpusPacket>,
) {
    let _watch = Liveness::process().watch_for_panic("an MP3 pipeline thread");
    crate::priority::for_mp3_pipeline();
    let fanout = Arc::clone(demand.fanout());
    let _closer = CloseOnPanic(Arc::clone(&fanout));
    let _running = Running::new();
    let mut codecs = match Codecs::new(&demand) {
        Ok(codecs) => codecs,
        Err(err) => {
            tracing::error!(stream_id = fanout.stream_id(), error = %err, "mp3 pipeline failed to start");
            demand.failed();
            return;
        }
    };
    let started = Instant::now();
    for packet in &history {
        codecs.packet(packet);
    }
    let warm = std::mem::take(&mut codecs.pending);
    count_frames(&warm);
    fanout.publish_warm(warm, from_start);
    tracing::debug!(
        stream_id = fanout.stream_id(),
        history = history.len(),
        from_start,
        warm_up_us = started.elapsed().as_micros() as u64,
        "mp3 pipeline started"
    );
    drop(history);
    if live(&demand, &fanout, &rx, &mut codecs) {
        tracing::debug!(
            stream_id = fanout.stream_id(),
            "mp3 pipeline stopped: nobody listens"
        );
        return;
    }
    let _closer = CloseOnDrop(Arc::clone(&fanout));
    codecs
        .encoder
        .finish(&mut |batch| codecs.pending.push(batch));
    count_frames(&codecs.pending);
    publish(
        &fanout,
        &mut codecs.pending,
        fanout.max_batches_per_packet(),
    );
    tracing::debug!(
        stream_id = fanout.stream_id(),
        counters = ?fanout.counters(),
        "mp3 pipeline finished"
    );
}

/// The live loop. Returns true if the pipeline stopped for want of
/// listeners, false when the stream ended (the queue is drained).
fn live(demand: &Demand, fanout: &Fanout, rx: &Receiver<OpusPacket>, codecs: &mut Codecs) -> bool {
    let max_batches = fanout.max_batches_per_packet();
    let mut unheard_since: Option<Instant> = None;
    loop {
        // `recv` keeps returning queued packets after the sink is dropped
        // and fails only once the queue is empty and disconnected.
        match rx.recv_timeout(IDLE_CHECK) {
            Ok(packet) => {
                codecs.packet(&packet);
                count_frames(&codecs.pending);
                publish(fanout, &mut codecs.pending, max_batches);
            }
            Err(RecvTimeoutError::Timeout) => {}
            // Ended, or stopped by someone else (tests): only the end flushes.
            Err(RecvTimeoutError::Disconnected) => return !demand.ended(),
        }
        if fanout.listener_count() > 0 {
            unheard_since = None;
            continue;
        }
        let since = *unheard_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= LINGER && demand.try_stop() {
            return true;
        }
    }
}

fn count_frames(batches: &[Batch]) {
    let frames: u64 = batches.iter().map(|b| u64::from(b.frames)).sum();
    if frames > 0 {
        metrics().mp3_frames_encoded.inc_by(frames);
    }
}

/// Publishes what one packet produced (normally 0 or 1 batch; a long filled
/// gap is coalesced so listeners are not pushed past their lag limit).
pub(crate) fn publish(fanout: &Fanout, pending: &mut Vec<Batch>, max_batches: usize) {
    if pending.is_empty() {
        return;
    }
    for batch in coalesce(std::mem::take(pending), max_batches) {
        fanout.publish(batch);
    }
}
