//! The forward path: one sender RTP packet written to every receiver peer of
//! its stream.
//!
//! Per receiver, the copy is built here: the RTP header with the receiver's
//! SSRC, payload type, sequence number (its [`super::leg::SeqMap`]) and
//! header-extension ids, then one SRTP protect with the keys
//! [`super::srtp`] tapped from its DTLS handshake, straight into the outbox
//! (a push leg's copy straight out of its own socket).
//! str0m is not touched per copy; it keeps running the peer's ICE, DTLS and
//! RTCP on its own timers.
//!
//! Until a peer's keys are known (or if its SRTP profile were one we do not
//! know), its copies go through str0m instead, in a single pass: `write_rtp`,
//! then a timeout at the same instant (str0m releases a written packet only
//! once a timeout has stamped it), then `poll_output` until the peer is idle.
//!
//! A stream with many receivers is split into chunks, forwarded at once on
//! the relay thread and the threads of a [`ForwardPool`] (started once, kept
//! for the relay's life): each chunk of peers is borrowed by exactly one
//! thread, and each thread batches its own datagrams into its own
//! [`Outbox`] on the shared socket. Small streams, the common case with many
//! streams, stay on the relay thread.

use std::sync::Arc;
use std::time::Instant;

use str0m::media::Pt;
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite, Ssrc};
use str0m::Input;

use super::drain::drain;
use super::handle::PeerId;
use super::leg::Leg;
use super::outbox::Outbox;
use super::peer::Peer;
use super::srtp::{tapped_provider, SrtpTx};

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
fn chunks_for(receivers: usize, workers: usize) -> usize {
    (receivers / MIN_PER_WORKER).clamp(1, workers)
}

/// What every receiver's copy of one sender packet is built from.
pub(super) struct ForwardedPacket {
    /// The sender's RTP sequence number (16 bits, as on the wire).
    seq: u16,
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

impl ForwardedPacket {
    pub fn new(pkt: &RtpPacket, arrived: Instant, now: Instant) -> Self {
        ForwardedPacket {
            seq: *pkt.seq_no as u16,
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

    /// A packet with sequence number `seq`, as a sender's would be.
    #[cfg(test)]
    pub fn for_test(seq: u16, rtp_time: u32, payload: &[u8], at: Instant) -> Self {
        ForwardedPacket {
            seq,
            rtp_time,
            marker: false,
            audio_level: Some(-30),
            voice_activity: Some(true),
            payload: payload.into(),
            arrived: at,
            now: at,
        }
    }
}

/// What forwarding to a set of receivers did, merged into the relay after.
#[derive(Default)]
pub(super) struct Tally {
    /// Copies sent.
    pub sent: u64,
    /// Of those, copies protected by str0m (its keys were not tapped yet).
    pub by_str0m: u64,
    /// Peers whose str0m state failed; the relay closes them.
    pub failed: Vec<PeerId>,
    /// Timer-heap entries to add (a peer's wake-up moved earlier).
    pub timers: Vec<(Instant, PeerId)>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.sent += other.sent;
        self.by_str0m += other.by_str0m;
        self.failed.extend(other.failed);
        self.timers.extend(other.timers);
    }
}

/// Forwards `pkt` to each peer in `peers` (datagrams into `out`, flushed at
/// the end).
fn to_peers<'a>(
    peers: impl IntoIterator<Item = &'a mut Peer>,
    pkt: &ForwardedPacket,
    out: &mut Outbox,
) -> Tally {
    let mut tally = Tally::default();
    for peer in peers {
        to_peer(peer, pkt, out, &mut tally);
    }
    out.flush();
    tally
}

/// Forwards `pkt` to one peer, datagrams into `out` (not flushed).
pub(super) fn to_peer(peer: &mut Peer, pkt: &ForwardedPacket, out: &mut Outbox, tally: &mut Tally) {
    match write_to(peer, pkt, out) {
        SendResult::Sent => tally.sent += 1,
        SendResult::SentByStr0m => {
            peer.schedule(&mut tally.timers);
            tally.sent += 1;
            tally.by_str0m += 1;
        }
        SendResult::Skipped => {}
        SendResult::Failed => tally.failed.push(peer.id),
    }
}

/// The threads that forward the chunks of a large stream besides the relay
/// thread, started once with the relay.
pub(super) struct ForwardPool {
    /// `None` with one worker (the relay thread alone), or if the threads
    /// could not be started.
    threads: Option<rayon::ThreadPool>,
    workers: usize,
}

impl ForwardPool {
    /// A pool for `workers` forwarding threads in all, the relay's included.
    pub fn new(workers: usize) -> Self {
        let workers = workers.max(1);
        let threads = if workers > 1 {
            rayon::ThreadPoolBuilder::new()
                .num_threads(workers - 1)
                .thread_name(|_| "media-forward".into())
                .build()
                .inspect_err(|e| tracing::warn!(error = %e, "no forwarding threads: forwarding on the relay thread only"))
                .ok()
        } else {
            None
        };
        let workers = if threads.is_some() { workers } else { 1 };
        ForwardPool { threads, workers }
    }

    /// How many chunks a stream of `receivers` is forwarded in.
    pub fn chunks_for(&self, receivers: usize) -> usize {
        chunks_for(receivers, self.workers)
    }

