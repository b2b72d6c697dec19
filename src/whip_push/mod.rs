//! WHIP push (`--whip-push URL`): every stream is also published to a WHIP
//! server (another voice-relay's ingest, an SFU), with this relay as the
//! WHIP client. The push is a receiver leg of the stream in the relay (the
//! same RTP, re-based like any receiver's, no transcoding) that we offer
//! and dial ourselves, as a full ICE agent.
//!
//! Owns, per live stream, one task per target: offer, `POST` (Bearer
//! token), the answer to the relay, then watching the leg; a refusal or a
//! dropped leg is tried again after a capped, jittered [`Backoff`] while
//! the stream lives, and the far-end session is `DELETE`d when the leg ends.
//! A push never touches the stream's own receivers: it is just one more
//! bounded leg, and its failures stay in its task.

mod target;

pub use target::PushTarget;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::media::Mid;
use str0m::net::Protocol;
use str0m::{Candidate, Rtc};
use tokio::sync::{mpsc, watch};

use crate::backoff::Backoff;
use crate::http_client::{self, Request, Url};
use crate::metrics::metrics;
use crate::relay::{self, Command, KeySlot, PeerEvent, PushSocket, RelayError, RelayHandle};
use crate::sync::lock;

/// Bound on one `POST` or `DELETE`, connection included.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// The first nominal wait before a retry (so 0.5-1 s), doubling up to
/// [`RETRY_CAP`]: a far end that keeps refusing is asked at most every 15-30 s.
const RETRY_BASE: Duration = Duration::from_secs(1);
/// The longest nominal wait between retries.
const RETRY_CAP: Duration = Duration::from_secs(30);

/// The pushes of every live stream.
pub struct Pushes {
    targets: Arc<[PushTarget]>,
    /// The Bearer token sent to every target (never logged).
    token: Option<Arc<str>>,
    relay: RelayHandle,
    /// Per live stream, what its push tasks watch: dropping it stops them.
    live: Mutex<HashMap<Arc<str>, watch::Sender<()>>>,
}

impl Pushes {
    pub fn new(relay: RelayHandle, targets: Vec<PushTarget>, token: Option<String>) -> Self {
        Pushes {
            targets: targets.into(),
            token: token.filter(|t| !t.is_empty()).map(Into::into),
            relay,
            live: Mutex::new(HashMap::new()),
        }
    }

    /// Starts pushing `stream` to every target (needs the async runtime
    /// when there are targets).
    pub fn start(&self, stream: &Arc<str>) {
        if self.targets.is_empty() {
            return;
        }
        let (stop_tx, stop) = watch::channel(());
        for target in self.targets.iter() {
            let push = Push {
                stream: stream.clone(),
                url: target.for_stream(stream),
                token: self.token.clone(),
                relay: self.relay.clone(),
            };
            tokio::spawn(push.run(stop.clone()));
        }
        lock(&self.live).insert(stream.clone(), stop_tx);
    }

    /// Stops pushing `stream`: its tasks close their legs and `DELETE`
    /// their sessions.
    pub fn stop(&self, stream: &str) {
        lock(&self.live).remove(stream);
    }
}

/// One stream pushed to one target.
struct Push {
    stream: Arc<str>,
    url: Url,
    token: Option<Arc<str>>,
    relay: RelayHandle,
}

/// How one attempt ended.
enum Outcome {
    /// The stream ended (or the server stops): no more attempts.
    Stopped,
    /// It failed or dropped; `reason` labels the metric.
    Failed { reason: String, message: String },
}

