//! Ogg pages (RFC 3533): owns writing one page of whole packets (header,
//! lacing, CRC) and reading a page's sequence number back. Nothing here knows
//! of Opus or of streams.

/// Page flag: first page of a logical stream.
pub const BOS: u8 = 0x02;
/// Page flag: last page of a logical stream.
pub const EOS: u8 = 0x04;
/// Most lacing values (segments) one page can hold.
pub const MAX_SEGMENTS: usize = 255;
/// Byte offset of the page sequence number in a page.
const SEQ_AT: usize = 18;
/// Byte offset of the checksum in a page.
const CRC_AT: usize = 22;
/// Length of the fixed part of a page header.
const FIXED_HEADER: usize = 27;

/// The fields of a page header that the writer chooses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageHeader {
    pub flags: u8,
    pub granule: u64,
    pub serial: u32,
    pub seq: u32,
}

/// Lacing values one packet of `len` bytes takes (a multiple of 255 ends
/// with a 0).
pub fn segments_of(len: usize) -> usize {
    len / 255 + 1
}

/// Appends one page holding `packets`, each whole on this page, to `out`.
/// The caller keeps their lacing within [`MAX_SEGMENTS`].
pub fn write_page(out: &mut Vec<u8>, header: PageHeader, packets: &[&[u8]]) {
    let start = out.len();
    let segments: usize = packets.iter().map(|p| segments_of(p.len())).sum();
    debug_assert!(segments <= MAX_SEGMENTS);
    out.extend_from_slice(b"OggS");
    out.push(0); // stream structure version
    out.push(header.flags);
    out.extend_from_slice(&header.granule.to_le_bytes());
    out.extend_from_slice(&header.serial.to_le_bytes());
    out.extend_from_slice(&header.seq.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // checksum, filled below
    out.push(segments.min(MAX_SEGMENTS) as u8);
    for packet in packets {
        out.extend(std::iter::repeat_n(255u8, packet.len() / 255));
        out.push((packet.len() % 255) as u8);
    }
    for packet in packets {
        out.extend_from_slice(packet);
    }
    let crc = crc32(&out[start..]);
    out[start + CRC_AT..start + CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

/// The sequence number of the page at the start of `bytes`, if it is one.
pub fn page_seq(bytes: &[u8]) -> Option<u32> {
    if bytes.len() < FIXED_HEADER || &bytes[..4] != b"OggS" {
        return None;
    }
    let seq: [u8; 4] = bytes[SEQ_AT..SEQ_AT + 4].try_into().ok()?;
    Some(u32::from_le_bytes(seq))
}

/// Lowers the sequence number of every page in `pages` (a run of whole
/// pages) by `by`, redoing each checksum. `false` (and the pages from the
/// first bad one left as they were) if `pages` is not a run of whole pages.
pub fn renumber(pages: &mut [u8], by: u32) -> bool {
    let mut at = 0;
    while at < pages.len() {
        let Some(len) = page_len(&pages[at..]) else {
            return false;
        };
        let page = &mut pages[at..at + len];
        let seq = page_seq(page).unwrap_or(0).wrapping_sub(by);
        page[SEQ_AT..SEQ_AT + 4].copy_from_slice(&seq.to_le_bytes());
        page[CRC_AT..CRC_AT + 4].fill(0);
        let crc = crc32(page);
        page[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        at += len;
    }
    true
}

/// The length of the whole page at the start of `bytes`, if there is one.
fn page_len(bytes: &[u8]) -> Option<usize> {
    page_seq(bytes)?;
    let segments = bytes[FIXED_HEADER - 1] as usize;
    let lacing = bytes.get(FIXED_HEADER..FIXED_HEADER + segments)?;
    let len = FIXED_HEADER + segments + lacing.iter().map(|&l| l as usize).sum::<usize>();
    (len <= bytes.len()).then_some(len)
}

/// The Ogg checksum: CRC-32, polynomial 0x04c11db7, not reflected, initial
/// value and final xor 0.
fn crc32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0u32, |crc, &b| {
        (crc << 8) ^ CRC_TABLE[((crc >> 24) as u8 ^ b) as usize]
    })
}

const CRC_TABLE: [u32; 256] = crc_table();

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut r = (i as u32) << 24;
        let mut bit = 0;
        while bit < 8 {
            r = if r & 0x8000_0000 != 0 {
                (r << 1) ^ 0x04c1_1db7
            } else {
                r << 1
            };
            bit += 1;
        }
        table[i] = r;
        i += 1;
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// The first two pages of a file made by
    /// `ffmpeg -f lavfi -i sine=f=440:d=0.1:r=48000 -c:a libopus t.opus`.
    const FFMPEG_HEAD_PAGE: &str = "4f6767530002000000000000000009074cbb000000003814552c01134f707573486561640101380180bb0000000000";
    const FFMPEG_TAGS_PAGE: &str = "4f6767530000000000000000000009074cbb01000000fd4085a0013e4f707573546167730d0000004c61766635392e32372e313030010000001d000000656e636f6465723d4c61766335392e33372e313030206c69626f707573";

    /// Rebuilds a real tool's page from its fields and packet.
    fn rebuilt(page: &[u8]) -> Vec<u8> {
        let header = PageHeader {
            flags: page[5],
            granule: u64::from_le_bytes(page[6..14].try_into().expect("8")),
            serial: u32::from_le_bytes(page[14..18].try_into().expect("4")),
            seq: page_seq(page).expect("page"),
        };
        let body = &page[FIXED_HEADER + page[26] as usize..];
        let mut out = Vec::new();
        write_page(&mut out, header, &[body]);
        out
    }

    #[test]
    fn pages_match_ffmpeg_byte_for_byte_crc_included() {
        for page in [hex(FFMPEG_HEAD_PAGE), hex(FFMPEG_TAGS_PAGE)] {
            assert_eq!(rebuilt(&page), page);
        }
        assert_eq!(page_seq(&hex(FFMPEG_TAGS_PAGE)), Some(1));
    }

    #[test]
    fn renumbering_a_run_of_pages_equals_writing_them_lower() {
        let write = |seqs: &[u32]| {
            let mut out = Vec::new();
            for (i, &seq) in seqs.iter().enumerate() {
                let header = PageHeader {
                    flags: 0,
                    granule: 960 * i as u64,
                    serial: 9,
                    seq,
                };
                write_page(&mut out, header, &[&vec![i as u8; 300 * i], b"x"]);
            }
            out
        };
        let mut pages = write(&[7, 8, 9]);
        assert!(renumber(&mut pages, 7));
        assert_eq!(pages, write(&[0, 1, 2]));
        let mut cut = write(&[7, 8]);
        cut.pop();
        assert!(!renumber(&mut cut, 7), "a partial page");
        assert_eq!(page_seq(&cut), Some(0), "whole pages before it renumbered");
        assert!(!renumber(&mut b"not a page".to_vec(), 1));
    }

    #[test]
    fn lacing_of_several_packets_and_multiples_of_255() {
        let (a, b, c) = (vec![1u8; 255], vec![2u8; 300], vec![3u8; 0]);
        let mut out = Vec::new();
        let header = PageHeader {
            flags: EOS,
            granule: 960,
            serial: 7,
            seq: 5,
        };
        write_page(&mut out, header, &[&a, &b, &c]);
        assert_eq!(out[26], 5, "255 → [255, 0]; 300 → [255, 45]; 0 → [0]");
        assert_eq!(&out[27..32], &[255, 0, 255, 45, 0]);
        assert_eq!(out.len(), 27 + 5 + 555);
        assert_eq!(segments_of(255) + segments_of(300) + segments_of(0), 5);
        assert_eq!(page_seq(&out), Some(5));
        assert_eq!(page_seq(b"OggS"), None);
        // The checksum covers everything: flipping any byte changes it.
        let mut bad = out.clone();
        bad[40] ^= 1;
        bad[22..26].fill(0);
        assert_ne!(crc32(&bad).to_le_bytes(), out[22..26]);
    }
}
