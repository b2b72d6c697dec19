//! Signalling clients: the WebSocket side of a sender and of a receiver, and
//! building their str0m peers. Once a peer is negotiated it is handed to a
//! media worker; the WebSocket stays open (closing it would end the leg) and
//! is only read, so the server never blocks on us.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::config::DtlsCert;
use str0m::media::{Direction, MediaKind, Pt};
use str0m::{Candidate, Rtc};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use str0m::net::TcpType;

use crate::link::Transport;
use crate::media::{Cmd, NewPeer, Role, StreamClock, WorkerHandle};

pub type Ws = WebSocketStream<TcpStream>;

/// Things every client task shares.
pub struct Ctx {
    /// Where receivers join.
    pub server: SocketAddr,
    /// Where senders stream: the server itself, or an origin that pushes
    /// its streams to the server (`--sender-server`).
    pub sender_server: SocketAddr,
    /// Clients bind to 127.0.0.1 ..= 127.0.0.N (the server limits connections per address).
    pub source_ips: u32,
    pub cert: DtlsCert,
    pub sender_worker: WorkerHandle,
    pub receiver_workers: Vec<WorkerHandle>,
    next_worker: AtomicUsize,
    next_id: AtomicU64,
    pub shutdown: watch::Receiver<bool>,
    pub counters: Counters,
    /// Every how many receivers one uses ICE-TCP to the relay's HTTP port
    /// (0: none; 2: every other one).
    pub tcp_every: u64,
}

/// What the kept-open WebSockets heard after joining.
#[derive(Default)]
pub struct Counters {
    pub stream_ended: AtomicU64,
    pub server_errors: AtomicU64,
    pub ws_closed_by_server: AtomicU64,
}

impl Ctx {
    pub fn new(
        server: SocketAddr,
        sender_server: SocketAddr,
        source_ips: u32,
        cert: DtlsCert,
        sender_worker: WorkerHandle,
        receiver_workers: Vec<WorkerHandle>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Ctx {
            server,
            sender_server,
            source_ips: source_ips.clamp(1, 250),
            cert,
            sender_worker,
            receiver_workers,
            next_worker: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            shutdown,
            counters: Counters::default(),
            tcp_every: 0,
        }
    }

    fn new_rtc(&self) -> Rtc {
        Rtc::builder()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .set_dtls_cert(self.cert.clone())
            .build(Instant::now())
    }

    /// The loopback source address of client number `n`.
    fn source_ip(&self, n: u64) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, 0, 1 + (n % u64::from(self.source_ips)) as u8)
    }

    fn next_receiver_worker(&self) -> &WorkerHandle {
        let i = self.next_worker.fetch_add(1, Ordering::Relaxed);
        &self.receiver_workers[i % self.receiver_workers.len()]
    }
}

async fn connect(server: SocketAddr, from: Ipv4Addr) -> Result<Ws> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(IpAddr::V4(from), 0))
        .with_context(|| format!("binding a TCP socket to {from}"))?;
    let tcp = sock.connect(server).await.context("TCP connect")?;
    tcp.set_nodelay(true)?;
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{server}/ws"), tcp)
        .await
        .context("websocket connect")?;
    Ok(ws)
}

async fn send(ws: &mut Ws, v: Value) -> Result<()> {
    ws.send(Message::text(v.to_string()))
        .await
        .context("websocket send")
}

/// Reads frames until one of type `want`; other broadcasts are skipped, an
/// `error` frame fails.
async fn recv_type(ws: &mut Ws, want: &str, within: Duration) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| anyhow!("timed out waiting for {want}"))?;
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) | None => bail!("websocket closed waiting for {want}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => bail!("websocket error waiting for {want}: {e}"),
        };
        let v: Value = serde_json::from_str(text.as_str()).context("server sent non-JSON")?;
        match v.get("type").and_then(Value::as_str) {
            Some(t) if t == want => return Ok(v),
            Some("error") => bail!("server error waiting for {want}: {v}"),
            _ => continue,
        }
    }
}

/// Refuses SDP whose candidates point anywhere but loopback.
fn check_candidates(sdp: &str) -> Result<()> {
    for line in sdp.lines() {
        if let Some(rest) = line.trim().strip_prefix("a=candidate:") {
            let ip = rest
                .split_whitespace()
                .nth(4)
                .ok_or_else(|| anyhow!("malformed candidate line: {line}"))?;
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| anyhow!("candidate address is not an IP: {line}"))?;
            if !ip.is_loopback() {
                bail!("server announced a non-loopback candidate ({ip}); refusing");
            }
        }
    }
    Ok(())
}

/// The Opus payload type in an SDP.
fn opus_pt(sdp: &str) -> Option<Pt> {
    sdp.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("a=rtpmap:")?;
        let (pt, codec) = rest.split_once(' ')?;
        codec
            .to_ascii_lowercase()
            .starts_with("opus/48000")
            .then(|| pt.parse::<u8>().ok())
            .flatten()
            .map(Pt::from)
    })
}