impl Outcome {
    fn failed(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Outcome::Failed {
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// A negotiated WHIP session: the far end's answer and session URL.
struct Session {
    answer: String,
    url: Url,
}

impl Push {
    async fn run(self, mut stop: watch::Receiver<()>) {
        tracing::info!(stream = %self.stream, url = %self.url, "WHIP push starting");
        let mut backoff = Backoff::new(RETRY_BASE, RETRY_CAP);
        loop {
            let (reason, message) = match self.attempt(&mut stop, &mut backoff).await {
                Outcome::Stopped => break,
                Outcome::Failed { reason, message } => (reason, message),
            };
            metrics()
                .whip_push_failures
                .with_label_values(&[&reason])
                .inc();
            let wait = backoff.next_wait(rand::random());
            tracing::warn!(
                stream = %self.stream,
                url = %self.url,
                reason,
                error = %message,
                retry_in_ms = wait.as_millis() as u64,
                "WHIP push failed; retrying"
            );
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.changed() => break,
            }
        }
        tracing::info!(stream = %self.stream, url = %self.url, "WHIP push stopped");
    }

    /// One attempt: offer, `POST`, then the leg's life in the relay; the
    /// far-end session is deleted when the leg ends.
    async fn attempt(&self, stop: &mut watch::Receiver<()>, backoff: &mut Backoff) -> Outcome {
        metrics().whip_push_attempts.inc();
        let (mut rtc, keys, socket) = match self.relay.new_push_rtc() {
            Ok(leg) => leg,
            Err(e) => return Outcome::failed("socket", format!("no socket for the leg: {e}")),
        };
        let Some((mid, offer, pending)) = relay::offer_audio(&mut rtc, &self.stream) else {
            return Outcome::failed("offer", "could not create an SDP offer");
        };
        let session = match self.post(&offer).await {
            Ok(s) => s,
            Err(outcome) => return outcome,
        };
        let outcome = if stop.has_changed().is_err() {
            Outcome::Stopped
        } else {
            match accept(&mut rtc, pending, mid, &session.answer) {
                Err(e) => Outcome::failed("bad_answer", e),
                Ok(_far_end) => {
                    let leg = Box::new(rtc);
                    self.hand_over(leg, keys, mid, socket, stop, backoff).await
                }
            }
        };
        self.delete(&session.url).await;
        outcome
    }

    /// Gives the negotiated leg to the relay, then follows it.
    async fn hand_over(
        &self,
        rtc: Box<Rtc>,
        keys: KeySlot,
        mid: Mid,
        socket: PushSocket,
        stop: &mut watch::Receiver<()>,
        backoff: &mut Backoff,
    ) -> Outcome {
        let peer = self.relay.next_peer_id();
        let (events_tx, events) = mpsc::unbounded_channel();
        let command = Command::AddReceiver {
            peer,
            stream: self.stream.clone(),
            rtc,
            keys,
            mid,
            events: events_tx,
            push: Some(socket),
        };
        match self.relay.send(command) {
            Ok(()) => self.watch(peer, events, stop, backoff).await,
            // The server is shutting down.
            Err(RelayError::Stopped) => Outcome::Stopped,
            Err(e) => Outcome::failed("relay_busy", e.to_string()),
        }
    }

    /// `POST`s the offer; the far end's answer and session URL.
    async fn post(&self, offer: &str) -> Result<Session, Outcome> {
        let mut headers = vec!["Content-Type: application/sdp".to_owned()];
        headers.extend(self.authorization());
        let request = Request {
            method: "POST",
            url: &self.url,
            headers: &headers,
            body: offer.as_bytes(),
        };
        let response = http_client::send(&request, HTTP_TIMEOUT)
            .await
            .map_err(|e| Outcome::failed(http_failure(&e), e.to_string()))?;
        if response.status != 201 {
            let body: String = String::from_utf8_lossy(&response.body)
                .chars()
                .take(200)
                .collect();
            return Err(Outcome::failed(
                format!("http_{}", response.status),
                format!("refused with HTTP {}: {}", response.status, body.trim()),
            ));
        }
        let url = response
            .header("location")
            .ok_or_else(|| "201 without a Location header".to_owned())
            .and_then(|l| self.url.join(l))
            .map_err(|e| Outcome::failed("bad_answer", e))?;
        let answer = String::from_utf8(response.body)
            .map_err(|_| Outcome::failed("bad_answer", "the SDP answer is not UTF-8"))?;
        Ok(Session { answer, url })
    }

    /// Follows the leg in the relay until it closes or the stream ends.
    async fn watch(
        &self,
        peer: relay::PeerId,
        mut events: mpsc::UnboundedReceiver<PeerEvent>,
        stop: &mut watch::Receiver<()>,
        backoff: &mut Backoff,
    ) -> Outcome {
        let mut live = None;
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(PeerEvent::Connected(_)) => {
                        tracing::info!(stream = %self.stream, url = %self.url, peer, "WHIP push connected");
                        live = Some(LivePush::new());
                        backoff.reset();
                    }
                    // The relay ended the stream before signalling told us.
                    Some(PeerEvent::Closed(_, relay::STREAM_ENDED)) => return Outcome::Stopped,
                    Some(PeerEvent::Closed(_, why)) => {
                        let reason = if live.is_some() { "dropped" } else { "ice_dtls" };
                        return Outcome::failed(reason, why);
                    }
                    None => return Outcome::failed("dropped", "the relay stopped"),
                },
                _ = stop.changed() => {
                    let _ = self.relay.send(Command::ClosePeer { peer });
                    return Outcome::Stopped;
                }
            }
        }
    }

    /// Ends the far-end session (best effort: it may be gone already, for
    /// example when our leg's DTLS close reached it first: a 404).
    async fn delete(&self, session: &Url) {
        let headers: Vec<String> = self.authorization().into_iter().collect();
        let request = Request {
            method: "DELETE",
            url: session,
            headers: &headers,
            body: b"",
        };
        match http_client::send(&request, HTTP_TIMEOUT).await {
            Ok(r) => {
                tracing::info!(stream = %self.stream, session = %session, status = r.status, "WHIP push session DELETE answered")
            }
            Err(e) => {
                tracing::info!(stream = %self.stream, session = %session, error = %e, "WHIP push session DELETE failed")
            }
        }
    }

    fn authorization(&self) -> Option<String> {
        self.token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}"))
    }
}

