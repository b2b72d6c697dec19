//! Looking at what a new connection sends before anyone reads it: peeks at
//! the socket until a caller's test decides, for a bounded time. Bytes that
//! arrive in pieces are waited for with growing pauses (peek returns at once
//! while bytes are buffered), so a client trickling them cannot make us spin.

use std::time::Duration;

use tokio::net::TcpStream;

/// Pauses between peeks while the deciding bytes arrive: the first is
/// short, each next one twice as long up to the last.
const PAUSE_FIRST: Duration = Duration::from_millis(5);
const PAUSE_MAX: Duration = Duration::from_millis(250);

/// What a caller's test says of the bytes seen so far.
pub(super) enum Peeked<T> {
    Decided(T),
    /// More bytes are needed.
    More,
}

/// Peeks into `buf` until `decide` decides; `None` if the connection closes,
/// or sends too little within `timeout`.
pub(super) async fn peek_until<T>(
    stream: &TcpStream,
    buf: &mut [u8],
    timeout: Duration,
    mut decide: impl FnMut(&[u8]) -> Peeked<T>,
) -> Option<T> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = PAUSE_FIRST;
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if let Peeked::Decided(v) = decide(&buf[..n]) {
            return Some(v);
        }
        if tokio::time::Instant::now() + pause > deadline {
            return None;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(PAUSE_MAX);
    }
}
