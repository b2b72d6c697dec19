//! The stream registry: which streams are live (oldest first), how many
//! senders, receivers and clients there are, the limits on them (reserved
//! atomically, so concurrent requests cannot exceed them), and the broadcast
//! of `stream_available` / `stream_ended` events to every connected client.
//! Signalling and HTTP talk to it; it knows nothing of sockets or peers.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use rand::Rng;
use tokio::sync::broadcast;

use crate::mp3::{Fanout, Format};
use crate::sync::lock;

/// Capacity of the event broadcast. A client that falls further behind than
/// this is told the whole list again instead.
const EVENT_CAPACITY: usize = 256;

/// Something every connected client hears about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamEvent {
    Available(Arc<str>),
    Ended(Arc<str>),
    /// The server is shutting down.
    Shutdown,
}

/// A stream's outputs for HTTP listeners, one fan-out per format.
#[derive(Clone, Debug)]
pub struct StreamOutputs {
    pub mp3: Arc<Fanout>,
    pub ogg: Arc<Fanout>,
}

impl StreamOutputs {
    pub fn of(&self, format: Format) -> &Arc<Fanout> {
        match format {
            Format::Mp3 => &self.mp3,
            Format::Ogg => &self.ogg,
        }
    }

    /// HTTP listeners of every format.
    fn listeners(&self) -> usize {
        self.mp3.listener_count() + self.ogg.listener_count()
    }
}

/// One live stream as the registry lists it.
struct LiveStream {
    id: Arc<str>,
    started: Instant,
    /// Live MP3 and Ogg/Opus for HTTP listeners.
    outputs: StreamOutputs,
    /// WebRTC receiver legs of this stream (offered or live).
    receivers: Arc<AtomicUsize>,
}

/// Everything behind the stream lock: the live streams and the stream slots
/// reserved for senders whose offer is being answered.
#[derive(Default)]
struct Streams {
    live: Vec<LiveStream>,
    reserved: usize,
    /// The ids asked for by the reserved places that have one.
    reserved_ids: Vec<Arc<str>>,
}

impl Streams {
    fn find(&self, id: &str) -> Option<&LiveStream> {
        self.live.iter().find(|s| &*s.id == id)
    }

    /// Whether `id` is live or reserved.
    fn taken(&self, id: &str) -> bool {
        self.find(id).is_some() || self.reserved_ids.iter().any(|r| &**r == id)
    }

    /// Frees one reserved place (and its id, if it had one).
    fn unreserve(&mut self, id: Option<&Arc<str>>) {
        self.reserved -= 1;
        if let Some(id) = id {
            self.reserved_ids.retain(|r| !Arc::ptr_eq(r, id));
        }
    }
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the server already relays its maximum of {0} streams")]
    Streams(usize),
    #[error("the server already has its maximum of {0} receivers")]
    Receivers(usize),
    #[error("this stream already has its maximum of {0} receivers")]
    ReceiversPerStream(usize),
    #[error("the stream has ended")]
    NoStream,
    #[error("a stream of that name is already live")]
    NameTaken,
}

