//! One stream's MP3 distribution point, [`Fanout`]: what the pipeline
//! publishes to and what HTTP serves from. It ties together the stream's
//! [`Ring`] of batches and its two kinds of listener: async [`Listener`]s
//! (an HTTP body each) and sockets handed to the stream's writer thread.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

use super::batch::Batch;
use super::counters::{PipelineCounters, PipelineCounts};
use super::listener::Listener;
use super::ring::Ring;
use super::writer::Writer;
use super::Mp3Config;

/// Created by [`super::start`]; shared by the pipeline thread, the registry
/// and the HTTP layer.
pub struct Fanout {
    ring: Arc<Ring>,
    writer: Writer,
}

impl std::fmt::Debug for Fanout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fanout")
            .field("stream_id", &self.stream_id())
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
        Arc::new(Self {
            ring: Arc::new(Ring::new(stream_id, config, counters)),
            writer: Writer::default(),
        })
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
