//! Live Opus → MP3 transcoding for one stream, fanned out to many HTTP
//! listeners. Owns the public entry point [`start`], the configuration
//! ([`Mp3Config`]) and the non-blocking [`PacketSink`] the media relay feeds.
//!
//! Per stream there is exactly one `mp3-<stream_id>` thread that decodes Opus
//! once and encodes MP3 once (`pipeline.rs`); its output is shared by every
//! listener through [`Fanout`] as refcounted ~200 ms batches (`batch.rs`) in
//! a ring (`ring.rs`). Async listeners read the ring (`listener.rs`);
//! listener sockets handed over after their response head are written by one
//! `mp3w-<stream_id>` thread per stream (`writer.rs`). The fan-out, ring,
//! batches, listeners and writer are format-neutral and also carry the
//! Ogg/Opus output ([`crate::ogg_opus`]). Imports go one way:
//! fanout → listener, writer → ring → batch, counters.

pub mod batch;
pub mod counters;
pub mod decode;
pub mod encode;
pub mod fanout;
pub mod frames;
pub mod gap;
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

use crate::liveness::Liveness;

/// Opus sample rate used throughout (RTP clock rate of Opus).
pub const SAMPLE_RATE: u32 = 48_000;
/// Bound of the packet queue between the relay and the pipeline thread.
pub const PACKET_QUEUE: usize = 512;

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
    /// How much recent audio a new listener gets immediately.
    pub burst_ms: u32,
    /// Max batches (~200 ms each) a listener may lag before it is dropped.
    pub listener_queue_batches: usize,
}

impl Default for Mp3Config {
    fn default() -> Self {
        Self {
            bitrate_kbps: 128,
            burst_ms: 1000,
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
        if !(1..=4096).contains(&self.listener_queue_batches) {
            return Err(Mp3Error::InvalidConfig(
                "listener_queue_batches must be in 1..=4096",
            ));
        }
        Ok(())
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
pub(crate) struct OpusPacket {
    pub seq: u64,
    pub rtp_time: u64,
    pub payload: Arc<[u8]>,
}

/// Held by the media relay; feeds Opus packets to the pipeline without ever
/// blocking. Dropping it ends the stream: the queue disconnects, so the
/// thread drains what is queued, flushes LAME, publishes the last frames,
/// closes the [`Fanout`] and exits. The drop does not wait for that (it never
/// blocks the relay).
pub struct PacketSink {
    tx: SyncSender<OpusPacket>,
    counters: Arc<PipelineCounters>,
}

impl std::fmt::Debug for PacketSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketSink").finish_non_exhaustive()
    }
}

impl PacketSink {
    /// Queues one packet; if the queue is full (or the pipeline is gone) the
    /// packet is dropped and counted.
    pub fn push(&self, seq: u64, rtp_time: u64, payload: Arc<[u8]>) {
        let packet = OpusPacket {
            seq,
            rtp_time,
            payload,
        };
        match self.tx.try_send(packet) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                bump(&self.counters.packets_dropped_queue_full, 1);
            }
        }
    }

    /// Packets dropped because the queue was full or the pipeline had stopped.
    pub fn dropped_packets(&self) -> u64 {
        self.counters
            .packets_dropped_queue_full
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl PacketSink {
    /// A sink into `tx` that counts what it drops in `counters`.
    pub(crate) fn new(tx: SyncSender<OpusPacket>, counters: Arc<PipelineCounters>) -> Self {
        Self { tx, counters }
    }
}

/// Starts the pipeline for one stream, or reports why it cannot start.
pub fn try_start(
    stream_id: &str,
    config: Mp3Config,
) -> Result<(PacketSink, Arc<Fanout>), Mp3Error> {
    config.validate()?;
    let counters = Arc::new(PipelineCounters::default());
    let decoder = decode::OpusDecode::new(Arc::clone(&counters))?;
    let encoder = encode::Mp3Encode::new(&config, Arc::clone(&counters))?;
    let fanout = Fanout::new(stream_id, &config, Arc::clone(&counters));
    let (tx, rx) = mpsc::sync_channel(PACKET_QUEUE);
    let thread_fanout = Arc::clone(&fanout);
    std::thread::Builder::new()
        .name(format!("mp3-{stream_id}"))
        .spawn(move || {
            let _watch = Liveness::process().watch_for_panic("an MP3 pipeline thread");
            pipeline::run(rx, decoder, encoder, thread_fanout)
        })?;
    Ok((PacketSink { tx, counters }, fanout))
}

/// Starts the pipeline for one stream: spawns ONE thread `mp3-<stream_id>`
/// owning the Opus decoder and LAME encoder.
///
/// If the pipeline cannot start (invalid config, codec or thread creation
/// failure) the error is logged, the returned [`Fanout`] is already closed
/// (listeners end at once) and the sink drops every packet. Use
/// [`try_start`] to handle the error instead.
pub fn start(stream_id: &str, config: Mp3Config) -> (PacketSink, Arc<Fanout>) {
    match try_start(stream_id, config.clone()) {
        Ok(started) => started,
        Err(err) => {
            tracing::error!(stream_id, error = %err, "mp3 pipeline failed to start");
            let counters = Arc::new(PipelineCounters::default());
            let fanout = Fanout::new(stream_id, &config, Arc::clone(&counters));
            fanout.close();
            let (tx, _rx) = mpsc::sync_channel(1);
            (PacketSink { tx, counters }, fanout)
        }
    }
}

// The relay moves these across threads.
const _: () = {
    const fn check<T: Send + Sync>() {}
    check::<PacketSink>();
    check::<Fanout>();
};
