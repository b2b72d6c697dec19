//! The HTTP port is also the ICE-TCP port: this acceptor looks at the first
//! bytes of every accepted connection and tells the two apart. An RFC 4571
//! frame holding a STUN binding request (a 2-byte length, then STUN type
//! 0x0001 and the magic cookie) goes to the media relay
//! ([`Command::IceTcp`]); anything else (an HTTP request line, a TLS
//! ClientHello) goes on to the HTTP acceptor it wraps, as before. A
//! connection that sends nothing within [`FIRST_BYTES_TIMEOUT`] is closed.
//!
//! The two cannot be confused: a frame's first byte is the high byte of a
//! length of at most [`MAX_ICE_FIRST`] (`0x00`–`0x08`), while an HTTP
//! request starts with a letter of its method and TLS with `0x16`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::TcpStream;

use super::peek::{peek_until, Peeked};
use crate::metrics::metrics;
use crate::relay::{Command, RelayHandle};

/// How long a new connection may take to send its first bytes.
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes that decide: the length prefix and the STUN header up to the end of
/// the magic cookie.
const DECIDING: usize = 2 + 8;
/// Longest frame a first STUN check may come in (the relay's frame limit).
const MAX_ICE_FIRST: usize = 2048;
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

/// What the first bytes of a connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstBytes {
    /// An RFC 4571 framed STUN binding request: ICE-TCP.
    Ice,
    /// Anything else: for the HTTP (or TLS) acceptor, which answers it.
    Http,
    /// So far a possible ICE frame: more bytes decide.
    NeedMore,
}

/// Classifies the first bytes seen of a connection.
pub fn classify(bytes: &[u8]) -> FirstBytes {
    let Some(first) = bytes.first() else {
        return FirstBytes::NeedMore;
    };
    if usize::from(*first) > MAX_ICE_FIRST >> 8 {
        return FirstBytes::Http;
    }
    // Each known byte must agree with the frame of a binding request.
    let consistent = bytes
        .iter()
        .take(DECIDING)
        .enumerate()
        .all(|(i, b)| match i {
            2 => *b == 0x00,
            3 => *b == 0x01,
            6..=9 => *b == MAGIC_COOKIE[i - 6],
            _ => true,
        });
    if !consistent {
        return FirstBytes::Http;
    }
    if bytes.len() < DECIDING {
        return FirstBytes::NeedMore;
    }
    let frame = usize::from(u16::from_be_bytes([bytes[0], bytes[1]]));
    let stun = usize::from(u16::from_be_bytes([bytes[4], bytes[5]]));
    if frame == stun + 20 && stun % 4 == 0 && frame <= MAX_ICE_FIRST {
        FirstBytes::Ice
    } else {
        FirstBytes::Http
    }
}

/// The acceptor of the main listener: ICE-TCP to the relay, the rest to
/// `inner`.
#[derive(Clone)]
pub struct IceTcpDemux<A> {
    inner: A,
    relay: RelayHandle,
}

impl<A> IceTcpDemux<A> {
    pub fn new(inner: A, relay: RelayHandle) -> Self {
        Self { inner, relay }
    }
}

/// Why a connection does not reach the router: it went to the media relay
/// as ICE-TCP, or sent nothing in time. Not a failure of the server.
#[derive(Debug, thiserror::Error)]
pub enum NotHttp {
    #[error("connection handed to the media relay (ICE-TCP)")]
    IceTcp,
    #[error("connection sent nothing recognisable in time")]
    Silent,
}

impl<A, S> axum_server::accept::Accept<TcpStream, S> for IceTcpDemux<A>
where
    A: axum_server::accept::Accept<TcpStream, S> + Clone + Send + Sync + 'static,
    A::Future: Send,
    S: Send + 'static,
{
    type Stream = A::Stream;
    type Service = A::Service;
    type Future = Pin<Box<dyn Future<Output = io::Result<(A::Stream, A::Service)>> + Send>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let (inner, relay) = (self.inner.clone(), self.relay.clone());
        Box::pin(async move {
            let kind = first_bytes(&stream).await;
            let label = match kind {
                Some(FirstBytes::Ice) => "ice",
                Some(_) => "http",
                None => "silent",
            };
            metrics().tcp_first_bytes.with_label_values(&[label]).inc();
            match kind {
                Some(FirstBytes::Ice) => {
                    hand_to_relay(&relay, stream);
                    Err(io::Error::other(NotHttp::IceTcp))
                }
                Some(_) => inner.accept(stream, service).await,
                None => Err(io::Error::other(NotHttp::Silent)),
            }
        })
    }
}

