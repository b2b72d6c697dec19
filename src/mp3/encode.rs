//! MP3 side of the pipeline: owns the single LAME encoder of a stream (mono,
//! 48 kHz in/out, CBR, no Xing/LAME tag, no ID3), the [`FrameSplitter`] that
//! re-frames LAME's output, and the [`Batcher`] that groups frames into
//! ~200 ms batches for publishing.

use std::num::NonZeroU32;
use std::sync::Arc;

use mp3lame_encoder::{Builder, Encoder, FlushGap, Mode, MonoPcm, Quality};

use super::batch::{Batch, Batcher};
use super::counters::{bump, PipelineCounters};
use super::frames::FrameSplitter;
use super::{Mp3Config, Mp3Error, SAMPLE_RATE};

/// PCM is fed to LAME in pieces of at most this many samples (100 ms), which
/// bounds the output buffer.
const ENCODE_CHUNK: usize = 4800;

/// Builds the LAME encoder for `config` (validated bitrate, mono, 48 kHz).
pub fn build_lame(config: &Mp3Config) -> Result<Encoder, Mp3Error> {
    let bitrate = config.lame_bitrate()?;
    let err = |what: &str, e: mp3lame_encoder::BuildError| Mp3Error::Lame(format!("{what}: {e}"));
    let mut b = Builder::new().ok_or_else(|| Mp3Error::Lame("lame_init failed".into()))?;
    b.set_num_channels(1).map_err(|e| err("channels", e))?;
    b.set_sample_rate(SAMPLE_RATE)
        .map_err(|e| err("sample rate", e))?;
    b.set_output_sample_rate(NonZeroU32::new(SAMPLE_RATE))
        .map_err(|e| err("output sample rate", e))?;
    b.set_brate(bitrate).map_err(|e| err("bitrate", e))?;
    b.set_mode(Mode::Mono).map_err(|e| err("mode", e))?;
    b.set_quality(Quality::Ok).map_err(|e| err("quality", e))?;
    b.set_to_write_vbr_tag(false)
        .map_err(|e| err("vbr tag", e))?;
    b.build().map_err(|e| err("init params", e))
}

/// LAME + re-framing + batching for one stream.
pub struct Mp3Encode {
    lame: Encoder,
    out: Vec<u8>,
    splitter: FrameSplitter,
    batcher: Batcher,
    counters: Arc<PipelineCounters>,
}

impl Mp3Encode {
    pub(crate) fn new(
        config: &Mp3Config,
        counters: Arc<PipelineCounters>,
    ) -> Result<Self, Mp3Error> {
        Ok(Self {
            lame: build_lame(config)?,
            out: Vec::with_capacity(mp3lame_encoder::max_required_buffer_size(ENCODE_CHUNK)),
            splitter: FrameSplitter::new(),
            batcher: Batcher::default(),
            counters,
        })
    }

    /// Encodes PCM, calling `publish` for every completed ~200 ms batch.
    pub fn encode(&mut self, pcm: &[i16], publish: &mut dyn FnMut(Batch)) {
        for chunk in pcm.chunks(ENCODE_CHUNK) {
            self.out.clear();
            self.out
                .reserve(mp3lame_encoder::max_required_buffer_size(chunk.len()));
            if let Err(e) = self.lame.encode_to_vec(MonoPcm(chunk), &mut self.out) {
                bump(&self.counters.encode_errors, 1);
                tracing::warn!(error = %e, "LAME encode failed");
                continue;
            }
            self.drain(publish);
        }
    }

    /// Flushes LAME and publishes everything left, including the last
    /// partial batch.
    pub fn finish(mut self, publish: &mut dyn FnMut(Batch)) {
        self.out.clear();
        self.out
            .reserve(mp3lame_encoder::max_required_buffer_size(0));
        match self.lame.flush_to_vec::<FlushGap>(&mut self.out) {
            Ok(_) => self.drain(publish),
            Err(e) => {
                bump(&self.counters.encode_errors, 1);
                tracing::warn!(error = %e, "LAME flush failed");
            }
        }
        for frame in self.splitter.finish() {
            if let Some(batch) = self.batcher.push(&frame) {
                publish(batch);
            }
        }
        if let Some(batch) = self.batcher.flush() {
            publish(batch);
        }
        if self.splitter.skipped_bytes() > 0 {
            tracing::debug!(
                bytes = self.splitter.skipped_bytes(),
                "mp3 splitter skipped bytes"
            );
        }
    }

    fn drain(&mut self, publish: &mut dyn FnMut(Batch)) {
        if self.out.is_empty() {
            return;
        }
        self.splitter.push(&self.out);
        while let Some(frame) = self.splitter.next_frame() {
            if let Some(batch) = self.batcher.push(&frame) {
                publish(batch);
            }
        }
    }
}
