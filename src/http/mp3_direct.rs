//! Live MP3 and Ogg/Opus served straight from the accept hook of the
//! plain-HTTP listeners. Owns recognising `GET /stream/{file}.mp3` (or
//! `.ogg`) from a peek at the request head, answering it, and handing the
//! socket to the stream's writer thread of that format
//! ([`crate::mp3::Fanout::attach`]): a listener then costs a few dozen bytes
//! and no task, instead of a task and an HTTP connection. Every other request
//! (`HEAD` included) is left unread and goes to the router as usual.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Uri};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::peek::{peek_until, Peeked};
use super::{find_live_stream, stream_file, tune, AppState, Refusal};

/// Longest request head we look at; larger ones go to the router.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The acceptor of plain-HTTP listeners: tunes the socket and takes over
/// live MP3 requests.
#[derive(Clone)]
pub struct Mp3Acceptor {
    state: AppState,
}

impl Mp3Acceptor {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

impl<S: Send + 'static> axum_server::accept::Accept<TcpStream, S> for Mp3Acceptor {
    type Stream = TcpStream;
    type Service = S;
    type Future = Pin<Box<dyn Future<Output = io::Result<(TcpStream, S)>> + Send>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let state = self.state.clone();
        Box::pin(async move {
            match take_over_mp3(state, stream).await {
                Accepted::ForRouter(stream) => Ok((stream, service)),
                // The acceptor interface has no other way to say that the
                // connection is not the router's: a typed marker, not a failure.
                Accepted::TakenOver => Err(io::Error::other(TakenOver)),
            }
        })
    }
}

/// What the acceptor did with a new connection.
enum Accepted {
    /// Not a live MP3 request: the router serves it.
    ForRouter(TcpStream),
    /// Served here as a live MP3 request (the socket went to the stream's
    /// writer, or the refusal was sent).
    TakenOver,
}

/// Why a connection does not reach the router: it was taken over as a live
/// MP3 listener. Not a failure.
#[derive(Debug, thiserror::Error)]
#[error("connection taken over as a live MP3 listener")]
pub struct TakenOver;

async fn take_over_mp3(state: AppState, stream: TcpStream) -> Accepted {
    tune(&stream);
    match peek_mp3_request(&stream).await {
        Some(request) => {
            serve(state, stream, request).await;
            Accepted::TakenOver
        }
        None => Accepted::ForRouter(stream),
    }
}

/// A `GET /stream/*.mp3` request head, still unread in the socket.
#[derive(Debug)]
struct Mp3Request {
    uri: Uri,
    file: String,
    headers: HeaderMap,
    http10: bool,
    head_len: usize,
}

/// Peeks at the request head; `Some` only for a complete, well-formed
/// `GET /stream/{file}.mp3` (no percent-escapes). Anything else, partial or
/// odd is left to the router, which knows how to answer it.
async fn peek_mp3_request(stream: &TcpStream) -> Option<Box<Mp3Request>> {
    const PREFIX: &[u8] = b"GET /stream/";
    let mut buf = vec![0u8; MAX_HEAD];
    let decided = peek_until(stream, &mut buf, HEAD_TIMEOUT, |bytes| {
        let seen = bytes.len().min(PREFIX.len());
        if bytes[..seen] != PREFIX[..seen] {
            return Peeked::Decided(None);
        }
        match parse_head(bytes) {
            Parsed::Mp3(request) => Peeked::Decided(Some(request)),
            Parsed::Other => Peeked::Decided(None),
            Parsed::Partial if bytes.len() == MAX_HEAD => Peeked::Decided(None),
            Parsed::Partial => Peeked::More,
        }
    })
    .await;
    decided.flatten()
}

#[derive(Debug)]
enum Parsed {
    Mp3(Box<Mp3Request>),
    Other,
    Partial,
}

fn parse_head(bytes: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    let (Some("GET"), Some(target), Some(version)) =
        (request.method, request.path, request.version)
    else {
        return Parsed::Other;
    };
    let Ok(uri) = target.parse::<Uri>() else {
        return Parsed::Other;
    };
    let Some(file) = uri.path().strip_prefix("/stream/") else {
        return Parsed::Other;
    };
    if stream_file(file).is_none() || file.contains('/') || file.contains('%') {
        return Parsed::Other;
    }
    let file = file.to_owned();
    let mut map = HeaderMap::new();
    for h in request.headers.iter() {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) {
            map.append(name, value);
        }
    }
    Parsed::Mp3(Box::new(Mp3Request {
        uri,
        file,
        headers: map,
        http10: version == 0,
        head_len,
    }))
}