/// Peeks until the first bytes decide; `None` when the connection sends
/// nothing (or too little) in time, or closes.
async fn first_bytes(stream: &TcpStream) -> Option<FirstBytes> {
    let mut buf = [0u8; DECIDING];
    peek_until(
        stream,
        &mut buf,
        FIRST_BYTES_TIMEOUT,
        |bytes| match classify(bytes) {
            FirstBytes::NeedMore => Peeked::More,
            decided => Peeked::Decided(decided),
        },
    )
    .await
}

fn hand_to_relay(relay: &RelayHandle, stream: TcpStream) {
    let remote = stream.peer_addr().ok();
    let Ok(stream) = stream.into_std() else {
        return;
    };
    if let Err(e) = relay.send(Command::IceTcp { stream }) {
        tracing::info!(?remote, error = %e, "ICE-TCP connection dropped: the relay did not take it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A framed STUN binding request of `stun_len` attribute bytes.
    fn ice(stun_len: u16) -> Vec<u8> {
        let mut b = (stun_len + 20).to_be_bytes().to_vec();
        b.extend_from_slice(&[0x00, 0x01]);
        b.extend_from_slice(&stun_len.to_be_bytes());
        b.extend_from_slice(&MAGIC_COOKIE);
        b.extend_from_slice(&[0xAB; 12]); // transaction id
        b
    }

    #[test]
    fn a_framed_binding_request_is_ice_once_ten_bytes_are_in() {
        let frame = ice(80);
        for n in 0..DECIDING {
            assert_eq!(classify(&frame[..n]), FirstBytes::NeedMore, "{n} bytes");
        }
        assert_eq!(classify(&frame[..DECIDING]), FirstBytes::Ice);
        assert_eq!(classify(&frame), FirstBytes::Ice);
        assert_eq!(
            classify(&ice(2000)),
            FirstBytes::Ice,
            "length high byte 0x07"
        );
    }

    #[test]
    fn http_and_tls_are_http_from_their_first_byte() {
        for req in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /whip HTTP/1.1\r\n",
            b"OPTIONS * HTTP/1.1",
            b"PRI * HTTP/2.0\r\n",
            b"G",
            &[0x16, 0x03, 0x01, 0x02, 0x00], // TLS ClientHello record
        ] {
            assert_eq!(classify(req), FirstBytes::Http, "{req:?}");
        }
    }

    #[test]
    fn frames_that_are_not_a_binding_request_are_not_ice() {
        let mut response = ice(80);
        response[3] = 0x01;
        response[2] = 0x01; // binding success response 0x0101
        assert_eq!(classify(&response), FirstBytes::Http);
        let mut no_cookie = ice(80);
        no_cookie[9] ^= 0xff;
        assert_eq!(classify(&no_cookie[..9]), FirstBytes::NeedMore);
        assert_eq!(classify(&no_cookie), FirstBytes::Http);
        let mut wrong_length = ice(80);
        wrong_length[1] += 4;
        assert_eq!(classify(&wrong_length), FirstBytes::Http);
        let mut unaligned = ice(80);
        unaligned[0..2].copy_from_slice(&102u16.to_be_bytes());
        unaligned[4..6].copy_from_slice(&82u16.to_be_bytes());
        assert_eq!(classify(&unaligned), FirstBytes::Http);
        // Binary junk with a small first byte is decided at its first
        // disagreeing byte.
        assert_eq!(classify(&[0x00, 0x10, 0x17]), FirstBytes::Http);
        assert_eq!(
            classify(&[0x09]),
            FirstBytes::Http,
            "a length over the limit"
        );
        let mut long = ice(2100);
        long.truncate(DECIDING);
        assert_eq!(classify(&long), FirstBytes::Http, "a length over the limit");
    }
}