fn bind_udp(from: Ipv4Addr) -> Result<std::net::UdpSocket> {
    let s = std::net::UdpSocket::bind((from, 0)).context("binding a client UDP socket")?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// A connection to the relay's ICE-TCP candidate (its HTTP port). The
/// per-address limit counts WebSockets only: no spread over 127.0.0.x.
fn connect_ice_tcp(server: SocketAddr) -> Result<std::net::TcpStream> {
    let sock = std::net::TcpStream::connect_timeout(&server, Duration::from_secs(5))
        .context("ICE-TCP connect")?;
    sock.set_nodelay(true)?;
    Ok(sock)
}

fn sdp_field<'a>(v: &'a Value, outer: &str) -> Result<&'a str> {
    v.get(outer)
        .and_then(|o| o.get("sdp"))
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("{outer}.sdp missing"))
}

/// Keeps a joined client's WebSocket open, reading and discarding what the
/// server broadcasts, until the run ends.
fn hold(ctx: Arc<Ctx>, mut ws: Ws) {
    let mut stop = ctx.shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                m = ws.next() => match m {
                    Some(Ok(Message::Text(t))) => {
                        let s = t.as_str();
                        if s.contains("\"stream_ended\"") {
                            ctx.counters.stream_ended.fetch_add(1, Ordering::Relaxed);
                        } else if s.contains("\"type\":\"error\"") {
                            ctx.counters.server_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => {
                        if !*stop.borrow() {
                            ctx.counters.ws_closed_by_server.fetch_add(1, Ordering::Relaxed);
                        }
                        break;
                    }
                },
                _ = stop.changed() => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                    break;
                }
            }
        }
    });
}

/// A live sender: its stream id and what it has sent.
pub struct SenderInfo {
    pub stream_id: String,
    pub clock: Arc<StreamClock>,
    pub offer_to_answer: Duration,
}

/// Negotiates a sender as far as the server's answer. Returns the socket,
/// the peer and the stream id; `offer_to_answer` is the handshake figure.
async fn sender_handshake(
    ctx: &Ctx,
    ws: &mut Ws,
    ip: Ipv4Addr,
) -> Result<(
    String,
    Rtc,
    std::net::UdpSocket,
    str0m::media::Mid,
    String,
    Duration,
)> {
    send(ws, json!({"type": "start_sending"})).await?;
    let ready = recv_type(ws, "sender_ready", Duration::from_secs(10)).await?;
    let stream_id = ready
        .get("stream_id")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("sender_ready without stream_id"))?
        .to_string();
    let socket = bind_udp(ip)?;
    let mut rtc = ctx.new_rtc();
    rtc.add_local_candidate(Candidate::host(socket.local_addr()?, "udp")?);
    let mut api = rtc.sdp_api();
    let mid = api.add_media(
        MediaKind::Audio,
        Direction::SendOnly,
        Some("bench".into()),
        Some("bench-audio".into()),
        None,
    );
    let (offer, pending) = api.apply().ok_or_else(|| anyhow!("no offer produced"))?;
    let t0 = Instant::now();
    send(
        ws,
        json!({"type": "webrtc_offer", "offer": {"type": "offer", "sdp": offer.to_sdp_string()}}),
    )
    .await?;
    let answer = recv_type(ws, "webrtc_answer", Duration::from_secs(10)).await?;
    let took = t0.elapsed();
    let sdp = sdp_field(&answer, "answer")?.to_string();
    check_candidates(&sdp)?;
    let parsed = SdpAnswer::from_sdp_string(&sdp).context("parsing the server's answer")?;
    rtc.sdp_api()
        .accept_answer(pending, parsed)
        .context("accepting the server's answer")?;
    Ok((stream_id, rtc, socket, mid, sdp, took))
}

/// One handshake sample: connect, negotiate, measure offer → answer, leave.
pub async fn sender_handshake_sample(ctx: &Ctx) -> Result<Duration> {
    let ip = ctx.source_ip(ctx.next_id.fetch_add(1, Ordering::Relaxed));
    let mut ws = connect(ctx.sender_server, ip).await?;
    let (_, _rtc, _sock, _, _, took) = sender_handshake(ctx, &mut ws, ip).await?;
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    Ok(took)
}

