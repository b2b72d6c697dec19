//! One stream pushed to one Icecast mount: the source connection (our own
//! TCP, an HTTP `PUT` with `Expect: 100-continue`, then the raw audio bytes,
//! never a chunked body), its retries with [`Backoff`] while the stream
//! lives, and the log lines and metrics of its state. The bytes come from
//! an ordinary [`Listener`] of the stream's fan-out, so a slow Icecast is
//! one more slow listener: dropped by the ring when it lags too far, never
//! a delay for the relay or anyone else.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::target::{percent_encode, IcecastUrl, Password};
use crate::backoff::Backoff;
use crate::metrics::metrics;
use crate::mp3::{Fanout, Format};
use crate::ogg_opus::FromPageZero;

/// How long connecting, and then the response to the `PUT`, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one write may block before the server counts as stalled.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest response head we read.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;
/// The first nominal wait before a retry, doubling up to [`RETRY_CAP`].
const RETRY_BASE: Duration = Duration::from_millis(500);
/// The longest nominal wait between retries.
const RETRY_CAP: Duration = Duration::from_secs(15);
/// A connection that streamed this long starts the retry schedule over.
const RESET_AFTER: Duration = Duration::from_secs(10);

/// Where one push goes, with which credentials (`Debug` shows no
/// password), and the MP3 bit rate it announces.
#[derive(Clone, Debug)]
pub struct Destination {
    pub url: Arc<IcecastUrl>,
    pub password: Password,
    /// `--mp3-bitrate`: announced as `ice-bitrate` and in `ice-audio-info`
    /// (Icecast shows them in its status and directory listings).
    pub mp3_kbps: u32,
}

/// Why a connection ended other than with the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Failure {
    /// Could not connect, or the connection broke before a response.
    Unreachable(String),
    /// The server answered the `PUT` with something else than 100 or 200.
    Refused(u16, String),
    /// The connection broke while streaming.
    Dropped(String),
    /// The server stopped reading (a write blocked too long), or fell so
    /// far behind that the ring dropped its listener.
    TooSlow,
}

impl Failure {
    /// The label of `voice_relay_icecast_push_failures_total`.
    fn reason(&self) -> &'static str {
        match self {
            Failure::Unreachable(_) => "unreachable",
            Failure::Refused(..) => "refused",
            Failure::Dropped(_) => "dropped",
            Failure::TooSlow => "too_slow",
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            Failure::Refused(401, _) => " (wrong user or password?)",
            Failure::Refused(403, _) => " (mount in use by another source, or not allowed?)",
            _ => "",
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Unreachable(e) => write!(f, "cannot connect: {e}"),
            Failure::Refused(status, reason) => {
                write!(f, "refused the source: {status} {reason}{}", self.hint())
            }
            Failure::Dropped(e) => write!(f, "connection lost: {e}"),
            Failure::TooSlow => f.write_str("too slow to take the stream; reconnecting"),
        }
    }
}

/// How a connection ended.
enum Ended {
    /// The stream ended; the source disconnected cleanly.
    Stream,
    /// It failed after streaming for this long (zero: never streamed).
    Failed(Failure, Duration),
}

/// Pushes `stream` to `dest` until the stream ends, reconnecting with
/// backoff. `stop` resolving (or its sender dropping) means the stream is
/// over: no more retries.
pub async fn push(
    dest: Destination,
    stream: Arc<str>,
    fanout: Arc<Fanout>,
    mut stop: oneshot::Receiver<()>,
) {
    let mount = dest.url.mount_for(&stream);
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_CAP);
    let mut last_failure: Option<Failure> = None;
    while !fanout.is_closed() {
        match connect_and_stream(&dest, &mount, &stream, &fanout, &mut last_failure).await {
            Ended::Stream => {
                tracing::info!(stream = %stream, mount, server = %dest.url.authority(), "icecast source ended with the stream");
                return;
            }
            Ended::Failed(failure, streamed) => {
                connection_lasted(&mut backoff, streamed);
                note_failure(&dest, &mount, &stream, &failure, &mut last_failure);
            }
        }
        let wait = backoff.next_wait(rand::random());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = &mut stop => return,
        }
    }
}

/// After a connection ended: one that streamed for [`RESET_AFTER`] starts
/// the retry schedule over; a short one keeps backing off.
fn connection_lasted(backoff: &mut Backoff, streamed: Duration) {
    if streamed >= RESET_AFTER {
        backoff.reset();
    }
}

