//! Live Opus → MP3 transcoding for one stream, fanned out to many HTTP
//! listeners. Owns the public entry point [`start`], the configuration
//! ([`Mp3Config`]) and the non-blocking [`PacketSink`] the media relay feeds.
//!
//! A stream's MP3 costs nothing until someone listens: until then it only
//! keeps its last seconds of Opus packets (`history.rs`); the first listener
//! starts ONE `mp3-<stream_id>` thread that makes the burst from them and
//! then decodes Opus once and encodes MP3 once (`pipeline.rs`), until a while
//! after the last listener left (`demand.rs`). Its output is shared by every
//! listener through [`Fanout`] as refcounted ~200 ms batches (`batch.rs`) in
//! a ring (`ring.rs`). Async listeners read the ring (`listener.rs`);
//! listener sockets handed over after their response head are written by one
//! `mp3w-<stream_id>` thread per stream (`writer.rs`). The fan-out, ring,
//! batches, listeners and writer are format-neutral and also carry the
//! Ogg/Opus output ([`crate::ogg_opus`]), which is lazy in the same way:
//! the demand and pipeline thread are shared, each format brings its
//! `pipeline::Output`. Imports go one way:
//! demand → pipeline → fanout → listener, writer → ring → batch, counters.

pub mod batch;
pub mod counters;
pub mod decode;
pub(crate) mod demand;
pub mod encode;
pub mod fanout;
pub mod frames;
pub mod gap;
mod history;
mod listener;
pub(crate) mod pipeline;
mod ring;
mod writer;

use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{mpsc, Arc};

pub use counters::{PipelineCounters, PipelineCounts};
pub use fanout::{Fanout, Format};
pub use listener::Listener;
pub(crate) use ring::Preamble;
pub use writer::wait_idle as wait_writers;

use counters::bump;
use demand::Demand;
pub(crate) use ring::{Burst, FIRST_WORDS_NS};

/// Opus sample rate used throughout (RTP clock rate of Opus).
pub const SAMPLE_RATE: u32 = 48_000;
/// Bound of the packet queue between the relay and the pipeline thread.
pub const PACKET_QUEUE: usize = 512;
/// Default `burst_bytes`: Chromium's `<audio>` plays once it holds about
/// 33.5 KB (measured, `docs/benchmarks.md`), ffmpeg about 20 KB; with this
/// and the time in the next batch, both start at once.
pub const DEFAULT_BURST_BYTES: u32 = 32 * 1024;
/// Largest `burst_bytes` accepted.
pub const MAX_BURST_BYTES: u32 = 1 << 20;

/// Errors from configuration and pipeline setup.
#[derive(Debug, thiserror::Error)]
pub enum Mp3Error {
    #[error("unsupported MP3 bitrate {0} kbit/s at 48 kHz (use 32-320 except 56)")]
    UnsupportedBitrate(u32),
    #[error("invalid mp3 config: {0}")]
    InvalidConfig(&'static str),
    #[error("LAME setup failed: {0}")]
    Lame(String),
    #[error("Opus decoder setup failed: {0}")]
    Opus(#[from] opus::Error),
    #[error("could not spawn mp3 thread: {0}")]
    Spawn(#[from] std::io::Error),
}

/// Per-stream MP3 settings.
#[derive(Clone, Debug)]
pub struct Mp3Config {
    /// CBR bitrate; MPEG-1 Layer III at 48 kHz.
    pub bitrate_kbps: u32,
    /// How much recent audio a new listener gets immediately, at least
    /// (the burst's time floor).
    pub burst_ms: u32,
    /// How many bytes of recent audio a new listener gets immediately, at
    /// least (MP3 only: what browsers and ffmpeg read before they play).
    pub burst_bytes: u32,
    /// Max batches (~200 ms each) a listener may lag before it is dropped.
    pub listener_queue_batches: usize,
}

impl Default for Mp3Config {
    fn default() -> Self {
        Self {
            bitrate_kbps: 128,
            burst_ms: 1000,
            burst_bytes: DEFAULT_BURST_BYTES,
            listener_queue_batches: 16,
        }
    }
}

impl Mp3Config {
    pub fn validate(&self) -> Result<(), Mp3Error> {
        self.lame_bitrate()?;
        if self.burst_ms > 60_000 {
            return Err(Mp3Error::InvalidConfig("burst_ms must be <= 60000"));
        }
        if self.burst_bytes > MAX_BURST_BYTES {
            return Err(Mp3Error::InvalidConfig("burst_bytes must be <= 1048576"));
        }
        if !(1..=4096).contains(&self.listener_queue_batches) {
            return Err(Mp3Error::InvalidConfig(
                "listener_queue_batches must be in 1..=4096",
            ));
        }
        Ok(())
    }

    /// The burst a new listener gets.
    pub(crate) fn burst(&self) -> Burst {
        Burst {
            ns: u64::from(self.burst_ms) * 1_000_000,
            bytes: u64::from(self.burst_bytes),
        }
    }

    /// The Opus history an idle stream keeps: its longest burst (the time
    /// floor or the bytes at this bitrate, plus one batch of rounding) or
    /// the first-words window, whichever is longer, and a second more.
    pub(crate) fn history_ms(&self) -> u64 {
        let bytes_ms = u64::from(self.burst_bytes) * 8 / u64::from(self.bitrate_kbps.max(1));
        let burst_ms = u64::from(self.burst_ms).max(bytes_ms) + batch::BATCH_NS / 1_000_000;
        burst_ms.max(FIRST_WORDS_NS / 1_000_000) + 1000
    }

    /// Maps to LAME's bitrate enum. 8/16/24 kbit/s do not exist for MPEG-1
    /// (48 kHz), and 56 kbit/s is missing from the crate's enum.
    pub(crate) fn lame_bitrate(&self) -> Result<mp3lame_encoder::Bitrate, Mp3Error> {
        use mp3lame_encoder::Bitrate as B;
        Ok(match self.bitrate_kbps {
            32 => B::Kbps32,
            40 => B::Kbps40,
            48 => B::Kbps48,
            64 => B::Kbps64,
            80 => B::Kbps80,
            96 => B::Kbps96,
            112 => B::Kbps112,
            128 => B::Kbps128,
            160 => B::Kbps160,
            192 => B::Kbps192,
            224 => B::Kbps224,
            256 => B::Kbps256,
            320 => B::Kbps320,
            other => return Err(Mp3Error::UnsupportedBitrate(other)),
        })
    }
}

/// One Opus RTP packet handed from the relay to the pipeline thread.
#[derive(Clone)]
pub(crate) struct OpusPacket {
    pub seq: u64,
    pub rtp_time: u64,
    pub payload: Arc<[u8]>,
}

/// Held by the media relay; feeds Opus packets to an output without ever
/// blocking. Dropping it ends the stream: a running pipeline (MP3 or Ogg)
/// drains what is queued, publishes the last batches (flushing LAME, or
/// the last page), closes the [`Fanout`] and exits; an idle one's fan-out
/// closes at once. The drop does not wait for that (it never blocks the
/// relay).
pub struct PacketSink {
    target: Target,
    counters: Arc<PipelineCounters>,
}

/// Where a sink's packets go.
enum Target {
    /// A thread's bounded queue.
    Queue(SyncSender<OpusPacket>),
    /// A lazy MP3 output: its history, and its pipeline's queue while it runs.
    Demand(Arc<Demand>),
}

impl std::fmt::Debug for PacketSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketSink").finish_non_exhaustive()
    }
}

impl PacketSink {
    /// Hands one packet on; if a queue is full (or its thread gone) the
    /// packet is dropped and counted.
    pub fn push(&self, seq: u64, rtp_time: u64, payload: Arc<[u8]>) {
        let packet = OpusPacket {
            seq,
            rtp_time,
            payload,
        };
        match &self.target {
            Target::Queue(tx) => match tx.try_send(packet) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    bump(&self.counters.packets_dropped_queue_full, 1);
                }
            },
            Target::Demand(demand) => demand.push(packet),
        }
    }

    /// Packets dropped because the queue was full or the pipeline had stopped.
    pub fn dropped_packets(&self) -> u64 {
        self.counters
            .packets_dropped_queue_full
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A sink into `tx` that counts what it drops in `counters`.
    pub(crate) fn new(tx: SyncSender<OpusPacket>, counters: Arc<PipelineCounters>) -> Self {
        Self {
            target: Target::Queue(tx),
            counters,
        }
    }

    /// The lazy output behind this sink.
    #[cfg(test)]
    pub(crate) fn demand(&self) -> Option<Arc<Demand>> {
        match &self.target {
            Target::Demand(demand) => Some(Arc::clone(demand)),
            Target::Queue(_) => None,
        }
    }
}

