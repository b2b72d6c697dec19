//! Incremental MPEG audio frame parser: finds each frame header, computes the
//! frame length from it and skips the payload, counting whole frames and the
//! audio time they carry. A header that does not parse where one is expected
//! marks the stream broken; the parser then resynchronises byte by byte.

use std::sync::atomic::{AtomicBool, Ordering};

/// Whether new parsers expect bytes before the first frame
/// (`--unsynced-start`; see [`Mp3Parser::unsynced`]).
static UNSYNCED_START: AtomicBool = AtomicBool::new(false);

/// Makes every parser made by [`Mp3Parser::for_listener`] from now on
/// [`unsynced`](Mp3Parser::unsynced). Set once, before listeners connect.
pub fn allow_unsynced_start() {
    UNSYNCED_START.store(true, Ordering::Relaxed);
}

/// What one 4-byte frame header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Whole frame length in bytes, header included.
    pub len: usize,
    /// PCM samples per channel the frame decodes to.
    pub samples: u32,
    pub sample_rate: u32,
}

impl FrameHeader {
    pub fn duration_ns(&self) -> u64 {
        u64::from(self.samples) * 1_000_000_000 / u64::from(self.sample_rate)
    }
}

// kbit/s by [table][index]; index 0 (free format) and 15 (bad) are rejected.
const BITRATES: [[u16; 15]; 5] = [
    // MPEG-1 Layer I
    [
        0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448,
    ],
    // MPEG-1 Layer II
    [
        0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384,
    ],
    // MPEG-1 Layer III
    [
        0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320,
    ],
    // MPEG-2/2.5 Layer I
    [
        0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256,
    ],
    // MPEG-2/2.5 Layer II and III
    [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160],
];