/// Starts a real sender: it joins the sender worker and streams Opus.
pub async fn start_sender(
    ctx: Arc<Ctx>,
    index: usize,
    connect_within: Duration,
) -> Result<SenderInfo> {
    let id = ctx.next_id.fetch_add(1, Ordering::Relaxed);
    let ip = ctx.source_ip(id);
    let mut ws = connect(ctx.sender_server, ip).await?;
    let (stream_id, mut rtc, socket, mid, sdp, took) = sender_handshake(&ctx, &mut ws, ip).await?;
    let pt = opus_pt(&sdp).ok_or_else(|| anyhow!("the answer has no Opus"))?;
    let ssrc = rtc
        .direct_api()
        .stream_tx_by_mid(mid, None)
        .ok_or_else(|| anyhow!("no send stream for our audio m-line"))?
        .ssrc();
    let seed = crate::media::ns_since_epoch(Instant::now()) as u32;
    let ts0 = seed.wrapping_mul(2_654_435_761) ^ (index as u32).wrapping_mul(40503);
    let clock = Arc::new(StreamClock::new(index, ts0));
    let (tx, rx) = oneshot::channel();
    let socket = Transport::Udp(socket);
    ctx.sender_worker.send(Cmd::Add(Box::new(NewPeer {
        id,
        rtc,
        socket,
        role: Role::Sender {
            clock: clock.clone(),
            ssrc,
            pt,
            seq0: u64::from(seed % 20_000) + 1,
        },
        connected: tx,
    })));
    match tokio::time::timeout(connect_within, rx).await {
        Ok(Ok(Ok(_))) => {}
        Ok(Ok(Err(e))) => bail!("sender peer failed: {e}"),
        _ => bail!("sender did not connect within {connect_within:?}"),
    }
    hold(ctx.clone(), ws);
    Ok(SenderInfo {
        stream_id,
        clock,
        offer_to_answer: took,
    })
}

/// Timings of one receiver's join.
#[derive(Debug, Clone, Copy)]
pub struct Joined {
    /// `start_receiving` sent → `webrtc_offer` received.
    pub offer: Duration,
    /// `webrtc_answer` sent → ICE + DTLS connected.
    pub connect: Duration,
    /// Our own work between the offer and the answer (peer + SDP).
    pub local: Duration,
}

/// Joins one receiver to `stream_id` and hands it to a media worker.
pub async fn join_receiver(
    ctx: Arc<Ctx>,
    clock: Arc<StreamClock>,
    stream_id: String,
    within: Duration,
) -> Result<Joined> {
    let deadline = Instant::now() + within;
    let left = || deadline.saturating_duration_since(Instant::now());
    let id = ctx.next_id.fetch_add(1, Ordering::Relaxed);
    let ip = ctx.source_ip(id);
    let mut ws = tokio::time::timeout(left(), connect(ctx.server, ip))
        .await
        .map_err(|_| anyhow!("websocket connect timed out"))??;
    let t0 = Instant::now();
    send(
        &mut ws,
        json!({"type": "start_receiving", "stream_id": stream_id}),
    )
    .await?;
    let offer = recv_type(&mut ws, "webrtc_offer", left()).await?;
    let got_offer = Instant::now();
    let offer_took = got_offer.duration_since(t0);
    let sdp = sdp_field(&offer, "offer")?;
    check_candidates(sdp)?;
    let pt = opus_pt(sdp).ok_or_else(|| anyhow!("the server's offer has no Opus"))?;
    let tcp = ctx.tcp_every > 0 && id.is_multiple_of(ctx.tcp_every);
    let socket = if tcp {
        Transport::Tcp(connect_ice_tcp(ctx.server)?)
    } else {
        Transport::Udp(bind_udp(ip)?)
    };
    let local: SocketAddr = socket.local_addr()?;
    let mut rtc = ctx.new_rtc();
    let candidate = if tcp {
        Candidate::builder()
            .tcp()
            .host(local)
            .tcptype(TcpType::Active)
            .build()?
    } else {
        Candidate::host(local, "udp")?
    };
    rtc.add_local_candidate(candidate);
    let parsed = SdpOffer::from_sdp_string(sdp).context("parsing the server's offer")?;
    let answer = rtc
        .sdp_api()
        .accept_offer(parsed)
        .context("accepting the server's offer")?;
    send(
        &mut ws,
        json!({"type": "webrtc_answer", "answer": {"type": "answer", "sdp": answer.to_sdp_string()}}),
    )
    .await?;
    let t1 = Instant::now();
    let local = t1.duration_since(got_offer);
    let (tx, rx) = oneshot::channel();
    ctx.next_receiver_worker().send(Cmd::Add(Box::new(NewPeer {
        id,
        rtc,
        socket,
        role: Role::Receiver { clock, pt },
        connected: tx,
    })));
    // Keep reading the socket meanwhile: the server may say `error`.
    let connected = tokio::time::timeout(left(), rx).await;
    let at = match connected {
        Ok(Ok(Ok(at))) => at,
        Ok(Ok(Err(e))) => bail!("receiver peer failed: {e}"),
        Ok(Err(_)) => bail!("media worker dropped the peer"),
        Err(_) => bail!("ICE/DTLS not connected in time"),
    };
    hold(ctx, ws);
    Ok(Joined {
        offer: offer_took,
        connect: at.saturating_duration_since(t1),
        local,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_must_be_loopback() {
        assert!(
            check_candidates("a=candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host\r\n").is_ok()
        );
        assert!(
            check_candidates("a=candidate:1 1 udp 2130706431 10.0.0.2 5000 typ host\r\n").is_err()
        );
        assert!(check_candidates("v=0\r\n").is_ok());
    }

    #[test]
    fn finds_opus_pt() {
        let sdp = "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n";
        assert_eq!(opus_pt(sdp), Some(Pt::from(111)));
        assert_eq!(opus_pt("a=rtpmap:0 PCMU/8000\r\n"), None);
    }
}
