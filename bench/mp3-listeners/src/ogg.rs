//! Incremental Ogg/Opus page parser (RFC 3533, RFC 7845): finds each page by
//! its capture pattern `OggS`, takes the body length from the segment table
//! and skips the body, counting whole pages and the audio time their granule
//! positions advance. A page that does not start with `OggS` where one is
//! expected, a page sequence hole, a second logical stream, a granule going
//! back or missing OpusHead/OpusTags header pages mark the stream broken;
//! after a bad capture pattern the parser resynchronises byte by byte.
//! No CRC check (the tool must stay cheap; TCP already checks the bytes).

/// Length of the fixed part of a page header (up to the segment count).
const FIXED: usize = 27;
/// Page flag: first page of a logical stream.
const BOS: u8 = 0x02;
/// Opus granule positions count 48 kHz samples.
const RATE: u64 = 48_000;
/// Granule position of a page on which no packet ends.
const NO_GRANULE: i64 = -1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Collecting the 27 fixed header bytes (`have` of them).
    Header,
    /// Summing the segment table (`segs_left` lacing values to go).
    Segments,
    /// Skipping the page body (`body_left` bytes to go).
    Body,
    /// After a bad capture pattern: sliding a 4-byte window until `OggS`.
    Resync,
}

/// Per-connection parser state (kept small: one per listener, ~100 bytes).
#[derive(Debug)]
pub struct OggParser {
    phase: Phase,
    hdr: [u8; FIXED],
    have: u8,
    segs_left: u8,
    body_left: u32,
    /// First bytes of a header page's body (the OpusHead/OpusTags magic).
    magic: [u8; 8],
    magic_have: u8,
    serial: u32,
    next_seq: u32,
    /// No page seen yet, or the last one was lost to a resync: the next
    /// page's sequence number is taken as is.
    seq_unknown: bool,
    /// Last audio granule position, or NO_GRANULE before the first.
    last_granule: i64,
    /// Whole pages seen, header pages included.
    pub pages: u64,
    /// Whole audio pages (after the two header pages).
    pub frames: u64,
    /// 48 kHz samples the audio granule positions advanced by, counted from
    /// the first audio page's end (whose own start is not in a cropped stream).
    pub audio_samples: u64,
    /// Broken pages where a clean stream has none (0 for a clean stream).
    pub bad_pages: u32,
    /// Bytes discarded while resynchronising.
    pub skipped_bytes: u64,
}

impl Default for OggParser {
    fn default() -> Self {
        Self {
            phase: Phase::Header,
            hdr: [0; FIXED],
            have: 0,
            segs_left: 0,
            body_left: 0,
            magic: [0; 8],
            magic_have: 0,
            serial: 0,
            next_seq: 0,
            seq_unknown: true,
            last_granule: NO_GRANULE,
            pages: 0,
            frames: 0,
            audio_samples: 0,
            bad_pages: 0,
            skipped_bytes: 0,
        }
    }
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

impl OggParser {
    /// Feeds body bytes; returns how many audio pages completed in them.
    pub fn feed(&mut self, mut data: &[u8]) -> u32 {
        let mut done = 0;
        while !data.is_empty() {
            match self.phase {
                Phase::Header => {
                    // The capture pattern first, on its own, so that a bad
                    // one leaves just these 4 bytes in the resync window.
                    let at = self.have as usize;
                    let upto = if at < 4 { 4 } else { FIXED };
                    let n = (upto - at).min(data.len());
                    self.hdr[at..at + n].copy_from_slice(&data[..n]);
                    self.have += n as u8;
                    data = &data[n..];
                    if self.have == 4 && &self.hdr[..4] != b"OggS" {
                        self.lost_sync();
                    } else if self.have as usize == FIXED {
                        self.on_header();
                    }
                }
                Phase::Segments => {
                    let n = usize::from(self.segs_left).min(data.len());
                    self.body_left += data[..n].iter().map(|&b| u32::from(b)).sum::<u32>();
                    self.segs_left -= n as u8;
                    data = &data[n..];
                    if self.segs_left == 0 {
                        self.phase = Phase::Body;
                    }
                }
                Phase::Body => {
                    let n = (self.body_left as usize).min(data.len());
                    self.capture_magic(&data[..n]);
                    self.body_left -= n as u32;
                    data = &data[n..];
                }
                Phase::Resync => {
                    // Each byte in drops the window's oldest one.
                    self.hdr.copy_within(1..4, 0);
                    self.hdr[3] = data[0];
                    data = &data[1..];
                    self.skipped_bytes += 1;
                    if &self.hdr[..4] == b"OggS" {
                        self.have = 4;
                        self.phase = Phase::Header;
                    }
                }
            }
            if self.phase == Phase::Body && self.body_left == 0 {
                done += u32::from(self.end_page());
            }
        }
        done
    }