/// Counts a connected push in the `whip_push_live` gauge while it lives.
struct LivePush;

impl LivePush {
    fn new() -> Self {
        metrics().whip_push_live.inc();
        LivePush
    }
}

impl Drop for LivePush {
    fn drop(&mut self) {
        metrics().whip_push_live.dec();
    }
}

/// The metric label of a request that got no HTTP answer.
fn http_failure(e: &http_client::HttpError) -> &'static str {
    match e {
        http_client::HttpError::Connect(..) => "unreachable",
        http_client::HttpError::Timeout(_) => "timeout",
        _ => "bad_response",
    }
}

/// Applies the far end's answer; the addresses to dial (its UDP candidates).
fn accept(
    rtc: &mut Rtc,
    pending: SdpPendingOffer,
    mid: Mid,
    answer: &str,
) -> Result<Vec<SocketAddr>, String> {
    let sdp = SdpAnswer::from_sdp_string(answer).map_err(|e| format!("invalid SDP answer: {e}"))?;
    rtc.sdp_api()
        .accept_answer(pending, sdp)
        .map_err(|e| format!("cannot accept the SDP answer: {e}"))?;
    if relay::negotiated_opus_pt(rtc, mid).is_none() {
        return Err("the answer does not accept Opus audio".into());
    }
    let dialed = far_end(answer);
    if dialed.is_empty() {
        return Err("the answer has no UDP candidate".into());
    }
    Ok(dialed)
}

/// The UDP addresses of the ICE candidates in an SDP answer, at most 8.
fn far_end(answer: &str) -> Vec<SocketAddr> {
    let mut addrs = Vec::new();
    for line in answer.lines() {
        let Some(text) = line.trim().strip_prefix("a=candidate:") else {
            continue;
        };
        let Ok(c) = Candidate::from_sdp_string(&format!("candidate:{text}")) else {
            continue;
        };
        if c.proto() == Protocol::Udp && !addrs.contains(&c.addr()) && addrs.len() < 8 {
            addrs.push(c.addr());
        }
    }
    addrs
}

#[cfg(test)]
mod tests {
    use super::*;
    use str0m::change::SdpOffer;

