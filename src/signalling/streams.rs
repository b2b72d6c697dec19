//! Where a stream starts and ends (for WebSocket and WHIP senders alike). A stream lives in two places: the
//! registry lists it (for clients, `/health` and MP3 listeners) and the relay
//! routes its media. The invariant, kept here and nowhere else: a stream is
//! listed only once the relay has its sender, and ending it ends it in both
//! (the relay may have ended it first, on its own, when the sender's peer
//! closed; ending it again there is harmless).

use std::sync::Arc;

use str0m::change::SdpOffer;
use str0m::Rtc;

use super::Signalling;
use crate::mp3::{self, Mp3Error};
use crate::ogg_opus;
use crate::registry::{StreamOutputs, StreamSlot};
use crate::relay::{Command, PeerEvents, PeerId, RelayError};

/// Why a stream could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error("cannot start the MP3 encoder: {0}")]
    Mp3(#[from] Mp3Error),
    #[error(transparent)]
    Relay(#[from] RelayError),
}

impl StartError {
    /// The `code` of the `error` message the client gets.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            StartError::Mp3(_) => "internal",
            StartError::Relay(_) => "busy",
        }
    }
}

impl Signalling {
    /// A sender peer that accepted `offer`, and its SDP answer.
    pub(crate) fn answer_sender(&self, offer: &str) -> Result<(Rtc, String), String> {
        let sdp =
            SdpOffer::from_sdp_string(offer).map_err(|e| format!("invalid SDP offer: {e}"))?;
        let mut rtc = self.relay.new_sender_rtc();
        let answer = rtc
            .sdp_api()
            .accept_offer(sdp)
            .map_err(|e| format!("cannot accept the SDP offer: {e}"))?;
        Ok((rtc, answer.to_sdp_string()))
    }

    /// Starts `stream` with its sender's negotiated peer: its MP3 and Ogg
    /// outputs (idle until their first listener), then the relay, then the listing in the place `slot`
    /// reserved, then its WHIP pushes.
    pub(crate) fn start_stream(
        &self,
        slot: StreamSlot,
        stream: &Arc<str>,
        rtc: Rtc,
        events: PeerEvents,
    ) -> Result<PeerId, StartError> {
        let (mp3_sink, mp3) = mp3::try_start(stream, self.mp3.clone())?;
        let (ogg_sink, ogg) = ogg_opus::start(stream, &self.mp3);
        let peer = self.relay.next_peer_id();
        self.relay.send(Command::AddSender {
            peer,
            stream: stream.clone(),
            rtc: Box::new(rtc),
            events,
            mp3: Some(mp3_sink),
            ogg: Some(ogg_sink),
        })?;
        slot.publish(stream.clone(), StreamOutputs { mp3, ogg });
        self.pushes.start(stream);
        Ok(peer)
    }

    /// Ends `stream` in the registry (everyone hears `stream_ended` once) and
    /// in the relay (its sender and receivers close, its MP3 and Ogg end),
    /// and stops its WHIP pushes.
    pub(crate) fn end_stream(&self, stream: &Arc<str>) {
        self.pushes.stop(stream);
        self.registry.end_stream(stream);
        let _ = self.relay.send(Command::EndStream {
            stream: stream.clone(),
        });
    }
}