    /// No page starts where one was expected: broken; look for the next.
    fn lost_sync(&mut self) {
        self.bad_pages += 1;
        self.seq_unknown = true;
        self.phase = Phase::Resync;
    }

    fn on_header(&mut self) {
        if self.hdr[4] != 0 {
            // Unknown page version: its header bytes are lost to the resync.
            self.lost_sync();
            return;
        }
        let flags = self.hdr[5];
        let serial = le_u32(&self.hdr[14..18]);
        let seq = le_u32(&self.hdr[18..22]);
        let first = self.pages == 0;
        let bad = (!first && serial != self.serial)
            || (!self.seq_unknown && seq != self.next_seq)
            || (first != (flags & BOS != 0));
        if bad {
            self.bad_pages += 1;
        }
        self.serial = serial;
        self.next_seq = seq.wrapping_add(1);
        self.seq_unknown = false;
        self.magic_have = 0;
        self.segs_left = self.hdr[26];
        self.body_left = 0;
        self.phase = if self.segs_left == 0 {
            Phase::Body
        } else {
            Phase::Segments
        };
    }

    /// Keeps the first 8 body bytes of the two header pages.
    fn capture_magic(&mut self, body: &[u8]) {
        if self.pages >= 2 || self.magic_have >= 8 {
            return;
        }
        let at = usize::from(self.magic_have);
        let n = (8 - at).min(body.len());
        self.magic[at..at + n].copy_from_slice(&body[..n]);
        self.magic_have += n as u8;
    }

    /// The current page's body is complete; true if it was an audio page.
    fn end_page(&mut self) -> bool {
        let index = self.pages;
        self.pages += 1;
        self.phase = Phase::Header;
        self.have = 0;
        if index < 2 {
            let want: &[u8; 8] = if index == 0 { b"OpusHead" } else { b"OpusTags" };
            if self.magic_have < 8 || &self.magic != want {
                self.bad_pages += 1;
            }
            return false;
        }
        let granule = i64::from_le_bytes([
            self.hdr[6],
            self.hdr[7],
            self.hdr[8],
            self.hdr[9],
            self.hdr[10],
            self.hdr[11],
            self.hdr[12],
            self.hdr[13],
        ]);
        self.frames += 1;
        if granule != NO_GRANULE {
            if self.last_granule != NO_GRANULE {
                match granule.checked_sub(self.last_granule) {
                    Some(d) if d >= 0 => self.audio_samples += d as u64,
                    _ => self.bad_pages += 1,
                }
            }
            self.last_granule = granule;
        }
        true
    }

    pub fn audio_ns(&self) -> u64 {
        self.audio_samples * 1_000_000_000 / RATE
    }