    /// What another voice-relay's WHIP ingest (an ICE-lite sender peer)
    /// answers to `offer`.
    fn edge_answer(relay: &RelayHandle, offer: &str) -> String {
        let mut edge = relay.new_sender_rtc();
        let offer = SdpOffer::from_sdp_string(offer).expect("offer parses");
        let answer = edge.sdp_api().accept_offer(offer).expect("edge accepts");
        answer.to_sdp_string()
    }

    #[test]
    fn the_push_offers_full_ice_sendonly_opus_and_takes_an_ice_lite_answer() {
        let relay = relay::start_for_test();
        let (mut push, _keys, socket) = relay.new_push_rtc().expect("a socket");
        let (mid, offer_sdp, pending) = relay::offer_audio(&mut push, "studio").expect("an offer");
        assert!(offer_sdp.contains("a=sendonly"), "{offer_sdp}");
        assert!(
            offer_sdp.to_lowercase().contains("opus/48000/2"),
            "{offer_sdp}"
        );
        assert!(offer_sdp.contains("a=msid:studio"), "{offer_sdp}");
        assert!(
            !offer_sdp.contains("a=ice-lite"),
            "a push is a full ICE agent"
        );
        // Its one candidate is its own socket: each leg is its own 5-tuple.
        let local = socket.local_addr().expect("bound");
        let candidate = format!("127.0.0.1 {} typ host", local.port());
        assert!(offer_sdp.contains(&candidate), "{offer_sdp}");
        assert_eq!(offer_sdp.matches("a=candidate").count(), 1, "{offer_sdp}");
        let (_, _, other) = relay.new_push_rtc().expect("a socket");
        assert_ne!(other.local_addr().expect("bound"), local);
        let answer = edge_answer(&relay, &offer_sdp);
        assert!(answer.contains("a=ice-lite"), "{answer}");
        let dialed = accept(&mut push, pending, mid, &answer).expect("answer accepted");
        assert_eq!(dialed, vec!["127.0.0.1:9".parse::<SocketAddr>().unwrap()]);
    }

    #[test]
    fn answers_that_cannot_be_dialed_are_refused() {
        let relay = relay::start_for_test();
        let (mut push, _keys, _socket) = relay.new_push_rtc().expect("a socket");
        let (mid, offer_sdp, pending) = relay::offer_audio(&mut push, "studio").expect("an offer");
        // Candidates only trickled later (we do not PATCH): nothing to dial.
        let bare: String = edge_answer(&relay, &offer_sdp)
            .lines()
            .filter(|l| !l.starts_with("a=candidate"))
            .map(|l| format!("{l}\r\n"))
            .collect();
        let err = accept(&mut push, pending, mid, &bare).unwrap_err();
        assert!(err.contains("no UDP candidate"), "{err}");
        let (mut push, _keys, _socket) = relay.new_push_rtc().expect("a socket");
        let (mid, _, pending) = relay::offer_audio(&mut push, "s").expect("an offer");
        let err = accept(&mut push, pending, mid, "HTTP/1.1 200 OK").unwrap_err();
        assert!(err.contains("invalid SDP answer"), "{err}");
    }

    #[test]
    fn the_far_end_is_the_answers_udp_candidates() {
        let answer = "v=0\r\n\
            a=candidate:1 1 udp 2130706431 127.0.0.1 9000 typ host\r\n\
            a=candidate:2 1 tcp 1518280447 127.0.0.1 9443 typ host tcptype passive\r\n\
            a=candidate:1 1 udp 2130706431 127.0.0.1 9000 typ host\r\n\
            a=candidate:3 1 udp 1694498815 192.0.2.7 40000 typ srflx raddr 10.0.0.2 rport 9000\r\n\
            a=candidate:bogus\r\n";
        let want: Vec<SocketAddr> = vec![
            "127.0.0.1:9000".parse().unwrap(),
            "192.0.2.7:40000".parse().unwrap(),
        ];
        assert_eq!(far_end(answer), want);
        assert!(far_end("v=0\r\n").is_empty());
    }
}
