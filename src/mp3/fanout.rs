//! One stream's distribution point for one output [`Format`], [`Fanout`]:
//! what a pipeline publishes to and what HTTP serves from. It ties together
//! the stream's [`Ring`] of batches and its two kinds of listener: async
//! [`Listener`]s (an HTTP body each) and sockets handed to the stream's
//! writer thread. Used as is by the MP3 and the Ogg/Opus outputs.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

use super::batch::Batch;
use super::counters::{PipelineCounters, PipelineCounts};
use super::listener::Listener;
use super::ring::{Preamble, Ring};
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
    pub(crate) fn new(
        stream_id: &str,
        config: &Mp3Config,
        counters: Arc<PipelineCounters>,
    ) -> Arc<Self> {
        Self::with_preamble(stream_id, Format::Mp3, None, config, counters)
    }

    /// A fan-out of `format` whose listeners each first get `preamble`.
    pub(crate) fn with_preamble(
        stream_id: &str,
        format: Format,
        preamble: Option<Preamble>,
        config: &Mp3Config,
        counters: Arc<PipelineCounters>,
    ) -> Arc<Self> {
        let ring = Ring::new(stream_id, format, preamble, config, counters);
        Arc::new(Self {
            ring: Arc::new(ring),
            writer: Writer::default(),
        })
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

    /// Ends the stream: listeners get what is queued, then their bodies end.
    pub(crate) fn close(&self) {
        self.ring.close();
    }

    /// A new async listener: the burst and its place in the ring, taken
    /// atomically.
    pub fn subscribe(&self) -> Listener {
        Listener::join(&self.ring)
    }

    /// Hands a listener's socket (its response head already sent) to the
    /// stream's writer thread, which writes the burst, then live batches,
    /// and closes it at the end of the stream.
    pub fn attach(&self, socket: TcpStream, peer: SocketAddr, chunked: bool) -> io::Result<()> {
        self.writer.attach(&self.ring, socket, peer, chunked)
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