    /// True while no broken page has been seen.
    pub fn clean(&self) -> bool {
        self.bad_pages == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ffmpeg -f lavfi -i sine=f=440:d=1 -c:a libopus -b:a 24k
    /// -page_duration 100000 sine440-1s.ogg` (ffmpeg 5.1): OpusHead, OpusTags,
    /// then 11 audio pages with granule positions 4800, 9600, ... 48000, 48312.
    const SINE: &[u8] = include_bytes!("testdata/sine440-1s.ogg");
    const FIRST_GRANULE: u64 = 4800;
    const LAST_GRANULE: u64 = 48_312;

    /// Start offsets of the pages of `SINE`, found independently of the
    /// parser (capture pattern + segment table).
    fn page_starts(b: &[u8]) -> Vec<usize> {
        let mut at = 0;
        let mut v = Vec::new();
        while at < b.len() {
            assert_eq!(&b[at..at + 4], b"OggS");
            v.push(at);
            let n = usize::from(b[at + 26]);
            let body: usize = b[at + 27..at + 27 + n]
                .iter()
                .map(|&x| usize::from(x))
                .sum();
            at += 27 + n + body;
        }
        v
    }

    #[test]
    fn real_ffmpeg_file_across_any_split() {
        assert_eq!(page_starts(SINE).len(), 13);
        for split in [1usize, 2, 3, 7, 26, 27, 28, 100, 1000, SINE.len()] {
            let mut p = OggParser::default();
            let done: u32 = SINE.chunks(split).map(|c| p.feed(c)).sum();
            assert_eq!((p.pages, p.frames, done), (13, 11, 11), "split {split}");
            assert_eq!(
                p.audio_samples,
                LAST_GRANULE - FIRST_GRANULE,
                "split {split}"
            );
            assert_eq!(p.audio_ns(), 906_500_000);
            assert!(p.clean(), "split {split}: {p:?}");
            assert_eq!(p.skipped_bytes, 0);
        }
    }

    #[test]
    fn page_counts_only_when_complete() {
        let starts = page_starts(SINE);
        let mut p = OggParser::default();
        assert_eq!(
            p.feed(&SINE[..starts[3] - 1]),
            0,
            "headers + page 2 minus a byte"
        );
        assert_eq!(p.feed(&SINE[starts[3] - 1..starts[3]]), 1);
        assert_eq!(
            p.audio_samples, 0,
            "the first audio page only sets the base"
        );
        assert_eq!(p.feed(&SINE[starts[3]..starts[4]]), 1);
        assert_eq!(p.audio_samples, 4800);
    }

    #[test]
    fn garbage_between_pages_is_broken_then_resynced() {
        let starts = page_starts(SINE);
        let mut body = SINE[..starts[5]].to_vec();
        body.extend_from_slice(b"garbage");
        body.extend_from_slice(&SINE[starts[5]..]);
        let mut p = OggParser::default();
        p.feed(&body);
        assert_eq!(p.bad_pages, 1);
        assert!(!p.clean());
        assert_eq!(p.frames, 11);
        assert_eq!(p.skipped_bytes, 7);
    }

    #[test]
    fn a_lost_page_is_broken() {
        let starts = page_starts(SINE);
        let mut body = SINE[..starts[5]].to_vec();
        body.extend_from_slice(&SINE[starts[6]..]);
        let mut p = OggParser::default();
        p.feed(&body);
        assert_eq!(p.bad_pages, 1, "sequence hole");
        assert_eq!(p.frames, 10);
    }

    #[test]
    fn missing_header_pages_are_broken() {
        let starts = page_starts(SINE);
        let mut p = OggParser::default();
        p.feed(&SINE[starts[2]..]);
        assert!(!p.clean());
    }

    #[test]
    fn a_chained_stream_is_broken() {
        let mut body = SINE.to_vec();
        body.extend_from_slice(SINE);
        let mut p = OggParser::default();
        p.feed(&body);
        assert!(p.bad_pages >= 1, "second BOS / granule back: {p:?}");
    }

    #[test]
    fn html_is_broken() {
        let mut p = OggParser::default();
        p.feed(b"<html><body>not found</body></html>");
        assert_eq!(p.bad_pages, 1);
    }
}
