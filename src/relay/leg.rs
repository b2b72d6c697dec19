//! A receiver's outgoing leg: what its browser negotiated (SSRC, Opus payload
//! type, header-extension ids), its own sequence space ([`SeqMap`]), and its
//! SRTP context once DTLS has keyed it.

use str0m::format::Codec;
use str0m::media::{MediaKind, Mid, Pt};
use str0m::rtp::{Extension, Ssrc};
use str0m::Rtc;

use super::srtp::{KeySlot, SrtpTx};

/// A receiver's first sequence number is random in `FIRST_SEQ_MIN ..
/// FIRST_SEQ_MIN + FIRST_SEQ_SPREAD`: below 2^16, so its first SRTP index has
/// a zero rollover counter (a browser cannot be told another one), but close
/// enough to the wrap that every receiver's counter rolls over within its
/// first 0.3-5 s. The rollover path is then exercised by every session (and
/// every test) instead of first after ~20 minutes of one.
const FIRST_SEQ_MIN: u16 = 0xff00;
const FIRST_SEQ_SPREAD: u16 = 0xf0;

/// The outgoing leg of a negotiated receiver peer.
pub(super) struct Leg {
    pub ssrc: Ssrc,
    pub pt: Pt,
    /// Header extension ids the browser accepted: audio level, and MID with
    /// the m-line's value.
    pub audio_level_id: Option<u8>,
    pub mid_ext: Option<(u8, Mid)>,
    pub seq: SeqMap,
    pub keys: KeySlot,
    pub srtp: Option<SrtpTx>,
}

impl Leg {
    /// The leg of the audio m-line `mid`: its SSRC and the Opus payload type
    /// its browser accepted; `None` if no Opus was negotiated there.
    pub fn negotiated(rtc: &mut Rtc, mid: Mid, keys: KeySlot) -> Option<Leg> {
        let pt = negotiated_opus_pt(rtc, mid)?;
        let exts = rtc.media(mid)?.remote_extmap();
        let audio_level_id = exts.id_of(Extension::AudioLevel);
        let mid_ext = exts.id_of(Extension::RtpMid).map(|id| (id, mid));
        let ssrc = rtc.direct_api().stream_tx_by_mid(mid, None)?.ssrc();
        let first = FIRST_SEQ_MIN + rand::random::<u16>() % FIRST_SEQ_SPREAD;
        Some(Leg {
            ssrc,
            pt,
            audio_level_id,
            mid_ext,
            seq: SeqMap::new(first),
            keys,
            srtp: None,
        })
    }
}

/// The Opus payload type negotiated on the audio m-line `mid`, if any.
pub fn negotiated_opus_pt(rtc: &Rtc, mid: Mid) -> Option<Pt> {
    let media = rtc.media(mid)?;
    if media.kind() != MediaKind::Audio {
        return None;
    }
    let pts = media.remote_pts();
    rtc.codec_config()
        .params()
        .iter()
        .find(|p| p.spec().codec == Codec::Opus && pts.contains(&p.pt()))
        .map(|p| p.pt())
}

/// A forward step of the sender's sequence number up to this many is a gap
/// (lost packets): the receiver's sequence keeps it, so its jitter buffer
/// sees the loss. RFC 3550 Appendix A.1's `MAX_DROPOUT`.
const MAX_DROPOUT: i32 = 3000;
/// A backward step up to this many is a late (reordered) packet: it is sent
/// with its place in the receiver's sequence. RFC 3550's `MAX_MISORDER`.
const MAX_MISORDER: i32 = 100;

/// Maps a sender's 16-bit RTP sequence numbers to one receiver's extended
/// sequence numbers (its SRTP index: rollover counter << 16 | sequence).
///
/// What a receiver sees, whatever the sender does: its sequence moves on by
/// the sender's step while that step is a plausible gap or reordering
/// (`-MAX_MISORDER ..= MAX_DROPOUT`), and otherwise (a sender that restarted
/// its sequence, or jumped by 2^15 or more) it is re-based: the packet gets
/// the receiver's next number, and the sender's new numbers are followed from
/// there. So a receiver's sequence never steps by more than `MAX_DROPOUT`
/// forward or `MAX_MISORDER` back, its browser's rollover-counter guess (RFC
/// 3711 §3.3.1, which assumes steps below 2^15) stays right, and no packet is
/// dropped here: one older than the receiver's first is sent in its place
/// before it (the first number is far from zero).
#[derive(Debug, Clone)]
pub(super) struct SeqMap {
    /// The receiver's first number, until the first packet.
    first: u64,
    /// The sender's highest sequence number so far, and its receiver number.
    highest: Option<(u16, u64)>,
}

