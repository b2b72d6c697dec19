//! RFC 4571 framing of ICE-TCP: on a TCP connection every STUN, DTLS and
//! SRTP packet is preceded by its length (2 bytes, big-endian). Owns cutting
//! a byte stream into packets, whatever pieces the reads return, and
//! writing the prefix.

/// Longest packet taken on an ICE-TCP connection: a STUN check, a DTLS
/// flight fragment or an SRTP packet, each at most an MTU; a longer length
/// is not a client of ours and closes the connection.
pub(super) const MAX_FRAME: usize = 2048;

/// A length prefix over [`MAX_FRAME`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FrameTooLong(pub usize);

/// The bytes read from one connection, not yet cut into packets.
#[derive(Default)]
pub(super) struct FrameReader {
    buf: Vec<u8>,
    /// Where the next frame starts in `buf`.
    start: usize,
}

impl FrameReader {
    /// Appends bytes as read from the connection.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole packet, `None` until its last byte has arrived. Empty
    /// frames are skipped.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameTooLong> {
        loop {
            let rest = &self.buf[self.start..];
            let Some(prefix) = rest.get(..2) else {
                return Ok(None);
            };
            let len = usize::from(u16::from_be_bytes([prefix[0], prefix[1]]));
            if len > MAX_FRAME {
                return Err(FrameTooLong(len));
            }
            if rest.len() < 2 + len {
                return Ok(None);
            }
            let begin = self.start + 2;
            self.start = begin + len;
            if len > 0 {
                return Ok(Some(&self.buf[begin..begin + len]));
            }
        }
    }

    /// Bytes held (a partial frame).
    #[cfg(test)]
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// Appends `packet` with its length prefix to `out`; `None` (nothing
/// appended) for a packet over [`MAX_FRAME`].
pub(super) fn write_frame(out: &mut Vec<u8>, packet: &[u8]) -> Option<()> {
    if packet.len() > MAX_FRAME {
        return None;
    }
    out.extend_from_slice(&(packet.len() as u16).to_be_bytes());
    out.extend_from_slice(packet);
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(packets: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in packets {
            write_frame(&mut out, p).unwrap();
        }
        out
    }

    fn drain(reader: &mut FrameReader) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        while let Some(f) = reader.next_frame().unwrap() {
            got.push(f.to_vec());
        }
        got
    }

    #[test]
    fn several_frames_in_one_read() {
        let mut r = FrameReader::default();
        r.extend(&framed(&[b"one", b"two!", &[7u8; 300]]));
        assert_eq!(
            drain(&mut r),
            vec![b"one".to_vec(), b"two!".to_vec(), vec![7u8; 300]]
        );
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn frames_split_across_reads_at_every_byte() {
        let bytes = framed(&[b"hello", &[1u8; 600], b"x"]);
        for cut in 0..bytes.len() {
            let mut r = FrameReader::default();
            r.extend(&bytes[..cut]);
            let mut got = drain(&mut r);
            r.extend(&bytes[cut..]);
            got.extend(drain(&mut r));
            assert_eq!(
                got,
                vec![b"hello".to_vec(), vec![1u8; 600], b"x".to_vec()],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn one_byte_at_a_time_and_empty_frames_skipped() {
        let bytes = framed(&[b"", b"ab", b"", b"cde"]);
        let mut r = FrameReader::default();
        let mut got = Vec::new();
        for b in &bytes {
            r.extend(&[*b]);
            got.extend(drain(&mut r));
        }
        assert_eq!(got, vec![b"ab".to_vec(), b"cde".to_vec()]);
    }

    #[test]
    fn an_oversize_length_is_refused_before_its_body_arrives() {
        let mut r = FrameReader::default();
        r.extend(&framed(&[b"ok"]));
        r.extend(&((MAX_FRAME + 1) as u16).to_be_bytes());
        assert_eq!(r.next_frame(), Ok(Some(&b"ok"[..])));
        assert_eq!(r.next_frame(), Err(FrameTooLong(MAX_FRAME + 1)));

        let mut r = FrameReader::default();
        r.extend(&[0xff, 0xff]);
        assert_eq!(r.next_frame(), Err(FrameTooLong(0xffff)));

        let mut r = FrameReader::default();
        r.extend(&framed(&[&[0u8; MAX_FRAME]]));
        assert_eq!(
            r.next_frame().map(|f| f.map(<[u8]>::len)),
            Ok(Some(MAX_FRAME))
        );
    }

    #[test]
    fn writing_refuses_what_reading_would() {
        let mut out = Vec::new();
        assert_eq!(write_frame(&mut out, &[0u8; MAX_FRAME + 1]), None);
        assert!(out.is_empty());
        write_frame(&mut out, b"abc").unwrap();
        assert_eq!(out, [0, 3, b'a', b'b', b'c']);
    }
}