    /// Forwards `pkt` to `peers` in `chunks` pieces: the first on this thread
    /// into `out`, the others on the pool's threads, each into an outbox of
    /// its own (on the same socket) whose counts `out` absorbs.
    pub fn forward(
        &self,
        peers: &mut [&mut Peer],
        chunks: usize,
        pkt: &ForwardedPacket,
        out: &mut Outbox,
    ) -> Tally {
        let size = peers.len().div_ceil(chunks.max(1)).max(1);
        let mut parts = peers.chunks_mut(size);
        let first = parts.next().unwrap_or_default();
        let Some(threads) = &self.threads else {
            let mut tally = to_peers(first.iter_mut().map(|p| &mut **p), pkt, out);
            for part in parts {
                tally.merge(to_peers(part.iter_mut().map(|p| &mut **p), pkt, out));
            }
            return tally;
        };
        let mut rest: Vec<(&mut [&mut Peer], Outbox, Tally)> = parts
            .map(|part| (part, out.sibling(), Tally::default()))
            .collect();
        let mut tally = Tally::default();
        threads.in_place_scope(|scope| {
            for (part, own, tally) in rest.iter_mut() {
                scope
                    .spawn(move |_| *tally = to_peers(part.iter_mut().map(|p| &mut **p), pkt, own));
            }
            tally = to_peers(first.iter_mut().map(|p| &mut **p), pkt, out);
        });
        for (_, own, t) in rest {
            tally.merge(t);
            out.absorb(own);
        }
        tally
    }
}

/// How one receiver's copy went.
enum SendResult {
    Sent,
    SentByStr0m,
    Skipped,
    Failed,
}

fn write_to(peer: &mut Peer, pkt: &ForwardedPacket, out: &mut Outbox) -> SendResult {
    if !peer.connected || peer.closing_since.is_some() {
        return SendResult::Skipped;
    }
    let (id, media_to) = (peer.id, peer.media_to);
    let Some(leg) = peer.leg_mut() else {
        return SendResult::Skipped;
    };
    let index = leg.seq.map(pkt.seq);
    if leg.srtp.is_none() {
        if let Some(keys) = leg.keys.get() {
            leg.srtp = SrtpTx::new(keys, &tapped_provider());
            tracing::debug!(peer = id, profile = ?keys.profile(), known = leg.srtp.is_some(), "receiver SRTP keys tapped");
        }
    }
    match (media_to, leg.srtp.is_some()) {
        (Some(dest), true) => protect_and_send(peer, pkt, index, dest, out),
        _ => send_by_str0m(peer, pkt, index, out),
    }
}

/// Protects the copy with the relay's SRTP context and queues it.
fn protect_and_send(
    peer: &mut Peer,
    pkt: &ForwardedPacket,
    index: u64,
    dest: std::net::SocketAddr,
    out: &mut Outbox,
) -> SendResult {
    // Contained like str0m's calls: a panic drops this peer, not the relay.
    let sealed = peer.contained(|p| p.leg_mut().and_then(|leg| protect(leg, pkt, index)));
    match sealed {
        Some(Some(Ok(datagram))) if peer.media_over_tcp => {
            out.push_tcp(dest, datagram);
            SendResult::Sent
        }
        Some(Some(Ok(datagram))) if peer.own_socket.is_some() => {
            to_own_socket(peer, dest, &datagram)
        }
        Some(Some(Ok(datagram))) => {
            out.push_forward(dest, datagram, pkt.arrived);
            SendResult::Sent
        }
        Some(Some(Err(e))) => {
            tracing::debug!(peer = peer.id, error = %e, "srtp protect failed");
            SendResult::Failed
        }
        // Some(None) cannot happen (leg and keys checked by the caller);
        // None is a contained panic.
        Some(None) | None => SendResult::Failed,
    }
}

/// Sends a push leg's copy from its own socket, at once (a push leg is one
/// of a few per stream: no batching); a failed socket fails the leg.
fn to_own_socket(peer: &Peer, dest: std::net::SocketAddr, datagram: &[u8]) -> SendResult {
    let Some(own) = &peer.own_socket else {
        return SendResult::Skipped;
    };
    match own.send(dest, datagram) {
        Ok(()) => SendResult::Sent,
        Err(e) => {
            tracing::debug!(peer = peer.id, error = %e, "push socket send failed");
            SendResult::Failed
        }
    }
}

/// Hands the copy to the peer's str0m, which protects and sends it.
fn send_by_str0m(
    peer: &mut Peer,
    pkt: &ForwardedPacket,
    index: u64,
    out: &mut Outbox,
) -> SendResult {
    let Some(leg) = peer.leg_mut() else {
        return SendResult::Skipped;
    };
    let (ssrc, pt) = (leg.ssrc, leg.pt);
    let write = rtp_write(pkt, pt, index);
    match peer.contained(|p| write_and_send(p, ssrc, write, pkt.now, out)) {
        Some(Ok(true)) => SendResult::SentByStr0m,
        Some(Ok(false)) | None => SendResult::Skipped,
        Some(Err(e)) => {
            tracing::debug!(peer = peer.id, error = %e, "peer forward error");
            SendResult::Failed
        }
    }
}

/// The SRTP datagram of `pkt` for one receiver (`None` before its keys are
/// known); `index` is its extended sequence number in the receiver's
/// sequence space.
fn protect(
    leg: &mut Leg,
    pkt: &ForwardedPacket,
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
fn write_header(buf: &mut [u8; MAX_HEADER], leg: &Leg, pkt: &ForwardedPacket, seq: u16) -> usize {
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

fn rtp_write(pkt: &ForwardedPacket, pt: Pt, seq_out: u64) -> RtpWrite {
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
    out: &mut Outbox,
) -> Result<bool, str0m::RtcError> {
    let mut api = p.rtc.direct_api();
    let Some(tx) = api.stream_tx(&ssrc) else {
        return Ok(false);
    };
    tx.write_rtp(write);
    p.rtc.handle_input(Input::Timeout(now))?;
    drain(p, out, &mut Vec::new());
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
