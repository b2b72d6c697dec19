//! MPEG audio (Layer III) frame parsing: owns the 4-byte header parser and
//! [`FrameSplitter`], which turns LAME's arbitrarily chunked output into whole,
//! self-delimited MP3 frames with their durations.

use bytes::{Buf, Bytes, BytesMut};

/// Largest possible Layer III frame (MPEG-1, 320 kbit/s at 32 kHz, padded) is
/// 1441 bytes; anything buffered beyond this bound without producing a frame is
/// garbage and gets discarded.
pub const MAX_FRAME_LEN: usize = 1441;

/// Hard cap on bytes the splitter keeps buffered between calls.
const MAX_BUFFERED: usize = 64 * 1024;

/// MPEG audio version signalled in a frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MpegVersion {
    /// MPEG-1 (32, 44.1, 48 kHz)
    Mpeg1,
    /// MPEG-2 LSF (16, 22.05, 24 kHz)
    Mpeg2,
    /// MPEG-2.5 (8, 11.025, 12 kHz)
    Mpeg25,
}

/// A parsed, valid Layer III frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: MpegVersion,
    pub bitrate_kbps: u32,
    pub sample_rate: u32,
    pub padding: bool,
    /// Total frame length in bytes, header included.
    pub frame_len: usize,
    /// PCM samples (per channel) the frame decodes to.
    pub samples: u32,
}

impl FrameHeader {
    /// Duration of the frame in nanoseconds.
    pub fn duration_ns(&self) -> u64 {
        u64::from(self.samples) * 1_000_000_000 / u64::from(self.sample_rate)
    }

    /// True if `other` can follow `self` in the same stream.
    fn compatible(&self, other: &FrameHeader) -> bool {
        self.version == other.version && self.sample_rate == other.sample_rate
    }
}

const BITRATES_V1_L3: [u32; 15] = [
    0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320,
];
const BITRATES_V2_L3: [u32; 15] = [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160];

/// Parses a 4-byte MPEG audio header. Only Layer III with a concrete
/// (non-free, non-reserved) bitrate and sample rate is accepted.
pub fn parse_header(h: [u8; 4]) -> Option<FrameHeader> {
    if h[0] != 0xFF || h[1] & 0xE0 != 0xE0 {
        return None;
    }
    let version = match (h[1] >> 3) & 0b11 {
        0b00 => MpegVersion::Mpeg25,
        0b10 => MpegVersion::Mpeg2,
        0b11 => MpegVersion::Mpeg1,
        _ => return None,
    };
    if (h[1] >> 1) & 0b11 != 0b01 {
        return None; // not Layer III
    }
    let bitrate_index = usize::from(h[2] >> 4);
    if bitrate_index == 0 || bitrate_index == 15 {
        return None;
    }
    let sr_index = usize::from((h[2] >> 2) & 0b11);
    if sr_index == 3 {
        return None;
    }
    if h[3] & 0b11 == 0b10 {
        return None; // reserved emphasis
    }
    let padding = (h[2] >> 1) & 1 == 1;
    let (bitrate_kbps, base_rate, coeff, samples) = match version {
        MpegVersion::Mpeg1 => (
            BITRATES_V1_L3[bitrate_index],
            [44_100, 48_000, 32_000],
            144,
            1152,
        ),
        MpegVersion::Mpeg2 => (
            BITRATES_V2_L3[bitrate_index],
            [22_050, 24_000, 16_000],
            72,
            576,
        ),
        MpegVersion::Mpeg25 => (
            BITRATES_V2_L3[bitrate_index],
            [11_025, 12_000, 8_000],
            72,
            576,
        ),
    };
    let sample_rate = base_rate[sr_index];
    let frame_len = (coeff * bitrate_kbps * 1000 / sample_rate) as usize + usize::from(padding);
    Some(FrameHeader {
        version,
        bitrate_kbps,
        sample_rate,
        padding,
        frame_len,
        samples,
    })
}