impl SeqMap {
    pub fn new(first: u16) -> Self {
        SeqMap {
            first: u64::from(first),
            highest: None,
        }
    }

    /// The receiver's extended sequence number for the sender's `seq`.
    pub fn map(&mut self, seq: u16) -> u64 {
        let Some((seq_high, out_high)) = self.highest else {
            self.highest = Some((seq, self.first));
            return self.first;
        };
        // The step in 16-bit sequence space: -2^15 ..= 2^15 - 1.
        let step = i32::from(seq.wrapping_sub(seq_high) as i16);
        if (1..=MAX_DROPOUT).contains(&step) {
            let out = out_high + step as u64;
            self.highest = Some((seq, out));
            out
        } else if (-MAX_MISORDER..=0).contains(&step) {
            out_high - step.unsigned_abs() as u64
        } else {
            // A jump: re-base so the receiver's sequence stays continuous.
            let out = out_high + 1;
            self.highest = Some((seq, out));
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receiver's guess of the SRTP index of a packet with sequence `seq`,
    /// given the highest index it has seen (RFC 3711 §3.3.1, as libsrtp and
    /// browsers do it).
    fn receiver_guess(highest: u64, seq: u16) -> u64 {
        let roc = highest >> 16;
        let s_l = (highest & 0xffff) as i64;
        let seq = i64::from(seq);
        let v = if s_l < 0x8000 {
            if seq - s_l > 0x8000 {
                roc.wrapping_sub(1)
            } else {
                roc
            }
        } else if s_l - 0x8000 > seq {
            roc + 1
        } else {
            roc
        };
        (v << 16) | seq as u64
    }

    /// Feeds a sender's sequence numbers; checks that the receiver could
    /// follow every one (its guessed index is ours) and returns ours.
    fn follow(first: u16, sender: &[u16]) -> Vec<u64> {
        let mut map = SeqMap::new(first);
        let mut highest: Option<u64> = None;
        let mut out = Vec::new();
        for &seq in sender {
            let index = map.map(seq);
            if let Some(h) = highest {
                assert_eq!(
                    receiver_guess(h, index as u16),
                    index,
                    "receiver loses track at sender seq {seq}"
                );
            }
            highest = Some(highest.map_or(index, |h| h.max(index)));
            out.push(index);
        }
        out
    }

    #[test]
    fn follows_the_sender_across_its_wrap_and_ours() {
        let sender: Vec<u16> = (0..600u32).map(|i| (65_300 + i) as u16).collect();
        let out = follow(0xff00, &sender);
        let expect: Vec<u64> = (0..600).map(|i| 0xff00 + i).collect();
        assert_eq!(out, expect);
        assert!(out.last().is_some_and(|i| i >> 16 == 1), "rolled over");
    }

    #[test]
    fn keeps_gaps_and_late_packets_in_place() {
        let out = follow(0xff00, &[100, 101, 105, 103, 106, 100 + 3000 + 6]);
        let b = 0xff00;
        assert_eq!(out, vec![b, b + 1, b + 5, b + 3, b + 6, b + 3006]);
    }

    #[test]
    fn a_sender_that_jumps_is_rebased() {
        // A jump of more than 2^15 (a restarted sender), one beyond the
        // dropout limit, and a backwards restart: the receiver's sequence
        // goes on by one each time, and never loses its rollover counter.
        let mut sender = vec![1000, 1001, 1002];
        sender.extend(40_000..40_300);
        sender.extend([50_000, 50_001]);
        sender.extend((0..400u32).map(|i| (65_400 + i) as u16));
        sender.extend([7, 8]);
        let out = follow(0xfff0, &sender);
        let expect: Vec<u64> = (0..sender.len() as u64).map(|i| 0xfff0 + i).collect();
        assert_eq!(out, expect);
    }

    #[test]
    fn a_packet_older_than_the_first_is_sent_before_it() {
        let out = follow(0xff00, &[500, 498, 501, 401]);
        assert_eq!(out, vec![0xff00, 0xff00 - 2, 0xff01, 0xff00 - 99]);
    }
}
