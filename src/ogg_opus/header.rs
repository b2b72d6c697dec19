//! The Ogg Opus header packets (RFC 7845 §5): owns the identification header
//! (OpusHead, with our pre-skip and channel count) and the comment header
//! (OpusTags), and the two header pages a listener gets first, numbered so
//! that its first audio page follows them without a hole.

use super::page::{write_page, PageHeader, BOS};

/// Samples the decoder discards at the start. A listener usually joins
/// mid-stream, so its stream is a "cropped" one, for which RFC 7845 §5.1
/// recommends at least 80 ms so the decoder has converged when output starts.
pub const PRE_SKIP: u16 = 3840;
/// Output channels. WebRTC Opus is negotiated as 2 channels; a mono-coded
/// packet decodes to both.
pub const CHANNELS: u8 = 2;
/// Opus always runs at 48 kHz; this is the "input sample rate" field only.
const INPUT_RATE: u32 = 48_000;

/// The identification header packet.
pub fn opus_head() -> Vec<u8> {
    let mut head = Vec::with_capacity(19);
    head.extend_from_slice(b"OpusHead");
    head.push(1); // version
    head.push(CHANNELS);
    head.extend_from_slice(&PRE_SKIP.to_le_bytes());
    head.extend_from_slice(&INPUT_RATE.to_le_bytes());
    head.extend_from_slice(&0i16.to_le_bytes()); // output gain
    head.push(0); // channel mapping family 0: mono or stereo
    head
}

/// The comment header packet: our name as vendor, no comments.
pub fn opus_tags() -> Vec<u8> {
    let vendor = concat!("voice-relay ", env!("CARGO_PKG_VERSION")).as_bytes();
    let mut tags = Vec::with_capacity(16 + vendor.len());
    tags.extend_from_slice(b"OpusTags");
    tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
    tags.extend_from_slice(vendor);
    tags.extend_from_slice(&0u32.to_le_bytes());
    tags
}

/// The OpusHead page (BOS) and the OpusTags page of logical stream `serial`,
/// numbered `first_audio_seq - 2` and `- 1`.
pub fn header_pages(serial: u32, first_audio_seq: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    let page = |flags, seq| PageHeader {
        flags,
        granule: 0,
        serial,
        seq,
    };
    let head = page(BOS, first_audio_seq.wrapping_sub(2));
    write_page(&mut out, head, &[&opus_head()]);
    let tags = page(0, first_audio_seq.wrapping_sub(1));
    write_page(&mut out, tags, &[&opus_tags()]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ogg_opus::page::page_seq;

    #[test]
    fn head_fields_per_rfc_7845() {
        let head = opus_head();
        assert_eq!(head.len(), 19);
        assert_eq!(&head[..8], b"OpusHead");
        assert_eq!((head[8], head[9]), (1, 2));
        assert_eq!(u16::from_le_bytes([head[10], head[11]]), 3840);
        assert_eq!(&head[12..16], &48_000u32.to_le_bytes());
        let tags = opus_tags();
        assert_eq!(&tags[..8], b"OpusTags");
        let vendor_len = u32::from_le_bytes(tags[8..12].try_into().expect("4")) as usize;
        assert_eq!(tags.len(), 12 + vendor_len + 4);
    }

    #[test]
    fn header_pages_precede_the_first_audio_page() {
        let pages = header_pages(0xabcd, 40);
        let head_len = 27 + 1 + 19;
        assert_eq!(page_seq(&pages), Some(38));
        assert_eq!(pages[5], BOS);
        assert_eq!(&pages[28..36], b"OpusHead");
        assert_eq!(page_seq(&pages[head_len..]), Some(39));
        assert_eq!(pages[head_len + 5], 0);
        assert_eq!(&pages[head_len + 28..head_len + 36], b"OpusTags");
    }
}
