//! The forward path: one sender RTP packet written to every receiver peer of
//! its stream.
//!
//! Per receiver, the copy is built here: the RTP header with the receiver's
//! SSRC, payload type, sequence number and header-extension ids, then one
//! SRTP protect with the keys [`super::srtp`] tapped from its DTLS handshake,
//! straight into the outbox. str0m is not touched per copy; it keeps running
//! the peer's ICE, DTLS and RTCP on its own timers.
//!
//! Until a peer's keys are known (or if its SRTP profile were one we do not
//! know), its copies go through str0m instead, in a single pass: `write_rtp`,
//! then a timeout at the same instant (str0m releases a written packet only
//! once a timeout has stamped it), then `poll_output` until the peer is idle.
//!
//! A stream with many receivers is split over [`workers`] threads (scoped,
//! one per chunk, for the duration of one packet): each chunk of peers is
//! borrowed by exactly one thread, and each thread batches its own datagrams
//! into its own [`Outbox`] on the shared socket. Small streams, the common
//! case with many streams, stay on the relay thread.

use std::cmp::Reverse;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use str0m::media::Pt;
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite, Ssrc};
use str0m::Input;

use super::outbox::Outbox;
use super::srtp::{tapped_provider, SrtpTx};
use super::{contained, drain, schedule, Leg, Peer, PeerId};

/// Receivers per thread below which a stream is not split.
const MIN_PER_WORKER: usize = 128;

/// How many threads may forward one packet: `configured`, or with 0 the
/// cores available, at most 4.
pub fn workers(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4)
}

/// How many chunks a stream of `receivers` is forwarded in.
pub fn chunks_for(receivers: usize, workers: usize) -> usize {
    (receivers / MIN_PER_WORKER).clamp(1, workers)
}

/// What every receiver's copy of one sender packet is built from.
pub struct Packet {
    seq_in: i64,
    rtp_time: u32,
    marker: bool,
    audio_level: Option<i8>,
    voice_activity: Option<bool>,
    payload: Arc<[u8]>,
    /// When the sender's datagram reached the media socket.
    arrived: Instant,
    /// One clock reading for the whole fan-out.
    now: Instant,
}

impl Packet {
    pub fn new(pkt: &RtpPacket, arrived: Instant, now: Instant) -> Self {
        Packet {
            seq_in: *pkt.seq_no as i64,
            rtp_time: pkt.header.timestamp,
            marker: pkt.header.marker,
            audio_level: pkt.header.ext_vals.audio_level,
            voice_activity: pkt.header.ext_vals.voice_activity,
            payload: pkt.payload.clone(),
            arrived,
            now,
        }
    }

    pub fn payload_len(&self) -> usize {
        self.payload.len()
    }
}

/// What forwarding to a set of receivers did, merged into the relay after.
#[derive(Default)]
pub struct Tally {
    /// Copies sent.
    pub sent: u64,
    /// Of those, copies protected by str0m (its keys were not tapped yet).
    pub by_str0m: u64,
    /// Peers whose str0m state failed; the relay closes them.
    pub failed: Vec<PeerId>,
    /// Timer-heap entries to add (a peer's wake-up moved earlier).
    pub timers: Vec<Reverse<(Instant, PeerId)>>,
}

/// Forwards `pkt` to one peer, datagrams into `out` (not flushed).
pub fn to_peer(peer: &mut Peer, pkt: &Packet, fd: RawFd, out: &mut Outbox, tally: &mut Tally) {
    match write_to(peer, pkt, fd, out) {
        Outcome::Sent => tally.sent += 1,
        Outcome::SentByStr0m => {
            schedule(peer, &mut tally.timers);
            tally.sent += 1;
            tally.by_str0m += 1;
        }
        Outcome::Skipped => {}
        Outcome::Failed => tally.failed.push(peer.id),
    }
}

/// Forwards `pkt` to each peer in `peers`, then flushes `out`.
fn to_peers<'a>(
    peers: impl IntoIterator<Item = &'a mut Peer>,
    pkt: &Packet,
    fd: RawFd,
    out: &mut Outbox,
) -> Tally {
    let mut tally = Tally::default();
    for peer in peers {
        to_peer(peer, pkt, fd, out, &mut tally);
    }
    out.flush(fd);
    tally
}

