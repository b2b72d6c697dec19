//! The few HTTP/1.1 pieces a listener needs: the request, the response head
//! and a streaming `Transfer-Encoding: chunked` decoder that reports chunk
//! boundaries (voice-relay writes one chunk per ~200 ms batch; the burst is
//! several chunks written at once).

/// Parsed response head.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub chunked: bool,
    pub content_type: String,
    pub stream_id: String,
}

pub fn request(host_port: &str, path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host_port}\r\nUser-Agent: mp3-listeners-bench\r\nAccept: */*\r\nIcy-MetaData: 0\r\n\r\n"
    )
    .into_bytes()
}

/// Position just past the blank line ending the head, if complete.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Parses a complete head (status line and headers).
pub fn parse_head(head: &[u8]) -> Option<Head> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next()?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let status: u16 = parts.next()?.parse().ok()?;
    let mut out = Head {
        status,
        ..Head::default()
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "transfer-encoding" => {
                out.chunked = value.to_ascii_lowercase().contains("chunked");
            }
            "content-type" => out.content_type = value.to_owned(),
            "x-stream-id" => out.stream_id = value.to_owned(),
            _ => {}
        }
    }
    Some(out)
}

/// What the chunked decoder hands on.
pub enum Ev<'a> {
    Data(&'a [u8]),
    /// The current chunk's data is complete.
    ChunkEnd,
    /// The zero-size last chunk: the body has ended.
    End,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    Size,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    Trailer,
    Done,
    Error,
}

/// Streaming chunked-body decoder (tiny state, one per listener).
#[derive(Debug)]
pub struct Chunked {
    st: St,
    size: u64,
    digits: u8,
    left: u64,
    /// Chunks fully received.
    pub chunks: u64,
}

impl Default for Chunked {
    fn default() -> Self {
        Self {
            st: St::Size,
            size: 0,
            digits: 0,
            left: 0,
            chunks: 0,
        }
    }
}

impl Chunked {
    /// Decodes `data`; returns false on a framing error.
    pub fn feed(&mut self, mut data: &[u8], mut out: impl FnMut(Ev<'_>)) -> bool {
        while !data.is_empty() {
            match self.st {
                St::Data => {
                    let n = (self.left as usize).min(data.len());
                    out(Ev::Data(&data[..n]));
                    self.left -= n as u64;
                    data = &data[n..];
                    if self.left == 0 {
                        self.chunks += 1;
                        out(Ev::ChunkEnd);
                        self.st = St::DataCr;
                    }
                }
                St::Done => return true, // ignore anything after the end
                St::Error => return false,
                _ => {
                    let b = data[0];
                    data = &data[1..];
                    self.byte(b, &mut out);
                }
            }
        }
        self.st != St::Error
    }

    fn byte(&mut self, b: u8, out: &mut impl FnMut(Ev<'_>)) {
        self.st = match (self.st, b) {
            (St::Size, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') if self.digits < 15 => {
                let v = (b as char).to_digit(16).unwrap_or(0);
                self.size = self.size * 16 + u64::from(v);
                self.digits += 1;
                St::Size
            }
            (St::Size, b';' | b' ' | b'\t') if self.digits > 0 => St::Ext,
            (St::Size | St::Ext, b'\r') if self.digits > 0 => St::SizeLf,
            (St::Ext, _) => St::Ext,
            (St::SizeLf, b'\n') => {
                let size = std::mem::take(&mut self.size);
                self.digits = 0;
                if size == 0 {
                    St::Trailer
                } else {
                    self.left = size;
                    St::Data
                }
            }
            (St::DataCr, b'\r') => St::DataLf,
            (St::DataLf, b'\n') => St::Size,
            // Trailer section: we only accept an empty one ("\r\n").
            (St::Trailer, b'\r') => St::Trailer,
            (St::Trailer, b'\n') => {
                out(Ev::End);
                St::Done
            }
            _ => St::Error,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-type: audio/mpeg\r\nTransfer-Encoding: chunked\r\nx-stream-id: abc\r\n\r\nxyz";
        let end = head_end(raw).unwrap();
        assert_eq!(&raw[end..], b"xyz");
        let h = parse_head(&raw[..end]).unwrap();
        assert_eq!(h.status, 200);
        assert!(h.chunked);
        assert_eq!(h.content_type, "audio/mpeg");
        assert_eq!(h.stream_id, "abc");
        assert_eq!(
            parse_head(b"HTTP/1.1 404 Not Found\r\n\r\n")
                .unwrap()
                .status,
            404
        );
        assert!(parse_head(b"garbage\r\n\r\n").is_none());
        assert!(head_end(b"HTTP/1.1 200 OK\r\n").is_none());
    }

    fn decode(body: &[u8], split: usize) -> (Vec<u8>, Vec<usize>, bool, bool) {
        let mut d = Chunked::default();
        let mut data = Vec::new();
        let mut ends = Vec::new();
        let mut ended = false;
        let mut ok = true;
        for c in body.chunks(split) {
            ok &= d.feed(c, |ev| match ev {
                Ev::Data(x) => data.extend_from_slice(x),
                Ev::ChunkEnd => ends.push(data.len()),
                Ev::End => ended = true,
            });
        }
        (data, ends, ended, ok)
    }

    #[test]
    fn chunked_any_split() {
        let body = b"5\r\nhello\r\nA;ext=1\r\n0123456789\r\n0\r\n\r\n";
        for split in 1..body.len() {
            let (data, ends, ended, ok) = decode(body, split);
            assert!(ok);
            assert_eq!(data, b"hello0123456789");
            assert_eq!(ends, vec![5, 15]);
            assert!(ended);
        }
    }

    #[test]
    fn chunked_errors() {
        assert!(!decode(b"zz\r\n", 100).3);
        assert!(!decode(b"3\r\nabcX\r\n", 100).3, "missing CRLF after data");
        assert!(!decode(b"\r\n", 100).3, "empty size");
    }
}
