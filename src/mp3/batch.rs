//! MP3 batches: whole frames grouped into ~200 ms refcounted buffers
//! ([`Batch`], built by [`Batcher`]), each also framed once as an HTTP/1.1
//! chunk, and [`coalesce`] for the bursts a long filled gap produces.

use bytes::{Bytes, BytesMut};

use super::frames::Mp3Frame;

/// Target audio duration of one published batch. Each batch is one write
/// per listener; on loopback most of a write's cost is per write (waking the
/// reader), so 200 ms batches cost less than 100 ms ones (measured in
/// `docs/benchmarks.md`) while keeping gaps far below what players buffer.
pub const BATCH_NS: u64 = 200_000_000;

/// A group of whole MP3 frames, published as one refcounted buffer.
///
/// `framed` is the same bytes as one HTTP/1.1 chunk (`{len:x}\r\n` … `\r\n`),
/// built once and written as is to every chunked listener; `data` is a view
/// of the MP3 inside it.
#[derive(Clone, Debug)]
pub struct Batch {
    pub data: Bytes,
    pub framed: Bytes,
    pub frames: u32,
    pub duration_ns: u64,
}

impl Batch {
    pub fn new(data: &[u8], frames: u32, duration_ns: u64) -> Self {
        let head = format!("{:x}\r\n", data.len());
        let mut framed = BytesMut::with_capacity(head.len() + data.len() + 2);
        framed.extend_from_slice(head.as_bytes());
        framed.extend_from_slice(data);
        framed.extend_from_slice(b"\r\n");
        let framed = framed.freeze();
        Self {
            data: framed.slice(head.len()..head.len() + data.len()),
            framed,
            frames,
            duration_ns,
        }
    }
}

/// Groups whole frames until at least [`BATCH_NS`] of audio is pending.
#[derive(Debug, Default)]
pub struct Batcher {
    buf: BytesMut,
    frames: u32,
    duration_ns: u64,
}

impl Batcher {
    /// Adds a frame; returns a batch once ≥ 200 ms is pending.
    pub fn push(&mut self, frame: &Mp3Frame) -> Option<Batch> {
        self.buf.extend_from_slice(&frame.data);
        self.frames += 1;
        self.duration_ns += frame.header.duration_ns();
        (self.duration_ns >= BATCH_NS).then(|| self.take())
    }

    /// The pending remainder (end of stream), if any.
    pub fn flush(&mut self) -> Option<Batch> {
        (self.frames > 0).then(|| self.take())
    }

    fn take(&mut self) -> Batch {
        let batch = Batch::new(&self.buf, self.frames, self.duration_ns);
        self.buf.clear();
        self.frames = 0;
        self.duration_ns = 0;
        batch
    }
}

/// Merges `batches` (in order) into at most `max_groups` batches.
///
/// One packet normally yields zero or one batch, but a long filled gap (up to
/// 10 s of PLC/silence) yields up to ~100 at once; publishing those one by one
/// would push every listener past its lag limit, so they are sent as a few
/// larger batches instead.
pub fn coalesce(batches: Vec<Batch>, max_groups: usize) -> Vec<Batch> {
    let max_groups = max_groups.max(1);
    if batches.len() <= max_groups {
        return batches;
    }
    let per_group = batches.len().div_ceil(max_groups);
    batches
        .chunks(per_group)
        .map(|group| {
            let mut data = Vec::with_capacity(group.iter().map(|b| b.data.len()).sum());
            for b in group {
                data.extend_from_slice(&b.data);
            }
            Batch::new(
                &data,
                group.iter().map(|b| b.frames).sum(),
                group.iter().map(|b| b.duration_ns).sum(),
            )
        })
        .collect()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::mp3::frames::parse_header;

    pub(in crate::mp3) fn frame() -> Mp3Frame {
        let header = parse_header([0xFF, 0xFB, 0x94, 0xC4]).expect("header");
        let mut data = vec![0u8; header.frame_len];
        data[..4].copy_from_slice(&[0xFF, 0xFB, 0x94, 0xC4]);
        Mp3Frame {
            data: Bytes::from(data),
            header,
        }
    }

    /// A numbered 24 ms batch: its first payload byte after the header is `n`.
    pub(in crate::mp3) fn batch(n: u8) -> Batch {
        let mut data = frame().data.to_vec();
        data[4] = n;
        Batch::new(&data, 1, 24_000_000)
    }

    #[test]
    fn batcher_groups_200ms() {
        let mut b = Batcher::default();
        let f = frame();
        let mut out = Vec::new();
        for _ in 0..12 {
            out.extend(b.push(&f));
        }
        out.extend(b.flush());
        let frames: Vec<u32> = out.iter().map(|b| b.frames).collect();
        assert_eq!(frames, vec![9, 3], "9 × 24 ms ≥ 200 ms, remainder at flush");
        assert_eq!(out[0].data.len(), 9 * 384);
        assert!(b.flush().is_none());
    }

    #[test]
    fn coalesce_bounds_batches_per_packet() {
        let many: Vec<Batch> = (0..100).map(batch).collect();
        let all: Vec<u8> = many.iter().flat_map(|b| b.data.to_vec()).collect();
        let merged = coalesce(many, 8);
        assert_eq!(merged.len(), 8);
        let joined: Vec<u8> = merged.iter().flat_map(|b| b.data.to_vec()).collect();
        assert_eq!(joined, all, "order and bytes preserved");
        assert_eq!(merged.iter().map(|b| b.frames).sum::<u32>(), 100);
        assert_eq!(
            merged.iter().map(|b| b.duration_ns).sum::<u64>(),
            100 * 24_000_000
        );
        let few: Vec<Batch> = (0..3).map(batch).collect();
        assert_eq!(coalesce(few, 8).len(), 3, "untouched when small");
        assert_eq!(coalesce((0..5).map(batch).collect(), 0).len(), 1);
    }
}
