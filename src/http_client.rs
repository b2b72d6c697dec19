//! A minimal HTTP/1.1 client for the server's own outgoing requests (the
//! WHIP push's `POST` and `DELETE`): one request per connection
//! (`Connection: close`), plain `http://` only, a bounded response read
//! within a deadline, and its parse ([`parse_response`], which the health
//! probe shares).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response read (head and body).
pub const MAX_RESPONSE: usize = 64 * 1024;

/// Where a request goes: `http://host[:port]/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    /// Starts with `/`; may hold a query.
    pub path: String,
}

impl Url {
    /// Parses an `http://` URL. `https://` and other schemes are refused
    /// with a message saying so.
    pub fn parse(text: &str) -> Result<Url, String> {
        let rest = match text.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "only http:// URLs are supported, not {scheme}:// (put a TLS-terminating proxy in front of the far end)"
                ))
            }
            None => return Err(format!("not a URL: {text:?} (expected http://HOST[:PORT]/PATH)")),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err("user info in the URL is not supported (use the token option)".into());
        }
        let (host, port) = split_host_port(authority)?;
        if path.chars().any(|c| c.is_ascii_control() || c == ' ') {
            return Err("the URL path has spaces or control characters".into());
        }
        Ok(Url {
            host,
            port,
            path: path.to_owned(),
        })
    }

    /// The URL a `Location` header names, relative to this one.
    pub fn join(&self, location: &str) -> Result<Url, String> {
        if location.contains("://") {
            return Url::parse(location);
        }
        let path = if location.starts_with('/') {
            location.to_owned()
        } else {
            let dir = self.path.rsplit_once('/').map_or("", |(d, _)| d);
            format!("{dir}/{location}")
        };
        Url::parse(&format!("http://{}{path}", self.authority()))
    }

    /// `host:port` (IPv6 hosts in brackets), for `Host:` and logs.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority(), self.path)
    }
}

fn split_host_port(authority: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or("an IPv6 host lacks its closing ']'")?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("the URL has no host".into());
    }
    let port = match port {
        Some(p) => p.parse().map_err(|_| format!("bad port {p:?}"))?,
        None => 80,
    };
    Ok((host.to_owned(), port))
}

/// One request.
pub struct Request<'a> {
    pub method: &'a str,
    pub url: &'a Url,
    /// Extra header lines, without their CRLF (never logged).
    pub headers: &'a [String],
    pub body: &'a [u8],
}

/// A parsed response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the response is not HTTP")]
    NotHttp,
    #[error("the response is larger than {MAX_RESPONSE} bytes")]
    TooLarge,
}

/// Sends `req` and reads its response, all within `timeout`.
pub async fn send(req: &Request<'_>, timeout: Duration) -> Result<Response, HttpError> {
    tokio::time::timeout(timeout, exchange(req))
        .await
        .map_err(|_| HttpError::Timeout(timeout))?
}

async fn exchange(req: &Request<'_>) -> Result<Response, HttpError> {
    let url = req.url;
    let mut tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| HttpError::Connect(url.authority(), e))?;
    let _ = tcp.set_nodelay(true);
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: voice-relay\r\nContent-Length: {}\r\n",
        req.method,
        url.path,
        url.authority(),
        req.body.len()
    );
    for h in req.headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(req.body).await?;
    tcp.flush().await?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if raw.len() > MAX_RESPONSE {
            return Err(HttpError::TooLarge);
        }
        if is_complete(&raw) {
            break;
        }
    }
    parse_response(&raw).ok_or(HttpError::NotHttp)
}

/// Whether `raw` holds a whole response by its `Content-Length` (a server
/// may keep the connection open despite `Connection: close`).
fn is_complete(raw: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(head_len)) = response.parse(raw) else {
        return false;
    };
    let length = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    length.is_some_and(|n| raw.len() >= head_len + n)
}

/// Parses a whole response read until the server closed: its status,
/// headers, and body (de-chunked; cut to `Content-Length`). `None` if it
/// is not HTTP.
pub fn parse_response(raw: &[u8]) -> Option<Response> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    let status = response.code?;
    let headers: Vec<(String, String)> = response
        .headers
        .iter()
        .map(|h| {
            let value = String::from_utf8_lossy(h.value).trim().to_owned();
            (h.name.to_owned(), value)
        })
        .collect();
    let mut parsed = Response {
        status,
        headers,
        body: Vec::new(),
    };
    let body = &raw[head_len..];
    let chunked = parsed
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let length = parsed
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok());
    parsed.body = match (chunked, length) {
        (true, _) => dechunk(body),
        (false, Some(n)) => body[..n.min(body.len())].to_vec(),
        (false, None) => body.to_vec(),
    };
    Some(parsed)
}

/// The payload of a chunked body (as much as is complete).
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = body.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_field = String::from_utf8_lossy(&body[..eol]);
        let size_hex = size_field.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_hex, 16) else {
            return out;
        };
        let start = eol + 2;
        if size == 0 || body.len() < start + size {
            return out;
        }
        out.extend_from_slice(&body[start..start + size]);
        body = body.get(start + size + 2..).unwrap_or(&[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_urls_and_refuses_others() {
        let u = Url::parse("http://127.0.0.1:8080/whip/{id}?x=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 8080, "/whip/{id}?x=1")
        );
        let u = Url::parse("HTTP://edge.example").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("edge.example", 80, "/")
        );
        let u = Url::parse("http://[::1]:9/a").unwrap();
        assert_eq!(
            (u.host.as_str(), u.authority()),
            ("::1", "[::1]:9".to_owned())
        );
        assert!(Url::parse("https://edge/whip")
            .unwrap_err()
            .contains("https"));
        assert!(Url::parse("edge:8080/whip").is_err());
        assert!(Url::parse("http://:80/").is_err());
        assert!(Url::parse("http://h:port/").is_err());
        assert!(Url::parse("http://u:p@h/").is_err());
    }

    #[test]
    fn a_location_is_resolved_against_the_request() {
        let base = Url::parse("http://10.0.0.2:8080/whip/abc").unwrap();
        assert_eq!(
            base.join("/whip/session/1").unwrap().to_string(),
            "http://10.0.0.2:8080/whip/session/1"
        );
        assert_eq!(
            base.join("session/2").unwrap().to_string(),
            "http://10.0.0.2:8080/whip/session/2"
        );
        assert_eq!(
            base.join("http://other:81/s").unwrap().to_string(),
            "http://other:81/s"
        );
        assert!(base.join("https://other/s").is_err());
    }

    #[test]
    fn parses_length_and_chunked_bodies() {
        let r = parse_response(
            b"HTTP/1.1 201 Created\r\nLocation: /s/1\r\nContent-Length: 3\r\n\r\nv=0trailing",
        )
        .unwrap();
        assert_eq!(
            (r.status, r.header("location"), &r.body[..]),
            (201, Some("/s/1"), &b"v=0"[..])
        );
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, b"abcde");
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n").is_none());
        assert!(is_complete(
            b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!is_complete(
            b"HTTP/1.1 201 Created\r\nContent-Length: 9\r\n\r\nv=0"
        ));
    }
}
