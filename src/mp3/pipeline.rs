//! The per-stream thread body of a lazy output (MP3's codecs or the Ogg
//! output's pager, behind [`Output`]): owns the warm-up (the history a starting
//! pipeline is handed, decoded and encoded at once for the first burst), the
//! receive loop that drives decode → encode → publish (coalescing bursts of
//! batches from long filled gaps), the stop once nobody has listened for
//! [`LINGER`], and the end-of-stream sequence (drain, flush LAME, publish the
//! remainder, close the fan-out), and the MP3 [`Output`].

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::batch::{coalesce, Batch};
use super::decode::OpusDecode;
use super::demand::{Demand, LINGER};
use super::encode::Mp3Encode;
use super::fanout::{Fanout, Format};
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

/// Counts the thread in its format's running gauge while it lives.
struct Running(Format);

impl Running {
    fn new(format: Format) -> Self {
        let m = metrics();
        match format {
            Format::Mp3 => {
                m.mp3_pipelines_running.inc();
                m.mp3_pipeline_starts.inc();
            }
            Format::Ogg => {
                m.ogg_pagers_running.inc();
                m.ogg_pager_starts.inc();
            }
        }
        Running(format)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let m = metrics();
        match self.0 {
            Format::Mp3 => m.mp3_pipelines_running.dec(),
            Format::Ogg => m.ogg_pagers_running.dec(),
        }
    }
}

/// What a running pipeline thread makes of the stream's packets: MP3's
/// codecs, or the Ogg output's pager.
pub(crate) trait Output {
    /// Takes one packet; the batches it completes go to `out`.
    fn packet(&mut self, packet: &OpusPacket, out: &mut Vec<Batch>);
    /// The stream ended: what is left goes to `out`.
    fn finish(self: Box<Self>, out: &mut Vec<Batch>);
}

/// Makes a starting pipeline's [`Output`], on its thread.
pub(crate) type MakeOutput =
    Box<dyn Fn(&Demand) -> Result<Box<dyn Output>, Mp3Error> + Send + Sync>;

/// The MP3 output: one stream's Opus decoder and MP3 encoder.
struct Codecs {
    decoder: OpusDecode,
    encoder: Mp3Encode,
}

/// Makes the MP3 output (what [`super::try_start`] hands its demand).
pub(crate) fn mp3_output(demand: &Demand) -> Result<Box<dyn Output>, Mp3Error> {
    crate::priority::for_mp3_pipeline();
    let counters = Arc::clone(demand.counters());
    Ok(Box::new(Codecs {
        decoder: OpusDecode::new(Arc::clone(&counters))?,
        encoder: Mp3Encode::new(demand.config(), counters)?,
    }))
}

impl Output for Codecs {
    /// Decodes and encodes one packet.
    fn packet(&mut self, packet: &OpusPacket, out: &mut Vec<Batch>) {
        let before = out.len();
        let Self { decoder, encoder } = self;
        decoder.packet(packet.seq, packet.rtp_time, &packet.payload, &mut |pcm| {
            encoder.encode(pcm, &mut |batch| out.push(batch))
        });
        metrics().mp3_packets_decoded.inc();
        count_frames(&out[before..]);
    }

    /// Flushes LAME.
    fn finish(self: Box<Self>, out: &mut Vec<Batch>) {
        let before = out.len();
        self.encoder.finish(&mut |batch| out.push(batch));
        count_frames(&out[before..]);
    }
}

/// The `mp3-<stream_id>` or `ogg-<stream_id>` thread: warm-up from
/// `history`, then live from `rx` until the stream ends or nobody has
/// listened for [`LINGER`].
pub(crate) fn run(
    demand: Arc<Demand>,
    history: Vec<OpusPacket>,
    from_start: bool,
    rx: Receiver<OpusPacket>,
) {
    let fanout = Arc::clone(demand.fanout());
    let format = fanout.format();
    let _watch = Liveness::process().watch_for_panic(match format {
        Format::Mp3 => "an MP3 pipeline thread",
        Format::Ogg => "an Ogg pager thread",
    });
    let _closer = CloseOnPanic(Arc::clone(&fanout));
    let _running = Running::new(format);
    let mut output = match demand.make_output() {
        Ok(output) => output,
        Err(err) => {
            tracing::error!(stream_id = fanout.stream_id(), format = format.name(), error = %err, "pipeline failed to start");
            demand.failed();
            return;
        }
    };
    let started = Instant::now();
    let mut pending = Vec::new();
    for packet in &history {
        output.packet(packet, &mut pending);
    }
    fanout.publish_warm(std::mem::take(&mut pending), from_start);
    tracing::debug!(
        stream_id = fanout.stream_id(),
        format = format.name(),
        history = history.len(),
        from_start,
        warm_up_us = started.elapsed().as_micros() as u64,
        "pipeline started"
    );
    drop(history);
    if live(&demand, &fanout, &rx, output.as_mut()) {
        tracing::debug!(
            stream_id = fanout.stream_id(),
            format = format.name(),
            "pipeline stopped: nobody listens"
        );
        return;
    }
    let _closer = CloseOnDrop(Arc::clone(&fanout));
    output.finish(&mut pending);
    publish(&fanout, &mut pending, fanout.max_batches_per_packet());
    tracing::debug!(
        stream_id = fanout.stream_id(),
        format = format.name(),
        counters = ?fanout.counters(),
        "pipeline finished"
    );
}

/// The live loop. Returns true if the pipeline stopped for want of
/// listeners, false when the stream ended (the queue is drained).
fn live(
    demand: &Demand,
    fanout: &Fanout,
    rx: &Receiver<OpusPacket>,
    output: &mut dyn Output,
) -> bool {
    let max_batches = fanout.max_batches_per_packet();
    let mut pending = Vec::new();
    let mut unheard_since: Option<Instant> = None;
    loop {
        // `recv` keeps returning queued packets after the sink is dropped
        // and fails only once the queue is empty and disconnected.
        match rx.recv_timeout(IDLE_CHECK) {
            Ok(packet) => {
                output.packet(&packet, &mut pending);
                publish(fanout, &mut pending, max_batches);
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