/// Forwards `pkt` to `peers` in `chunks` pieces, all but the first on scoped
/// threads with an outbox each; the first on this thread with `out`.
pub fn to_peers_parallel(
    peers: &mut [&mut Peer],
    chunks: usize,
    pkt: &Packet,
    fd: RawFd,
    out: &mut Outbox,
) -> Tally {
    let size = peers.len().div_ceil(chunks.max(1)).max(1);
    let mut parts = peers.chunks_mut(size);
    let Some(first) = parts.next() else {
        return Tally::default();
    };
    std::thread::scope(|s| {
        let helpers: Vec<_> = parts
            .map(|part| {
                std::thread::Builder::new()
                    .name("media-forward".into())
                    .spawn_scoped(s, move || {
                        let mut own = Outbox::default();
                        let tally = to_peers(part.iter_mut().map(|p| &mut **p), pkt, fd, &mut own);
                        (tally, own)
                    })
            })
            .collect();
        let mut tally = to_peers(first.iter_mut().map(|p| &mut **p), pkt, fd, out);
        for helper in helpers {
            // A thread that cannot be spawned leaves its chunk unserved for
            // this one packet; a panic inside str0m is contained per peer, so
            // a join error is not expected.
            let Ok(handle) = helper else {
                tracing::warn!("cannot spawn a forwarding thread");
                continue;
            };
            if let Ok((t, own)) = handle.join() {
                tally.sent += t.sent;
                tally.by_str0m += t.by_str0m;
                tally.failed.extend(t.failed);
                tally.timers.extend(t.timers);
                out.absorb_counts(&own);
            }
        }
        tally
    })
}

enum Outcome {
    Sent,
    SentByStr0m,
    Skipped,
    Failed,
}

fn write_to(peer: &mut Peer, pkt: &Packet, fd: RawFd, out: &mut Outbox) -> Outcome {
    if !peer.connected || peer.closing_since.is_some() {
        return Outcome::Skipped;
    }
    let Some(leg) = peer.leg.as_mut() else {
        return Outcome::Skipped;
    };
    let offset = *leg
        .seq_offset
        .get_or_insert(leg.seq_base as i64 - pkt.seq_in);
    let seq_out = pkt.seq_in + offset;
    if seq_out < 0 {
        // Older than this receiver's first packet (reordered): skip.
        return Outcome::Skipped;
    }
    if leg.srtp.is_none() {
        if let Some(keys) = leg.keys.get() {
            leg.srtp = SrtpTx::new(keys, &tapped_provider());
            tracing::debug!(peer = peer.id, profile = ?keys.profile(), known = leg.srtp.is_some(), "receiver SRTP keys tapped");
        }
    }
    if let (Some(dest), Some(_)) = (peer.media_to, leg.srtp.as_ref()) {
        // Contained like str0m's calls: a panic drops this peer, not the relay.
        let sealed = contained(peer, |p| {
            p.leg
                .as_mut()
                .and_then(|leg| protect(leg, pkt, seq_out as u64))
        });
        return match sealed {
            Some(Some(Ok(datagram))) => {
                out.push_forward(fd, dest, datagram, pkt.arrived);
                Outcome::Sent
            }
            Some(Some(Err(e))) => {
                tracing::debug!(peer = peer.id, error = %e, "srtp protect failed");
                Outcome::Failed
            }
            // Some(None) cannot happen (leg and keys checked above); None is a
            // contained panic.
            Some(None) | None => Outcome::Failed,
        };
    }
    let (ssrc, pt) = (leg.ssrc, leg.pt);
    let write = rtp_write(pkt, pt, seq_out as u64);
    let result = contained(peer, |p| write_and_send(p, ssrc, write, pkt.now, fd, out));
    match result {
        Some(Ok(true)) => Outcome::SentByStr0m,
        Some(Ok(false)) | None => Outcome::Skipped,
        Some(Err(e)) => {
            tracing::debug!(peer = peer.id, error = %e, "peer forward error");
            Outcome::Failed
        }
    }
}