/// One connection: connect, `PUT`, stream until the stream ends or it fails.
async fn connect_and_stream(
    dest: &Destination,
    mount: &str,
    stream: &str,
    fanout: &Fanout,
    last_failure: &mut Option<Failure>,
) -> Ended {
    metrics().icecast_push_connects.inc();
    let format = fanout.format();
    let mut socket = match open_source(dest, mount, stream, format).await {
        Ok(socket) => socket,
        Err(failure) => return Ended::Failed(failure, Duration::ZERO),
    };
    let resumed = last_failure.take().is_some();
    tracing::info!(
        stream,
        mount,
        server = %dest.url.authority(),
        format = format.name(),
        resumed,
        "icecast source connected"
    );
    if format == Format::Mp3 {
        tokio::spawn(set_title(dest.clone(), mount.to_owned(), stream.to_owned()));
    }
    let streaming = Streaming::counted();
    let since = Instant::now();
    let result = stream_to(&mut socket, fanout).await;
    drop(streaming);
    match result {
        Ok(()) => {
            let _ = socket.shutdown().await;
            Ended::Stream
        }
        Err(failure) => Ended::Failed(failure, since.elapsed()),
    }
}

/// Counts a connection in `voice_relay_icecast_pushes` while it streams,
/// also when its task is aborted (another stream took the mount).
struct Streaming;

impl Streaming {
    fn counted() -> Self {
        metrics().icecast_pushes.inc();
        Streaming
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        metrics().icecast_pushes.dec();
    }
}

/// Logs a failure once per change of state (repeats at debug level) and
/// counts it.
fn note_failure(
    dest: &Destination,
    mount: &str,
    stream: &str,
    failure: &Failure,
    last: &mut Option<Failure>,
) {
    metrics()
        .icecast_push_failures
        .with_label_values(&[failure.reason()])
        .inc();
    if let Failure::Refused(status, _) = failure {
        metrics()
            .icecast_push_refused
            .with_label_values(&[&status.to_string()])
            .inc();
    }
    let server = dest.url.authority();
    if last.as_ref() == Some(failure) {
        tracing::debug!(stream, mount, server, "icecast: still {failure}");
    } else {
        tracing::warn!(stream, mount, server, "icecast: {failure}");
    }
    *last = Some(failure.clone());
}

/// Connects and sends the `PUT`; `Ok` once the server said 100 or 200.
async fn open_source(
    dest: &Destination,
    mount: &str,
    stream: &str,
    format: Format,
) -> Result<TcpStream, Failure> {
    let unreachable = |e: std::io::Error| Failure::Unreachable(e.to_string());
    let address = (dest.url.host.as_str(), dest.url.port);
    let mut socket = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await
    {
        Ok(connected) => connected.map_err(unreachable)?,
        Err(_) => return Err(Failure::Unreachable("timed out".into())),
    };
    let _ = socket.set_nodelay(true);
    let head = put_head(dest, mount, stream, format);
    socket
        .write_all(head.as_bytes())
        .await
        .map_err(unreachable)?;
    let (status, reason) = tokio::time::timeout(CONNECT_TIMEOUT, read_status(&mut socket))
        .await
        .map_err(|_| Failure::Unreachable("no response to the PUT".into()))??;
    match status {
        100 | 200 => Ok(socket),
        _ => Err(Failure::Refused(status, reason)),
    }
}

/// The request head of the source `PUT` (no body length: the body is the
/// stream, written raw until the connection closes).
fn put_head(dest: &Destination, mount: &str, stream: &str, format: Format) -> String {
    let name = header_text(stream);
    // Icecast reads an Ogg stream's parameters from the stream itself.
    let audio_info = match format {
        Format::Mp3 => format!(
            "ice-bitrate: {kbps}\r\n\
             ice-audio-info: ice-samplerate={rate};ice-bitrate={kbps};ice-channels=1\r\n",
            kbps = dest.mp3_kbps,
            rate = crate::mp3::SAMPLE_RATE,
        ),
        Format::Ogg => String::new(),
    };
    format!(
        "PUT {mount} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\n\
         User-Agent: voice-relay/{version}\r\nContent-Type: {content_type}\r\n\
         ice-name: {name}\r\nice-description: voice-relay stream {name}\r\n\
         ice-public: 0\r\n{audio_info}Expect: 100-continue\r\n\r\n",
        host = dest.url.authority(),
        auth = basic_auth(&dest.url.user, &dest.password),
        version = env!("CARGO_PKG_VERSION"),
        content_type = format.content_type(),
    )
}

fn basic_auth(user: &str, password: &Password) -> String {
    let pair = format!("{user}:{}", password.expose());
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

/// `s` without control characters, fit for a header value.
fn header_text(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).collect()
}