pub struct Registry {
    streams: Mutex<Streams>,
    events: broadcast::Sender<StreamEvent>,
    senders: AtomicUsize,
    receivers: AtomicUsize,
    clients: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    pub started: Instant,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Registry {
            streams: Mutex::new(Streams::default()),
            events,
            senders: AtomicUsize::new(0),
            receivers: AtomicUsize::new(0),
            clients: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            started: Instant::now(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Streams> {
        lock(&self.streams)
    }

    /// A fresh stream id, `stream_<random>`.
    pub fn new_stream_id() -> Arc<str> {
        let mut rng = rand::rng();
        let n: u64 = rng.random();
        format!("stream_{n:016x}").into()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<StreamEvent> {
        self.events.subscribe()
    }

    /// Reserves a place for one more stream, unless `max` streams are live
    /// or reserved. The place is freed when the slot is dropped unpublished.
    pub fn try_reserve_stream(self: &Arc<Self>, max: usize) -> Result<StreamSlot, Refused> {
        self.reserve_stream(max, None)
    }

    /// As [`try_reserve_stream`](Self::try_reserve_stream), for a stream
    /// that must have the id `id`: refused while a stream of that id is
    /// live or reserved.
    pub fn try_reserve_named_stream(
        self: &Arc<Self>,
        max: usize,
        id: Arc<str>,
    ) -> Result<StreamSlot, Refused> {
        self.reserve_stream(max, Some(id))
    }

    fn reserve_stream(
        self: &Arc<Self>,
        max: usize,
        id: Option<Arc<str>>,
    ) -> Result<StreamSlot, Refused> {
        let mut streams = self.lock();
        if id.as_deref().is_some_and(|id| streams.taken(id)) {
            return Err(Refused::NameTaken);
        }
        if streams.live.len() + streams.reserved >= max {
            return Err(Refused::Streams(max));
        }
        streams.reserved += 1;
        streams.reserved_ids.extend(id.clone());
        Ok(StreamSlot {
            registry: Some(self.clone()),
            id,
        })
    }

    /// Removes a stream. Returns true (and broadcasts `stream_ended`) only for
    /// the call that actually removed it, so the event goes out exactly once.
    pub fn end_stream(&self, id: &str) -> bool {
        let removed = {
            let mut streams = self.lock();
            let at = streams.live.iter().position(|s| &*s.id == id);
            at.map(|i| streams.live.remove(i))
        };
        let Some(stream) = removed else {
            return false;
        };
        self.senders.fetch_sub(1, Ordering::Relaxed);
        tracing::info!(stream = %id, secs = stream.started.elapsed().as_secs(), "stream ended");
        let _ = self.events.send(StreamEvent::Ended(stream.id));
        true
    }

    pub fn shutdown(&self) {
        let _ = self.events.send(StreamEvent::Shutdown);
    }

    /// Live stream ids, oldest first.
    pub fn list(&self) -> Vec<Arc<str>> {
        self.lock().live.iter().map(|s| s.id.clone()).collect()
    }

    pub fn newest(&self) -> Option<Arc<str>> {
        self.lock().live.last().map(|s| s.id.clone())
    }

    /// The `format` fan-out of a stream (`None` id = newest).
    pub fn fanout(&self, id: Option<&str>, format: Format) -> Option<(Arc<str>, Arc<Fanout>)> {
        let streams = self.lock();
        let s = match id {
            Some(id) => streams.find(id),
            None => streams.live.last(),
        }?;
        Some((s.id.clone(), s.outputs.of(format).clone()))
    }

    /// Per-stream listener counts of one format, oldest first.
    pub fn listener_counts(&self, format: Format) -> Vec<(Arc<str>, usize)> {
        self.lock()
            .live
            .iter()
            .map(|s| (s.id.clone(), s.outputs.of(format).listener_count()))
            .collect()
    }

    /// Listeners of one format, all streams.
    pub fn format_listeners(&self, format: Format) -> usize {
        self.lock()
            .live
            .iter()
            .map(|s| s.outputs.of(format).listener_count())
            .sum()
    }

    /// HTTP listeners of one stream, every format (`None` if not live).
    pub fn stream_listeners(&self, id: &str) -> Option<usize> {
        self.lock().find(id).map(|s| s.outputs.listeners())
    }

    pub fn senders(&self) -> usize {
        self.senders.load(Ordering::Relaxed)
    }

    pub fn receivers(&self) -> usize {
        self.receivers.load(Ordering::Relaxed)
    }

    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Receiver legs of one stream.
    #[cfg(test)]
    pub fn stream_receivers(&self, id: &str) -> usize {
        self.lock()
            .find(id)
            .map_or(0, |s| s.receivers.load(Ordering::Relaxed))
    }

    /// HTTP listeners (MP3 and Ogg) of all streams: what the listener
    /// limit counts.
    pub fn total_listeners(&self) -> usize {
        self.lock().live.iter().map(|s| s.outputs.listeners()).sum()
    }

    /// Reserves one WebRTC receiver leg of `stream`, unless the server has
    /// `max_total` receivers or the stream `max_per_stream`. Checked and
    /// counted under the stream lock, so racing requests cannot overshoot;
    /// the slot counts until it is dropped.
    pub fn try_reserve_receiver(
        self: &Arc<Self>,
        stream: &str,
        max_per_stream: usize,
        max_total: usize,
    ) -> Result<ReceiverSlot, Refused> {
        let streams = self.lock();
        let per_stream = &streams.find(stream).ok_or(Refused::NoStream)?.receivers;
        if self.receivers.load(Ordering::Relaxed) >= max_total {
            return Err(Refused::Receivers(max_total));
        }
        if per_stream.load(Ordering::Relaxed) >= max_per_stream {
            return Err(Refused::ReceiversPerStream(max_per_stream));
        }
        per_stream.fetch_add(1, Ordering::Relaxed);
        self.receivers.fetch_add(1, Ordering::Relaxed);
        Ok(ReceiverSlot {
            registry: self.clone(),
            per_stream: per_stream.clone(),
        })
    }

    /// Counts one WebSocket client for as long as the guard lives.
    pub fn client_guard(self: &Arc<Self>) -> ClientGuard {
        self.clients.fetch_add(1, Ordering::Relaxed);
        ClientGuard(self.clone())
    }

    /// Counts a WebSocket connection from `ip`, unless that IP already has
    /// `max` of them.
    pub fn ip_guard(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpGuard> {
        let mut map = lock(&self.per_ip);
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpGuard {
            registry: self.clone(),
            ip,
        })
    }
}

/// A reserved place for one stream; [`publish`](Self::publish) lists the
/// stream in it, dropping it unpublished frees the place.
pub struct StreamSlot {
    /// `None` once published.
    registry: Option<Arc<Registry>>,
    /// The id this place is held for, if one was asked for.
    id: Option<Arc<str>>,
}

impl StreamSlot {
    /// Lists the stream (newest last) in this place and tells everyone.
    pub fn publish(mut self, id: Arc<str>, outputs: StreamOutputs) {
        let Some(registry) = self.registry.take() else {
            return;
        };
        {
            let mut streams = registry.lock();
            streams.unreserve(self.id.as_ref());
            streams.live.push(LiveStream {
                id: id.clone(),
                started: Instant::now(),
                outputs,
                receivers: Arc::new(AtomicUsize::new(0)),
            });
        }
        registry.senders.fetch_add(1, Ordering::Relaxed);
        tracing::info!(stream = %id, "stream available");
        let _ = registry.events.send(StreamEvent::Available(id));
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Some(registry) = &self.registry {
            registry.lock().unreserve(self.id.as_ref());
        }
    }
}

/// One WebRTC receiver leg, counted (in the server's and its stream's
/// receivers) while it lives.
pub struct ReceiverSlot {
    registry: Arc<Registry>,
    per_stream: Arc<AtomicUsize>,
}

impl Drop for ReceiverSlot {
    fn drop(&mut self) {
        self.registry.receivers.fetch_sub(1, Ordering::Relaxed);
        self.per_stream.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One WebSocket client, counted while it lives.
pub struct ClientGuard(Arc<Registry>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One WebSocket connection from an IP address, counted while it lives.
pub struct IpGuard {
    registry: Arc<Registry>,
    ip: IpAddr,
}

impl Drop for IpGuard {
    fn drop(&mut self) {
        let mut map = lock(&self.registry.per_ip);
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mp3::Mp3Config;
    use std::sync::Barrier;

    fn outputs(id: &str) -> StreamOutputs {
        let fanout = || Fanout::new(id, &Mp3Config::default(), Arc::default());
        StreamOutputs {
            mp3: fanout(),
            ogg: fanout(),
        }
    }

    /// Runs `attempt` on `threads` threads released at the same moment;
    /// returns what each got.
    fn race<T: Send + 'static>(
        threads: usize,
        attempt: impl Fn() -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let start = Arc::new(Barrier::new(threads));
        let attempt = Arc::new(attempt);
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (start, attempt) = (start.clone(), attempt.clone());
                std::thread::spawn(move || {
                    start.wait();
                    attempt()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    }

    fn live_stream(reg: &Arc<Registry>) -> Arc<str> {
        let id = Registry::new_stream_id();
        let slot = reg.try_reserve_stream(usize::MAX).expect("room");
        slot.publish(id.clone(), outputs(&id));
        id
    }

    #[test]
    fn racing_receivers_never_exceed_the_stream_limit() {
        for round in 0..50 {
            let reg = Arc::new(Registry::new());
            let id = live_stream(&reg);
            // Two of five places taken: the race is for the last three.
            let held: Vec<_> = (0..2)
                .map(|_| reg.try_reserve_receiver(&id, 5, 100).expect("room"))
                .collect();
            let (r, s) = (reg.clone(), id.clone());
            let got = race(16, move || r.try_reserve_receiver(&s, 5, 100));
            let won = got.iter().filter(|g| g.is_ok()).count();
            assert_eq!(won, 3, "round {round}: {won} of 16 got the last 3 places");
            assert!(got
                .iter()
                .filter_map(|g| g.as_ref().err())
                .all(|e| *e == Refused::ReceiversPerStream(5)));
            assert_eq!(reg.stream_receivers(&id), 5);
            assert_eq!(reg.receivers(), 5);
            drop(got);
            drop(held);
            assert_eq!((reg.receivers(), reg.stream_receivers(&id)), (0, 0));
        }
    }

    #[test]
    fn racing_receivers_never_exceed_the_server_limit() {
        let reg = Arc::new(Registry::new());
        let (a, b) = (live_stream(&reg), live_stream(&reg));
        let r = reg.clone();
        let got = race(16, move || {
            let stream = if rand::random::<bool>() { &a } else { &b };
            r.try_reserve_receiver(stream, 100, 7)
        });
        assert_eq!(got.iter().filter(|g| g.is_ok()).count(), 7);
        assert_eq!(reg.receivers(), 7);
    }

    #[test]
    fn racing_senders_never_exceed_the_stream_limit() {
        for _ in 0..50 {
            let reg = Arc::new(Registry::new());
            live_stream(&reg);
            let r = reg.clone();
            let got = race(8, move || {
                let slot = r.try_reserve_stream(3)?;
                let id = Registry::new_stream_id();
                slot.publish(id.clone(), outputs(&id));
                Ok::<_, Refused>(())
            });
            assert_eq!(got.iter().filter(|g| g.is_ok()).count(), 2);
            assert_eq!(reg.list().len(), 3);
            assert_eq!(reg.senders(), 3);
        }
    }

    #[test]
    fn an_unpublished_stream_slot_frees_its_place() {
        let reg = Arc::new(Registry::new());
        let slot = reg.try_reserve_stream(1).expect("room");
        assert_eq!(reg.try_reserve_stream(1).err(), Some(Refused::Streams(1)));
        drop(slot);
        assert!(reg.try_reserve_stream(1).is_ok());
        assert!(reg.list().is_empty());
    }

    #[test]
    fn a_named_stream_is_refused_while_its_name_is_reserved_or_live() {
        let reg = Arc::new(Registry::new());
        let name: Arc<str> = "studio".into();
        let slot = reg.try_reserve_named_stream(5, name.clone()).expect("room");
        let again = reg.try_reserve_named_stream(5, name.clone());
        assert_eq!(again.err(), Some(Refused::NameTaken));
        slot.publish(name.clone(), outputs(&name));
        let again = reg.try_reserve_named_stream(5, name.clone());
        assert_eq!(again.err(), Some(Refused::NameTaken));
        assert!(reg.end_stream(&name));
        let slot = reg
            .try_reserve_named_stream(5, name.clone())
            .expect("free again");
        drop(slot);
        assert!(reg.try_reserve_named_stream(1, name).is_ok(), "place freed");
    }

    #[test]
    fn a_receiver_of_an_ended_stream_is_refused() {
        let reg = Arc::new(Registry::new());
        let id = live_stream(&reg);
        let slot = reg.try_reserve_receiver(&id, 5, 5).expect("room");
        assert!(reg.end_stream(&id));
        assert!(!reg.end_stream(&id), "ended once");
        assert_eq!(
            reg.try_reserve_receiver(&id, 5, 5).err(),
            Some(Refused::NoStream)
        );
        drop(slot);
        assert_eq!(reg.receivers(), 0);
    }
}