fn header_at(buf: &[u8], pos: usize) -> Option<FrameHeader> {
    let h = buf.get(pos..pos + 4)?;
    parse_header([h[0], h[1], h[2], h[3]])
}

/// One whole MP3 frame.
#[derive(Clone, Debug)]
pub struct Mp3Frame {
    pub data: Bytes,
    pub header: FrameHeader,
}

/// Reassembles whole MPEG audio frames from arbitrary byte chunks.
///
/// While locked onto a stream, a frame is emitted as soon as it is complete.
/// When (re)acquiring sync, a candidate header is only trusted once the header
/// of the following frame is also visible and compatible, so stray `0xFFE`
/// patterns in garbage are skipped. Memory is bounded by `MAX_BUFFERED`.
#[derive(Debug, Default)]
pub struct FrameSplitter {
    buf: BytesMut,
    synced: bool,
    skipped: u64,
}

impl FrameSplitter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a chunk of encoder output. Call [`next_frame`](Self::next_frame)
    /// until it returns `None` after each push.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
        if self.buf.len() > MAX_BUFFERED {
            // The caller is not draining or the input is not MP3: keep only
            // what could still start a frame.
            let excess = self.buf.len() - MAX_FRAME_LEN;
            self.discard(excess);
        }
    }

    /// Next whole frame, or `None` if more input is needed.
    pub fn next_frame(&mut self) -> Option<Mp3Frame> {
        self.next_inner(false)
    }

    /// End of input: returns the remaining complete frames (accepting a final
    /// frame without a following header) and discards any truncated tail,
    /// whose size is added to [`skipped_bytes`](Self::skipped_bytes).
    pub fn finish(&mut self) -> Vec<Mp3Frame> {
        let mut out = Vec::new();
        while let Some(f) = self.next_inner(true) {
            out.push(f);
        }
        let rest = self.buf.len();
        self.discard(rest);
        out
    }

    /// Bytes currently buffered (an incomplete frame or unsynced data).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Total bytes thrown away as garbage or truncated frames.
    pub fn skipped_bytes(&self) -> u64 {
        self.skipped
    }

    fn discard(&mut self, n: usize) {
        if n > 0 {
            self.buf.advance(n);
            self.skipped += n as u64;
            self.synced = false;
        }
    }

    fn next_inner(&mut self, at_end: bool) -> Option<Mp3Frame> {
        loop {
            let Some(pos) = self.find_sync() else {
                // Keep the last 3 bytes: they may be the start of a header.
                let keep = if at_end { 0 } else { 3.min(self.buf.len()) };
                let n = self.buf.len() - keep;
                self.discard(n);
                return None;
            };
            self.discard(pos);
            let header = header_at(&self.buf, 0)?;
            let len = header.frame_len;
            if self.buf.len() < len {
                return None;
            }
            if !self.synced && !at_end {
                if self.buf.len() < len + 4 {
                    return None; // wait for the following header to confirm
                }
                match header_at(&self.buf, len) {
                    Some(next) if header.compatible(&next) => {}
                    _ => {
                        self.discard(1); // false sync
                        continue;
                    }
                }
            }
            self.synced = true;
            let data = self.buf.split_to(len).freeze();
            return Some(Mp3Frame { data, header });
        }
    }

    fn find_sync(&self) -> Option<usize> {
        let b = &self.buf;
        (0..b.len().saturating_sub(3)).find(|&i| b[i] == 0xFF && header_at(b, i).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_128k_48k_mono() {
        // MPEG-1 Layer III, no CRC, 128 kbit/s, 48 kHz, no padding, mono.
        let h = parse_header([0xFF, 0xFB, 0x94, 0xC4]).expect("valid");
        assert_eq!(h.version, MpegVersion::Mpeg1);
        assert_eq!(h.bitrate_kbps, 128);
        assert_eq!(h.sample_rate, 48_000);
        assert_eq!(h.frame_len, 384);
        assert_eq!(h.samples, 1152);
        assert_eq!(h.duration_ns(), 24_000_000);
        let p = parse_header([0xFF, 0xFB, 0x92, 0xC4]).expect("valid"); // 44.1 kHz, padded
        assert_eq!(p.frame_len, 144 * 128_000 / 44_100 + 1);
        let m2 = parse_header([0xFF, 0xF3, 0x84, 0xC4]).expect("valid"); // MPEG-2, 64k, 24 kHz
        assert_eq!((m2.samples, m2.frame_len), (576, 72 * 64_000 / 24_000));
    }

    #[test]
    fn header_rejects_invalid() {
        assert!(parse_header([0xFF, 0xFD, 0x94, 0xC4]).is_none()); // layer II
        assert!(parse_header([0xFF, 0xFB, 0xF4, 0xC4]).is_none()); // bad bitrate
        assert!(parse_header([0xFF, 0xFB, 0x04, 0xC4]).is_none()); // free format
        assert!(parse_header([0xFF, 0xFB, 0x9C, 0xC4]).is_none()); // reserved rate
        assert!(parse_header([0xFF, 0xEB, 0x94, 0xC4]).is_none()); // reserved version
        assert!(parse_header([0xFE, 0xFB, 0x94, 0xC4]).is_none()); // no sync
    }

    use crate::mp3::encode::build_lame;
    use crate::mp3::Mp3Config;
    use mp3lame_encoder::{FlushGap, MonoPcm};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// `secs` of a 440 Hz sine through the real LAME encoder (pipeline config).
    fn lame_sine(secs: usize, bitrate_kbps: u32) -> Vec<u8> {
        let cfg = Mp3Config {
            bitrate_kbps,
            ..Mp3Config::default()
        };
        let mut lame = build_lame(&cfg).expect("lame");
        let pcm: Vec<i16> = (0..secs * 48_000)
            .map(|i| {
                let t = i as f64 / 48_000.0;
                (12_000.0 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()) as i16
            })
            .collect();
        let mut out = Vec::new();
        for chunk in pcm.chunks(1000) {
            out.reserve(mp3lame_encoder::max_required_buffer_size(chunk.len()));
            lame.encode_to_vec(MonoPcm(chunk), &mut out)
                .expect("encode");
        }
        out.reserve(7200);
        lame.flush_to_vec::<FlushGap>(&mut out).expect("flush");
        out
    }

    /// Feeds `input` in random 1..=700 byte chunks, draining after each push.
    fn split_random(input: &[u8], seed: u64) -> (Vec<Mp3Frame>, FrameSplitter) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut s = FrameSplitter::new();
        let mut frames = Vec::new();
        let mut pos = 0;
        while pos < input.len() {
            let n = rng.random_range(1..=700).min(input.len() - pos);
            s.push(&input[pos..pos + n]);
            pos += n;
            while let Some(f) = s.next_frame() {
                frames.push(f);
            }
            assert!(s.buffered() <= MAX_FRAME_LEN + 4 + 700, "bounded");
        }
        (frames, s)
    }

    fn check_frames(frames: &[Mp3Frame]) {
        for f in frames {
            let h = parse_header([f.data[0], f.data[1], f.data[2], f.data[3]]).expect("header");
            assert_eq!(h, f.header);
            assert_eq!(f.data.len(), h.frame_len);
            assert_eq!((h.sample_rate, h.samples), (48_000, 1152));
        }
    }

    fn concat(frames: &[Mp3Frame]) -> Vec<u8> {
        frames.iter().flat_map(|f| f.data.iter().copied()).collect()
    }

    #[test]
    fn lame_output_random_chunks_all_bytes_accounted() {
        for (bitrate, seeds) in [(128, 0..6u64), (32, 6..8), (320, 8..10)] {
            let mp3 = lame_sine(3, bitrate);
            assert!(mp3.len() > 1000);
            for seed in seeds {
                let (mut frames, mut s) = split_random(&mp3, seed);
                frames.extend(s.finish());
                check_frames(&frames);
                assert!(concat(&frames) == mp3, "bitrate {bitrate} seed {seed}");
                assert_eq!(s.skipped_bytes(), 0);
                assert!(frames.iter().all(|f| f.header.bitrate_kbps == bitrate));
                // 3 s of audio plus LAME's delay/padding: 125..=128 frames.
                assert!((125..=128).contains(&frames.len()), "{}", frames.len());
            }
        }
    }

    #[test]
    fn frames_are_emitted_while_streaming_not_only_at_finish() {
        let mp3 = lame_sine(2, 128);
        let (frames, s) = split_random(&mp3, 42);
        // Once locked, only the last frame can still be pending.
        assert!(s.buffered() < MAX_FRAME_LEN);
        assert_eq!(concat(&frames), mp3[..mp3.len() - s.buffered()]);
    }

    #[test]
    fn garbage_prefix_is_skipped() {
        let mp3 = lame_sine(2, 128);
        for seed in 0..12u64 {
            let mut rng = StdRng::seed_from_u64(100 + seed);
            let mut garbage: Vec<u8> = (0..rng.random_range(1..3000))
                .map(|_| rng.random())
                .collect();
            // Plant a plausible fake header (128 kbit/s, 48 kHz) in the garbage.
            let mut at = garbage.len() / 2;
            // A fake frame ending exactly where the real stream starts is
            // indistinguishable from a real one (it *is* a frame); avoid that.
            if garbage.len() + 6 - at == 384 {
                at -= 1;
            }
            garbage.splice(at..at, [0xFF, 0xFB, 0x94, 0xC4, 0x00, 0x11]);
            let input: Vec<u8> = garbage.iter().chain(mp3.iter()).copied().collect();
            let (mut frames, mut s) = split_random(&input, seed);
            frames.extend(s.finish());
            check_frames(&frames);
            let got = concat(&frames);
            assert!(
                got == mp3,
                "seed {seed}: garbage {} planted at {at}, got {} bytes, want {}, skipped {}",
                garbage.len(),
                got.len(),
                mp3.len(),
                s.skipped_bytes()
            );
            assert_eq!(s.skipped_bytes(), garbage.len() as u64);
        }
    }

    #[test]
    fn truncated_tail_is_held_then_discarded() {
        let mp3 = lame_sine(1, 128);
        for cut in [1usize, 3, 100, 383] {
            let input = &mp3[..mp3.len() - cut];
            let (frames, mut s) = split_random(input, cut as u64);
            let pending = s.buffered();
            assert!(pending > 0 && pending < 384);
            assert_eq!(concat(&frames), input[..input.len() - pending]);
            let last = s.finish();
            assert!(last.is_empty(), "incomplete frame must not be emitted");
            assert_eq!(s.skipped_bytes(), pending as u64);
            assert_eq!(s.buffered(), 0);
        }
    }

    #[test]
    fn mid_stream_corruption_resyncs() {
        let mp3 = lame_sine(1, 128);
        let mut input = mp3.clone();
        // Destroy the sync word of frame 10 (all frames are 384 bytes here).
        input[10 * 384] = 0x00;
        let (mut frames, mut s) = split_random(&input, 7);
        frames.extend(s.finish());
        check_frames(&frames);
        let expected: Vec<u8> = mp3[..10 * 384]
            .iter()
            .chain(&mp3[11 * 384..])
            .copied()
            .collect();
        assert_eq!(concat(&frames), expected);
        assert_eq!(s.skipped_bytes(), 384);
    }

    #[test]
    fn buffer_is_bounded_on_endless_garbage() {
        let mut s = FrameSplitter::new();
        for _ in 0..1000 {
            s.push(&[0x12; 1000]);
        }
        assert!(s.buffered() <= MAX_BUFFERED);
        assert!(s.next_frame().is_none());
        assert!(s.buffered() <= 3);
    }
}