/// Answers one live MP3 request and, if it is accepted, hands the socket over.
async fn serve(state: AppState, mut stream: TcpStream, request: Box<Mp3Request>) {
    let peer = stream
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    // Consume the head we peeked (it is already in the socket buffer).
    let mut head = vec![0u8; request.head_len];
    if stream.read_exact(&mut head).await.is_err() {
        return;
    }
    let version = if request.http10 {
        "HTTP/1.0"
    } else {
        "HTTP/1.1"
    };
    let found = find_live_stream(&state, &request.file, &request.uri, &request.headers, true).await;
    let (stream_id, fanout) = match found {
        Ok(found) => found,
        Err(refusal) => {
            let _ = stream.write_all(&refusal_bytes(version, &refusal)).await;
            let _ = stream.shutdown().await;
            return;
        }
    };
    let chunked = !request.http10;
    let format = fanout.format();
    let response = response_head(version, &stream_id, format.content_type(), chunked);
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    let socket = match stream.into_std() {
        Ok(socket) => socket,
        Err(err) => {
            tracing::warn!(error = %err, "listener: could not take the socket");
            return;
        }
    };
    match fanout.attach(socket, peer, chunked) {
        Ok(()) => tracing::info!(
            stream = %stream_id,
            format = format.name(),
            peer = %peer,
            listeners = fanout.listener_count(),
            "listener joined"
        ),
        Err(err) => {
            tracing::error!(stream = %stream_id, error = %err, "listener: no writer thread")
        }
    }
}

/// The head of a live response (its body is chunked for HTTP/1.1).
fn response_head(version: &str, stream_id: &str, content_type: &str, chunked: bool) -> String {
    let id_header = HeaderValue::from_str(stream_id)
        .map(|_| format!("x-stream-id: {stream_id}\r\n"))
        .unwrap_or_default();
    let encoding = if chunked {
        "transfer-encoding: chunked\r\n"
    } else {
        ""
    };
    format!(
        "{version} 200 OK\r\ncontent-type: {content_type}\r\ncache-control: no-cache, no-store\r\n\
         {id_header}{encoding}connection: close\r\n\r\n"
    )
}

/// A complete HTTP response for a refusal (the connection closes after it).
fn refusal_bytes(version: &str, refusal: &Refusal) -> Vec<u8> {
    let body = refusal.body();
    let mut head = format!(
        "{version} {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        refusal.status.as_u16(),
        refusal.status.canonical_reason().unwrap_or(""),
        body.len()
    );
    if let Some((name, value)) = &refusal.header {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mp3(bytes: &[u8]) -> Box<Mp3Request> {
        match parse_head(bytes) {
            Parsed::Mp3(r) => r,
            other => panic!("expected an mp3 request, got {other:?}"),
        }
    }

    #[test]
    fn recognises_live_mp3_requests() {
        let r = mp3(b"GET /stream/abc.mp3?wait=2&token=t HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n\r\n");
        assert_eq!(r.file, "abc.mp3");
        assert_eq!(r.uri.query(), Some("wait=2&token=t"));
        assert_eq!(r.headers["authorization"], "Bearer k");
        assert!(!r.http10);
        let r = mp3(b"GET /stream/abc.ogg HTTP/1.1\r\n\r\n");
        assert_eq!(r.file, "abc.ogg");
        let r = mp3(b"GET /stream/latest.mp3 HTTP/1.0\r\n\r\nextra body bytes");
        assert!(r.http10);
        assert_eq!(r.head_len, b"GET /stream/latest.mp3 HTTP/1.0\r\n\r\n".len());
    }

    #[test]
    fn leaves_everything_else_to_the_router() {
        for head in [
            &b"GET /stream/status HTTP/1.1\r\n\r\n"[..],
            b"HEAD /stream/a.mp3 HTTP/1.1\r\n\r\n",
            b"GET /stream/a%20b.mp3 HTTP/1.1\r\n\r\n",
            b"GET /stream/x/y.mp3 HTTP/1.1\r\n\r\n",
            b"GET /stream/a.wav HTTP/1.1\r\n\r\n",
            b"GET /stream/a.xogg HTTP/1.1\r\n\r\n",
            b"GET /stream/a.mp3 HTTP/1.1\r\nBad Header\r\n\r\n",
            b"POST /stream/a.mp3 HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(head), Parsed::Other),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        assert!(matches!(
            parse_head(b"GET /stream/a.mp3 HTTP/1.1\r\nHost: x"),
            Parsed::Partial
        ));
    }
}