impl Drop for PacketSink {
    fn drop(&mut self) {
        if let Target::Demand(demand) = &self.target {
            demand.end();
        }
    }
}

/// Sets up the MP3 output of one stream, or reports why it cannot: its
/// [`Fanout`] (idle) and the sink the relay feeds. No thread runs and
/// nothing is decoded until the first listener joins.
pub fn try_start(
    stream_id: &str,
    config: Mp3Config,
) -> Result<(PacketSink, Arc<Fanout>), Mp3Error> {
    config.validate()?;
    let make: pipeline::MakeOutput = Box::new(pipeline::mp3_output);
    Ok(start_lazy(stream_id, Format::Mp3, None, config, make))
}

/// Sets up a lazy output of `format` (MP3, or Ogg/Opus): its idle
/// [`Fanout`] (whose listeners each first get `preamble`) and the sink the
/// relay feeds, which keeps the stream's recent packets until the first
/// listener starts a thread running `make`'s output.
pub(crate) fn start_lazy(
    stream_id: &str,
    format: Format,
    preamble: Option<Preamble>,
    config: Mp3Config,
    make: pipeline::MakeOutput,
) -> (PacketSink, Arc<Fanout>) {
    let counters = Arc::new(PipelineCounters::default());
    let fanout = Fanout::lazy(stream_id, format, preamble, &config, Arc::clone(&counters));
    let demand = Demand::new(config, Arc::clone(&fanout), Arc::clone(&counters), make);
    fanout.set_demand(&demand);
    let sink = PacketSink {
        target: Target::Demand(demand),
        counters,
    };
    (sink, fanout)
}

/// Sets up the MP3 output of one stream (see [`try_start`]); the first
/// listener starts ONE thread `mp3-<stream_id>` owning the Opus decoder and
/// LAME encoder.
///
/// If the configuration is invalid the error is logged, the returned
/// [`Fanout`] is already closed (listeners end at once) and the sink drops
/// every packet. Use [`try_start`] to handle the error instead.
pub fn start(stream_id: &str, config: Mp3Config) -> (PacketSink, Arc<Fanout>) {
    match try_start(stream_id, config.clone()) {
        Ok(started) => started,
        Err(err) => {
            tracing::error!(stream_id, error = %err, "mp3 pipeline failed to start");
            let counters = Arc::new(PipelineCounters::default());
            let fanout = Fanout::new(stream_id, &config, Arc::clone(&counters));
            fanout.close();
            let (tx, _rx) = mpsc::sync_channel(1);
            (PacketSink::new(tx, counters), fanout)
        }
    }
}

// The relay moves these across threads.
const _: () = {
    const fn check<T: Send + Sync>() {}
    check::<PacketSink>();
    check::<Fanout>();
};
