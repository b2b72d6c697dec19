//! One stream's distribution point for one output [`Format`], [`Fanout`]:
//! what a pipeline publishes to and what HTTP serves from. It ties together
//! the stream's [`Ring`] of batches and its two kinds of listener: async
//! [`Listener`]s (an HTTP body each) and sockets handed to the stream's
//! writer thread. Used as is by the MP3 and the Ogg/Opus outputs. A lazy
//! fan-out (every stream's MP3 and Ogg) has no pipeline until a listener
//! joins: whichever kind of listener finds it idle starts it
//! ([`Demand::start`]).

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, OnceLock, Weak};

use super::batch::Batch;
use super::counters::{PipelineCounters, PipelineCounts};
use super::demand::Demand;
use super::listener::Listener;
use super::ring::{Preamble, Ring, Supply};
use super::writer::Writer;
use super::Mp3Config;

/// What a fan-out carries to its listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// MP3 transcoded from the sender's Opus.
    Mp3,
    /// The sender's own Opus packets in Ogg pages (RFC 7845).
    Ogg,
}

impl Format {
    /// Name in logs, and the file extension of its URL.
    pub fn name(self) -> &'static str {
        match self {
            Format::Mp3 => "mp3",
            Format::Ogg => "ogg",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Mp3 => "audio/mpeg",
            Format::Ogg => "audio/ogg",
        }
    }
}

/// Created by [`super::start`] (and the Ogg output's start); shared by the pipeline thread, the registry
/// and the HTTP layer.
pub struct Fanout {
    ring: Arc<Ring>,
    writer: Writer,
    /// A lazy fan-out's demand, which starts its pipeline.
    demand: OnceLock<Weak<Demand>>,
}

impl std::fmt::Debug for Fanout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fanout")
            .field("stream_id", &self.stream_id())
            .field("format", &self.format())
            .field("listeners", &self.listener_count())
            .field("frames_published", &self.frames_published())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Fanout {
    /// An MP3 fan-out whose pipeline runs from the start.
    pub(crate) fn new(
        stream_id: &str,
        config: &Mp3Config,
        counters: Arc<PipelineCounters>,
    ) -> Arc<Self> {
        Self::build(
            stream_id,
            Format::Mp3,
            None,
            config,
            Supply::Running,
            counters,
        )
    }

    /// An idle fan-out of `format` whose listeners each first get
    /// `preamble`: its first listener starts the pipeline of the demand
    /// given by [`set_demand`](Self::set_demand).
    pub(crate) fn lazy(
        stream_id: &str,
        format: Format,
        preamble: Option<Preamble>,
        config: &Mp3Config,
        counters: Arc<PipelineCounters>,
    ) -> Arc<Self> {
        Self::build(stream_id, format, preamble, config, Supply::Idle, counters)
    }

    fn build(
        stream_id: &str,
        format: Format,
        preamble: Option<Preamble>,
        config: &Mp3Config,
        supply: Supply,
        counters: Arc<PipelineCounters>,
    ) -> Arc<Self> {
        let ring = Ring::new(stream_id, format, preamble, config, supply, counters);
        Arc::new(Self {
            ring: Arc::new(ring),
            writer: Writer::default(),
            demand: OnceLock::new(),
        })
    }

    /// Ties a lazy fan-out to the demand that starts its pipeline.
    pub(crate) fn set_demand(&self, demand: &Arc<Demand>) {
        let _ = self.demand.set(Arc::downgrade(demand));
    }

    /// A listener found the ring idle: start its pipeline (or, with the
    /// stream's demand gone, end the listener).
    fn start_pipeline(&self) {
        match self.demand.get().and_then(Weak::upgrade) {
            Some(demand) => demand.start(),
            None => self.close(),
        }
    }

    pub fn format(&self) -> Format {
        self.ring.format
    }

    /// How many batches one packet may publish at once (see
    /// [`coalesce`](super::batch::coalesce)).
    pub(crate) fn max_batches_per_packet(&self) -> usize {
        (self.ring.queue_batches / 4).clamp(1, 8)
    }

    /// Publishes one batch to every listener.
    pub(crate) fn publish(&self, batch: Batch) {
        self.ring.publish(batch);
    }

    /// A starting pipeline's first batches, made from the stream's history
    /// (`from_start`: from its first packet), published at once.
    pub(crate) fn publish_warm(&self, batches: Vec<Batch>, from_start: bool) {
        self.ring.publish_warm(batches, from_start);
    }

    /// Turns the ring idle (its pipeline stops) if nobody listens.
    pub(crate) fn try_idle(&self) -> bool {
        self.ring.try_idle()
    }

    /// Ends the stream: listeners get what is queued, then their bodies end.
    pub(crate) fn close(&self) {
        self.ring.close();
    }

    /// A new async listener: the burst and its place in the ring, taken
    /// atomically (if the pipeline is idle, it starts, and the burst comes
    /// with its first publish).
    pub fn subscribe(&self) -> Listener {
        let (listener, start) = Listener::join(&self.ring);
        if start {
            self.start_pipeline();
        }
        listener
    }

    /// Hands a listener's socket (its response head already sent) to the
    /// stream's writer thread, which writes the burst, then live batches,
    /// and closes it at the end of the stream.
    pub fn attach(&self, socket: TcpStream, peer: SocketAddr, chunked: bool) -> io::Result<()> {
        if self.writer.attach(&self.ring, socket, peer, chunked)? {
            self.start_pipeline();
        }
        Ok(())
    }

    pub fn listener_count(&self) -> usize {
        self.ring.listener_count()
    }

    pub fn is_closed(&self) -> bool {
        self.ring.is_closed()
    }

    pub fn frames_published(&self) -> u64 {
        self.ring.frames_published()
    }

    pub fn stream_id(&self) -> &str {
        &self.ring.stream_id
    }

    /// Counters of the whole pipeline (packets, concealment, listeners).
    pub fn counters(&self) -> PipelineCounts {
        self.ring.counters.snapshot()
    }
}
