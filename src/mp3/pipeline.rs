//! The per-stream thread body: owns the receive loop that drives
//! decode → encode → publish (coalescing bursts of batches from long filled
//! gaps), and the end-of-stream sequence (drain, flush LAME, publish the
//! remainder, close the fan-out). The Ogg output's thread reuses its
//! publishing and closing.

use std::sync::mpsc::Receiver;
use std::sync::Arc;

use super::batch::{coalesce, Batch};
use super::decode::OpusDecode;
use super::encode::Mp3Encode;
use super::fanout::Fanout;
use super::OpusPacket;

/// Closes the fan-out however the thread exits (even by panic), so listener
/// bodies always end.
pub(crate) struct CloseOnDrop(pub(crate) Arc<Fanout>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

pub(crate) fn run(
    rx: Receiver<OpusPacket>,
    mut decoder: OpusDecode,
    mut encoder: Mp3Encode,
    fanout: Arc<Fanout>,
) {
    crate::priority::for_mp3_pipeline();
    let closer = CloseOnDrop(Arc::clone(&fanout));
    tracing::debug!(stream_id = fanout.stream_id(), "mp3 pipeline started");
    let max_batches = fanout.max_batches_per_packet();
    let mut pending: Vec<Batch> = Vec::new();
    // `recv` keeps returning queued packets after the sink is dropped and
    // fails only once the queue is empty and disconnected.
    while let Ok(packet) = rx.recv() {
        decoder.packet(packet.seq, packet.rtp_time, &packet.payload, &mut |pcm| {
            encoder.encode(pcm, &mut |batch| pending.push(batch))
        });
        publish(&fanout, &mut pending, max_batches);
    }
    encoder.finish(&mut |batch| pending.push(batch));
    publish(&fanout, &mut pending, max_batches);
    drop(closer);
    tracing::debug!(
        stream_id = fanout.stream_id(),
        counters = ?fanout.counters(),
        "mp3 pipeline finished"
    );
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
