//! The stream registry: which streams are live (oldest first), how many
//! senders and receivers there are, and the broadcast of `stream_available` /
//! `stream_ended` events to every connected client. Signalling and HTTP talk
//! to it; it knows nothing of sockets or peers.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use rand::Rng;
use tokio::sync::broadcast;

use crate::mp3::Fanout;

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

/// One live stream as the registry sees it.
pub struct Stream {
    pub id: Arc<str>,
    pub started: Instant,
    /// Live MP3 for HTTP listeners.
    pub fanout: Arc<Fanout>,
    /// WebRTC receiver legs of this stream (offered or live).
    pub receivers: Arc<AtomicUsize>,
}

pub struct Registry {
    streams: Mutex<Vec<Stream>>,
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
            streams: Mutex::new(Vec::new()),
            events,
            senders: AtomicUsize::new(0),
            receivers: AtomicUsize::new(0),
            clients: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            started: Instant::now(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Stream>> {
        // A panic while holding this lock cannot leave the Vec half-updated in
        // a harmful way, so recover from poisoning.
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Lists a stream (newest last) and tells everyone.
    pub fn add_stream(&self, id: Arc<str>, fanout: Arc<Fanout>) {
        {
            let mut streams = self.lock();
            streams.push(Stream {
                id: id.clone(),
                started: Instant::now(),
                fanout,
                receivers: Arc::new(AtomicUsize::new(0)),
            });
        }
        self.senders.fetch_add(1, Ordering::Relaxed);
        tracing::info!(stream = %id, "stream available");
        let _ = self.events.send(StreamEvent::Available(id));
    }

    /// Removes a stream. Returns true (and broadcasts `stream_ended`) only for
    /// the call that actually removed it, so the event goes out exactly once.
    pub fn end_stream(&self, id: &str) -> bool {
        let removed = {
            let mut streams = self.lock();
            streams
                .iter()
                .position(|s| &*s.id == id)
                .map(|i| streams.remove(i))
        };
        match removed {
            Some(stream) => {
                self.senders.fetch_sub(1, Ordering::Relaxed);
                tracing::info!(stream = %id, secs = stream.started.elapsed().as_secs(), "stream ended");
                let _ = self.events.send(StreamEvent::Ended(stream.id.clone()));
                true
            }
            None => false,
        }
    }

    pub fn shutdown(&self) {
        let _ = self.events.send(StreamEvent::Shutdown);
    }

    /// Live stream ids, oldest first.
    pub fn list(&self) -> Vec<Arc<str>> {
        self.lock().iter().map(|s| s.id.clone()).collect()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.lock().iter().any(|s| &*s.id == id)
    }

    pub fn newest(&self) -> Option<Arc<str>> {
        self.lock().last().map(|s| s.id.clone())
    }

    /// The MP3 fan-out of a stream (`None` id = newest).
    pub fn fanout(&self, id: Option<&str>) -> Option<(Arc<str>, Arc<Fanout>)> {
        let streams = self.lock();
        let s = match id {
            Some(id) => streams.iter().find(|s| &*s.id == id),
            None => streams.last(),
        }?;
        Some((s.id.clone(), s.fanout.clone()))
    }

    /// Per-stream MP3 listener counts, oldest first.
    pub fn listener_counts(&self) -> Vec<(Arc<str>, usize)> {
        self.lock()
            .iter()
            .map(|s| (s.id.clone(), s.fanout.listener_count()))
            .collect()
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
    pub fn stream_receivers(&self, id: &str) -> usize {
        self.lock()
            .iter()
            .find(|s| &*s.id == id)
            .map_or(0, |s| s.receivers.load(Ordering::Relaxed))
    }

    /// MP3 listeners of all streams.
    pub fn total_listeners(&self) -> usize {
        self.lock().iter().map(|s| s.fanout.listener_count()).sum()
    }

    /// Counts one WebRTC receiver leg of `stream` for as long as the guard lives.
    pub fn receiver_guard(self: &Arc<Self>, stream: &str) -> CountGuard {
        let per_stream = self
            .lock()
            .iter()
            .find(|s| &*s.id == stream)
            .map(|s| s.receivers.clone());
        if let Some(c) = &per_stream {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let mut guard = CountGuard::new(self.clone(), Counter::Receivers);
        guard.per_stream = per_stream;
        guard
    }

    /// Counts one WebSocket client for as long as the guard lives.
    pub fn client_guard(self: &Arc<Self>) -> CountGuard {
        CountGuard::new(self.clone(), Counter::Clients)
    }

    /// Counts a WebSocket connection from `ip`, unless that IP already has
    /// `max` of them.
    pub fn ip_guard(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpGuard> {
        let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
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

/// One WebSocket connection from an IP address, counted while it lives.
pub struct IpGuard {
    registry: Arc<Registry>,
    ip: IpAddr,
}

impl Drop for IpGuard {
    fn drop(&mut self) {
        let mut map = self
            .registry
            .per_ip
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Counter {
    Receivers,
    Clients,
}

/// Increments a registry counter on creation and decrements it on drop.
pub struct CountGuard {
    registry: Arc<Registry>,
    counter: Counter,
    per_stream: Option<Arc<AtomicUsize>>,
}

impl CountGuard {
    fn new(registry: Arc<Registry>, counter: Counter) -> Self {
        registry.counter(counter).fetch_add(1, Ordering::Relaxed);
        CountGuard {
            registry,
            counter,
            per_stream: None,
        }
    }
}

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.registry
            .counter(self.counter)
            .fetch_sub(1, Ordering::Relaxed);
        if let Some(c) = &self.per_stream {
            c.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Registry {
    fn counter(&self, c: Counter) -> &AtomicUsize {
        match c {
            Counter::Receivers => &self.receivers,
            Counter::Clients => &self.clients,
        }
    }
}