/// The SRTP datagram of `pkt` for one receiver (`None` before its keys are
/// known); `index` is its extended sequence number in the receiver's
/// sequence space.
fn protect(
    leg: &mut Leg,
    pkt: &Packet,
    index: u64,
) -> Option<Result<Vec<u8>, str0m::crypto::CryptoError>> {
    let mut header = [0u8; MAX_HEADER];
    let len = write_header(&mut header, leg, pkt, index as u16);
    let ssrc = *leg.ssrc;
    let tx = leg.srtp.as_mut()?;
    Some(tx.protect(&header[..len], &pkt.payload, ssrc, index))
}

/// Fixed header (12) + extension header (4) + audio level (2) + MID (1 + 16),
/// padded to a multiple of four.
const MAX_HEADER: usize = 12 + 4 + 20;

/// Writes the RTP header of one receiver's copy (RFC 3550 §5.1) with the
/// one-byte header extensions it negotiated (RFC 8285); returns its length.
fn write_header(buf: &mut [u8; MAX_HEADER], leg: &Leg, pkt: &Packet, seq: u16) -> usize {
    let mut ext = [0u8; 20];
    let mut n = 0;
    if let (Some(id), Some(level)) = (leg.audio_level_id, pkt.audio_level) {
        let voice = if pkt.voice_activity == Some(true) {
            0x80
        } else {
            0
        };
        ext[0] = id << 4; // length field is len - 1 = 0
        ext[1] = voice | (level.unsigned_abs() & 0x7f);
        n = 2;
    }
    if let Some((id, mid)) = &leg.mid_ext {
        let value = mid.as_bytes();
        if (1..=16).contains(&value.len()) {
            ext[n] = (id << 4) | (value.len() as u8 - 1);
            ext[n + 1..n + 1 + value.len()].copy_from_slice(value);
            n += 1 + value.len();
        }
    }
    let words = n.div_ceil(4);
    buf[0] = if words > 0 { 0x90 } else { 0x80 };
    buf[1] = (u8::from(pkt.marker) << 7) | (*leg.pt & 0x7f);
    buf[2..4].copy_from_slice(&seq.to_be_bytes());
    buf[4..8].copy_from_slice(&pkt.rtp_time.to_be_bytes());
    buf[8..12].copy_from_slice(&leg.ssrc.to_be_bytes());
    if words == 0 {
        return 12;
    }
    buf[12..14].copy_from_slice(&[0xBE, 0xDE]);
    buf[14..16].copy_from_slice(&(words as u16).to_be_bytes());
    // Padding after the elements stays zero (RFC 8285 §4.2).
    buf[16..16 + n].copy_from_slice(&ext[..n]);
    16 + 4 * words
}

fn rtp_write(pkt: &Packet, pt: Pt, seq_out: u64) -> RtpWrite {
    let ext = ExtensionValues {
        audio_level: pkt.audio_level,
        voice_activity: pkt.voice_activity,
        ..Default::default()
    };
    RtpWrite::new(
        pt,
        seq_out.into(),
        pkt.rtp_time,
        pkt.arrived,
        pkt.payload.clone(),
    )
    .marker(pkt.marker)
    .ext_vals(ext)
}

fn write_and_send(
    p: &mut Peer,
    ssrc: Ssrc,
    write: RtpWrite,
    now: Instant,
    fd: RawFd,
    out: &mut Outbox,
) -> Result<bool, str0m::RtcError> {
    let mut api = p.rtc.direct_api();
    let Some(tx) = api.stream_tx(&ssrc) else {
        return Ok(false);
    };
    tx.write_rtp(write);
    p.rtc.handle_input(Input::Timeout(now))?;
    drain(p, fd, out, &mut Vec::new());
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_streams_stay_on_one_thread() {
        assert_eq!(chunks_for(0, 2), 1);
        assert_eq!(chunks_for(10, 2), 1);
        assert_eq!(chunks_for(2 * MIN_PER_WORKER - 1, 2), 1);
        assert_eq!(chunks_for(2 * MIN_PER_WORKER, 2), 2);
        assert_eq!(chunks_for(5000, 2), 2);
        assert_eq!(chunks_for(5000, 4), 4);
        assert_eq!(chunks_for(5000, 1), 1);
    }

    #[test]
    fn configured_workers_win() {
        assert_eq!(workers(3), 3);
        assert!((1..=4).contains(&workers(0)));
    }
}