/// Reads a response head and returns its status and reason.
async fn read_status(socket: &mut TcpStream) -> Result<(u16, String), Failure> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = socket
            .read(&mut chunk)
            .await
            .map_err(|e| Failure::Unreachable(e.to_string()))?;
        if n == 0 {
            return Err(Failure::Unreachable(
                "connection closed before a response".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(status) = parse_status(&buf)? {
            return Ok(status);
        }
    }
}

/// The status and reason of a complete response head in `buf`, `None` while
/// it is incomplete.
fn parse_status(buf: &[u8]) -> Result<Option<(u16, String)>, Failure> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let bad = |what: &str| Failure::Unreachable(format!("not an HTTP server: {what}"));
    match response.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {
            let status = response.code.ok_or_else(|| bad("no status"))?;
            Ok(Some((status, response.reason.unwrap_or("").to_owned())))
        }
        Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => Ok(None),
        Ok(httparse::Status::Partial) => Err(bad("response head too long")),
        Err(e) => Err(bad(&e.to_string())),
    }
}

/// Writes the stream's burst and live bytes to `socket`. `Ok` when the
/// stream ended; an error when the server went away or fell behind.
async fn stream_to(socket: &mut TcpStream, fanout: &Fanout) -> Result<(), Failure> {
    let mut audio = Box::pin(fanout.subscribe().into_stream());
    let mut ogg = (fanout.format() == Format::Ogg).then(FromPageZero::default);
    let (mut from_server, mut to_server) = socket.split();
    let mut scratch = [0u8; 256];
    let mut from_icecast = Vec::new();
    loop {
        tokio::select! {
            item = audio.next() => match item {
                None => return Ok(()),
                Some(Err(_)) => return Err(Failure::TooSlow),
                Some(Ok(mut bytes)) => {
                    if let Some(ogg) = &mut ogg {
                        bytes = ogg.renumber(bytes);
                    }
                    match tokio::time::timeout(WRITE_TIMEOUT, to_server.write_all(&bytes)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(Failure::Dropped(e.to_string())),
                        Err(_) => return Err(Failure::TooSlow),
                    }
                }
            },
            // After its 100 Continue, Icecast 2.4 also sends a 200 OK head;
            // then nothing while the source streams. Anything else is the
            // connection closing, or an error the server sent.
            read = from_server.read(&mut scratch) => match read {
                Ok(0) => return Err(Failure::Dropped("closed by the server".into())),
                Ok(n) => {
                    from_icecast.extend_from_slice(&scratch[..n]);
                    server_said_ok(&mut from_icecast)?;
                }
                Err(e) => return Err(Failure::Dropped(e.to_string())),
            }
        }
    }
}