/// Parses a frame header; `None` if the bytes are not a usable header.
pub fn parse_header(h: [u8; 4]) -> Option<FrameHeader> {
    if h[0] != 0xFF || h[1] & 0xE0 != 0xE0 {
        return None;
    }
    // version: 0 = MPEG-2.5, 2 = MPEG-2, 3 = MPEG-1 (1 reserved)
    let version = (h[1] >> 3) & 0x03;
    // layer: 1 = III, 2 = II, 3 = I (0 reserved)
    let layer = (h[1] >> 1) & 0x03;
    if version == 1 || layer == 0 {
        return None;
    }
    let br_idx = usize::from(h[2] >> 4);
    let sr_idx = usize::from((h[2] >> 2) & 0x03);
    let padding = usize::from((h[2] >> 1) & 0x01);
    if br_idx == 0 || br_idx == 15 || sr_idx == 3 {
        return None;
    }
    let mpeg1 = version == 3;
    let table = match (mpeg1, layer) {
        (true, 3) => 0,
        (true, 2) => 1,
        (true, _) => 2,
        (false, 3) => 3,
        (false, _) => 4,
    };
    let bitrate = usize::from(BITRATES[table][br_idx]) * 1000;
    let base_rate = [44_100u32, 48_000, 32_000][sr_idx];
    let sample_rate = match version {
        3 => base_rate,
        2 => base_rate / 2,
        _ => base_rate / 4,
    };
    let sr = sample_rate as usize;
    let (len, samples) = match layer {
        3 => ((12 * bitrate / sr + padding) * 4, 384),
        2 => (144 * bitrate / sr + padding, 1152),
        _ if mpeg1 => (144 * bitrate / sr + padding, 1152),
        _ => (72 * bitrate / sr + padding, 576),
    };
    if len < 5 {
        return None;
    }
    Some(FrameHeader {
        len,
        samples,
        sample_rate,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Collecting the 4 header bytes of the next frame (`have` of them).
    Header,
    /// Skipping the rest of the current frame.
    Payload,
    /// After a bad header: sliding a 4-byte window until a header parses.
    Resync,
}

/// Per-connection parser state (kept small: one per listener).
#[derive(Debug)]
pub struct Mp3Parser {
    phase: Phase,
    hdr: [u8; 4],
    have: u8,
    skip: u32,
    started: bool,
    /// Bytes before the first frame are expected, not a bad header.
    unsynced_start: bool,
    cur_ns: u32,
    /// Whole frames seen.
    pub frames: u64,
    /// Audio time of those frames.
    pub audio_ns: u64,
    /// Bad headers where a frame was expected (0 for a clean stream).
    pub bad_headers: u32,
    /// Bytes discarded while resynchronising.
    pub skipped_bytes: u64,
}

impl Default for Mp3Parser {
    fn default() -> Self {
        Self {
            phase: Phase::Header,
            hdr: [0; 4],
            have: 0,
            skip: 0,
            started: false,
            unsynced_start: false,
            cur_ns: 0,
            frames: 0,
            audio_ns: 0,
            bad_headers: 0,
            skipped_bytes: 0,
        }
    }
}

impl Mp3Parser {
    /// A listener's parser, as `--unsynced-start` says.
    pub fn for_listener() -> Self {
        if UNSYNCED_START.load(Ordering::Relaxed) {
            Self::unsynced()
        } else {
            Self::default()
        }
    }

    /// For servers that start each listener at any byte (Icecast begins a
    /// listener's burst at one of its buffers, not at a frame): bytes until
    /// a header that the next header confirms are skipped, not counted as a
    /// bad header.
    pub fn unsynced() -> Self {
        Self {
            unsynced_start: true,
            ..Self::default()
        }
    }

    /// Feeds body bytes; returns how many frames completed in them.
    pub fn feed(&mut self, mut data: &[u8]) -> u32 {
        let mut done = 0;
        while !data.is_empty() {
            match self.phase {
                Phase::Payload => {
                    let n = (self.skip as usize).min(data.len());
                    self.skip -= n as u32;
                    data = &data[n..];
                    if self.skip == 0 {
                        self.frames += 1;
                        self.audio_ns += u64::from(self.cur_ns);
                        done += 1;
                        self.phase = Phase::Header;
                        self.have = 0;
                    }
                }
                Phase::Header => {
                    let need = 4 - self.have as usize;
                    let n = need.min(data.len());
                    self.hdr[self.have as usize..self.have as usize + n]
                        .copy_from_slice(&data[..n]);
                    self.have += n as u8;
                    data = &data[n..];
                    if self.have == 4 {
                        self.on_header();
                    }
                }
                Phase::Resync => {
                    self.hdr = [self.hdr[1], self.hdr[2], self.hdr[3], data[0]];
                    data = &data[1..];
                    self.skipped_bytes += 1;
                    if let Some(h) = parse_header(self.hdr) {
                        self.start_frame(h);
                    }
                }
            }
        }
        done
    }

    fn on_header(&mut self) {
        if let Some(h) = parse_header(self.hdr) {
            // A header where one was expected: in sync.
            self.started = true;
            self.start_frame(h);
            return;
        }
        if !self.started && self.unsynced_start {
            // Not in sync yet (or a false sync before): look on.
            self.phase = Phase::Resync;
            return;
        }
        if !self.started && &self.hdr[..3] == b"ID3" {
            // A leading ID3v2 tag is allowed (voice-relay sends none): skip
            // it by resynchronising, without marking the stream broken.
            self.started = true;
            self.phase = Phase::Resync;
            return;
        }
        self.bad_headers += 1;
        self.started = true;
        self.phase = Phase::Resync;
    }

    fn start_frame(&mut self, h: FrameHeader) {
        self.cur_ns = h.duration_ns() as u32;
        self.skip = (h.len - 4) as u32;
        self.phase = Phase::Payload;
    }

    /// True while no bad header has been seen.
    pub fn clean(&self) -> bool {
        self.bad_headers == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H128: [u8; 4] = [0xFF, 0xFB, 0x94, 0xC4]; // MPEG-1 L3 128k 48k, no pad
    const H128P: [u8; 4] = [0xFF, 0xFB, 0x96, 0xC4]; // same, padded

    fn frame(h: [u8; 4]) -> Vec<u8> {
        let len = parse_header(h).unwrap().len;
        let mut f = vec![0x55u8; len];
        f[..4].copy_from_slice(&h);
        f
    }

    #[test]
    fn header_lengths() {
        let h = parse_header(H128).unwrap();
        assert_eq!((h.len, h.samples, h.sample_rate), (384, 1152, 48_000));
        assert_eq!(h.duration_ns(), 24_000_000);
        assert_eq!(parse_header(H128P).unwrap().len, 385);
        // MPEG-1 L3 128k 44.1k: 417 (+1 padded)
        assert_eq!(parse_header([0xFF, 0xFB, 0x90, 0x00]).unwrap().len, 417);
        // MPEG-2 L3 64k 24k: 72*64000/24000 = 192, 576 samples
        let m2 = parse_header([0xFF, 0xF3, 0x84, 0x00]).unwrap();
        assert_eq!((m2.len, m2.samples, m2.sample_rate), (192, 576, 24_000));
        assert!(
            parse_header([0xFF, 0xFB, 0x04, 0xC4]).is_none(),
            "free format"
        );
        assert!(
            parse_header([0xFF, 0xFB, 0xF4, 0xC4]).is_none(),
            "bad bitrate"
        );
        assert!(parse_header([0xFF, 0xFB, 0x9C, 0xC4]).is_none(), "bad rate");
        assert!(parse_header([0x00, 0xFB, 0x94, 0xC4]).is_none());
    }

    #[test]
    fn counts_frames_across_any_split() {
        let mut body = Vec::new();
        for i in 0..20 {
            body.extend(frame(if i % 3 == 0 { H128P } else { H128 }));
        }
        for split in [1usize, 2, 3, 5, 383, 384, 385, 1000, body.len()] {
            let mut p = Mp3Parser::default();
            let mut done = 0;
            for c in body.chunks(split) {
                done += p.feed(c);
            }
            assert_eq!((p.frames, done), (20, 20), "split {split}");
            assert_eq!(p.audio_ns, 20 * 24_000_000);
            assert!(p.clean());
        }
    }

    #[test]
    fn frame_counts_only_when_complete() {
        let f = frame(H128);
        let mut p = Mp3Parser::default();
        assert_eq!(p.feed(&f[..383]), 0);
        assert_eq!(p.feed(&f[383..]), 1);
    }

    #[test]
    fn bad_header_mid_body_is_detected_and_resynced() {
        let mut body = frame(H128);
        body.extend([1, 2, 3, 4, 5, 6, 7]); // garbage
        body.extend(frame(H128));
        body.extend(frame(H128));
        let mut p = Mp3Parser::default();
        p.feed(&body);
        assert_eq!(p.bad_headers, 1);
        assert!(!p.clean());
        assert_eq!(p.frames, 3);
        assert_eq!(p.skipped_bytes, 7);
    }

    #[test]
    fn garbage_at_start_is_broken() {
        let mut p = Mp3Parser::default();
        p.feed(b"<html>");
        assert_eq!(p.bad_headers, 1);
    }

    #[test]
    fn a_midframe_start_is_fine_when_allowed_but_later_garbage_is_not() {
        let mut body = frame(H128)[100..].to_vec(); // starts inside a frame
        body.extend(frame(H128));
        body.extend(frame(H128));
        let mut p = Mp3Parser::unsynced();
        p.feed(&body);
        assert_eq!(p.bad_headers, 0);
        assert!(p.frames >= 1);
        p.feed(&[1, 2, 3, 4, 5]);
        p.feed(&frame(H128));
        assert_eq!(p.bad_headers, 1, "once in sync, garbage is a bad header");
        let mut strict = Mp3Parser::default();
        strict.feed(&frame(H128)[100..]);
        assert_eq!(strict.bad_headers, 1);
    }
}