/// Checks what the server sent while streaming: complete `2xx` response
/// heads are consumed, a partial one is kept, anything else ends the
/// connection.
fn server_said_ok(received: &mut Vec<u8>) -> Result<(), Failure> {
    loop {
        if received.is_empty() {
            return Ok(());
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(received) {
            Ok(httparse::Status::Complete(len)) if response.code.is_some_and(|c| c / 100 == 2) => {
                received.drain(..len);
            }
            Ok(httparse::Status::Partial) if received.len() < MAX_RESPONSE_HEAD => return Ok(()),
            Ok(httparse::Status::Complete(_)) => {
                let status = response.code.unwrap_or(0);
                let reason = response.reason.unwrap_or("").to_owned();
                return Err(Failure::Dropped(format!(
                    "the server said {status} {reason}"
                )));
            }
            _ => {
                return Err(Failure::Dropped(
                    "the server sent something unexpected".into(),
                ))
            }
        }
    }
}

/// Sets the mount's ICY `StreamTitle` to the stream's name, with Icecast's
/// metadata update and the source credentials. Best effort: MP3 listeners
/// asking for ICY metadata see who is talking; a failure is logged only.
async fn set_title(dest: Destination, mount: String, stream: String) {
    let path = format!(
        "/admin/metadata?mount={}&mode=updinfo&song={}",
        percent_encode(&mount),
        percent_encode(&stream)
    );
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nAuthorization: {auth}\r\n\
         User-Agent: voice-relay/{version}\r\n\r\n",
        host = dest.url.authority(),
        auth = basic_auth(&dest.url.user, &dest.password),
        version = env!("CARGO_PKG_VERSION"),
    );
    let update = async {
        let address = (dest.url.host.as_str(), dest.url.port);
        let mut socket = TcpStream::connect(address)
            .await
            .map_err(|e| Failure::Unreachable(e.to_string()))?;
        socket
            .write_all(request.as_bytes())
            .await
            .map_err(|e| Failure::Unreachable(e.to_string()))?;
        read_status(&mut socket).await
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, update).await {
        Ok(Ok((200, _))) => tracing::debug!(stream, mount, "icecast: stream title set"),
        Ok(Ok((status, reason))) => {
            tracing::info!(
                stream,
                mount,
                "icecast: stream title not set: {status} {reason}"
            )
        }
        Ok(Err(failure)) => {
            tracing::info!(stream, mount, "icecast: stream title not set: {failure}")
        }
        Err(_) => tracing::info!(stream, mount, "icecast: stream title not set: timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(url: &str) -> Destination {
        let url: IcecastUrl = url.parse().expect("url");
        let password = url.password.clone().unwrap_or_default();
        Destination {
            url: Arc::new(url),
            password,
            mp3_kbps: 96,
        }
    }

    #[test]
    fn only_a_long_connection_resets() {
        let mut b = Backoff::new(RETRY_BASE, RETRY_CAP);
        for _ in 0..4 {
            b.next_wait(0.5);
        }
        connection_lasted(&mut b, RESET_AFTER - Duration::from_millis(1));
        assert_eq!(
            b.nominal(),
            RETRY_BASE * 16,
            "a short connection keeps backing off"
        );
        connection_lasted(&mut b, RESET_AFTER);
        assert_eq!(b.nominal(), RETRY_BASE);
    }

    #[test]
    fn put_head_has_icecast_headers_and_no_chunking() {
        let d = dest("icecast://source:hackme@h:8000/{id}.mp3");
        let head = put_head(&d, "/s1.mp3", "s1\r\nX: y", Format::Mp3);
        assert!(head.starts_with("PUT /s1.mp3 HTTP/1.1\r\nHost: h:8000\r\n"));
        // base64("source:hackme")
        assert!(head.contains("Authorization: Basic c291cmNlOmhhY2ttZQ==\r\n"));
        assert!(head.contains("Content-Type: audio/mpeg\r\n"));
        assert!(head.contains("ice-name: s1X: y\r\n"), "no header injection");
        assert!(head.contains("ice-public: 0\r\n"));
        assert!(head.contains("ice-bitrate: 96\r\n"));
        assert!(
            head.contains("ice-audio-info: ice-samplerate=48000;ice-bitrate=96;ice-channels=1\r\n")
        );
        assert!(head.ends_with("Expect: 100-continue\r\n\r\n"));
        assert!(!head.to_ascii_lowercase().contains("transfer-encoding"));
        assert!(!head.to_ascii_lowercase().contains("content-length"));
        let ogg = put_head(&d, "/s1.ogg", "s1", Format::Ogg);
        assert!(ogg.contains("Content-Type: audio/ogg\r\n"));
        assert!(!ogg.contains("ice-bitrate"));
    }

    #[test]
    fn parses_statuses_in_pieces() {
        assert_eq!(parse_status(b"HTTP/1.1 100 Contin"), Ok(None));
        assert_eq!(
            parse_status(b"HTTP/1.1 100 Continue\r\n\r\n"),
            Ok(Some((100, "Continue".into())))
        );
        assert_eq!(
            parse_status(b"HTTP/1.0 403 Forbidden\r\nContent-Type: text/html\r\n\r\n<html>"),
            Ok(Some((403, "Forbidden".into())))
        );
        assert!(matches!(
            parse_status(b"ICY 200 OK\r\n\r\n"),
            Err(Failure::Unreachable(_))
        ));
        let long = [b'a'; MAX_RESPONSE_HEAD];
        let mut head = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        head.extend_from_slice(&long);
        assert!(parse_status(&head).is_err(), "a head that never ends");
    }

    #[test]
    fn a_200_after_the_100_continue_is_fine_anything_else_ends() {
        let mut got = b"HTTP/1.0 200 OK\r\n".to_vec();
        assert_eq!(server_said_ok(&mut got), Ok(()), "partial head kept");
        got.extend_from_slice(b"\r\n");
        assert_eq!(server_said_ok(&mut got), Ok(()));
        assert!(got.is_empty(), "complete 200 consumed");
        let mut got = b"HTTP/1.0 403 Forbidden\r\n\r\n".to_vec();
        assert!(matches!(server_said_ok(&mut got), Err(Failure::Dropped(m)) if m.contains("403")));
        let mut got = b"garbage\r\n\r\n".to_vec();
        assert!(server_said_ok(&mut got).is_err());
    }

    #[test]
    fn failures_explain_themselves() {
        let f = Failure::Refused(401, "Authentication Required".into());
        assert_eq!(
            f.to_string(),
            "refused the source: 401 Authentication Required (wrong user or password?)"
        );
        assert_eq!(f.reason(), "refused");
    }
}
