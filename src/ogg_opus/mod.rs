//! Live Ogg/Opus for one stream, without transcoding: the sender's own Opus
//! packets in Ogg pages (RFC 7845), fanned out to many HTTP listeners.
//! Owns the entry point [`start`] and what the `ogg-<stream_id>` thread does
//! with the packets the relay hands over: page them.
//!
//! Everything after the pages is the MP3 output's format-neutral machinery,
//! reused in place: the output is lazy like MP3's (the stream keeps its
//! recent packets while nobody listens; the first listener starts the pager
//! thread, which pages them at once for the burst, and it stops a linger
//! after the last listener left; see `crate::mp3::demand`), and each page (or a few, after a long hole) is a
//! [`Batch`](crate::mp3::batch::Batch) in a [`Fanout`] ring, so bursts start
//! on a page, slow listeners are dropped, and bodies end with the stream,
//! exactly as for MP3. The header pages are not in the ring: each listener
//! gets its own OpusHead and OpusTags pages first (the fan-out's preamble),
//! numbered to precede the first page it gets, and never a second logical
//! stream on the same response. Imports go one way: mod → pager → page,
//! header.

mod header;
mod page;
mod pager;

use std::sync::Arc;

use bytes::Bytes;

use crate::mp3::batch::Batch;
use crate::mp3::demand::Demand;
use crate::mp3::pipeline::{MakeOutput, Output};
use crate::mp3::{start_lazy, Fanout, Format, Mp3Config, PacketSink, Preamble};

use pager::Pager;

/// Sets up the Ogg output of one stream: its idle [`Fanout`] and the sink
/// the relay feeds. The first listener starts ONE thread `ogg-<stream_id>`
/// paging the stream's recent packets, then live ones, until a linger after
/// the last listener left. Bursts (their time floor; bytes are MP3's alone)
/// and listener lag limits are the MP3 output's (`config`).
pub fn start(stream_id: &str, config: &Mp3Config) -> (PacketSink, Arc<Fanout>) {
    let config = Mp3Config {
        burst_bytes: 0,
        ..config.clone()
    };
    let serial: u32 = rand::random();
    let make: MakeOutput = Box::new(move |demand: &Demand| {
        let pager = Pager::new(serial, Arc::clone(demand.counters()));
        Ok(Box::new(pager) as Box<dyn Output>)
    });
    start_lazy(stream_id, Format::Ogg, Some(preamble(serial)), config, make)
}

/// One listener's pages renumbered so that its first page (its OpusHead)
/// is page 0, as at the start of a file. Listeners joining mid-stream get
/// header pages numbered just before their first audio page, which players
/// take; Icecast's Ogg parser instead reads a first page above 0 as a lost
/// page and refuses the stream ("Seen BOS page with unknown type").
#[derive(Debug, Default)]
pub struct FromPageZero {
    /// The first page's sequence number, once seen.
    by: Option<u32>,
}

impl FromPageZero {
    /// `pages` (whole pages, as the fan-out hands them out) renumbered.
    pub fn renumber(&mut self, pages: Bytes) -> Bytes {
        let by = *self
            .by
            .get_or_insert_with(|| page::page_seq(&pages).unwrap_or(0));
        if by == 0 {
            return pages;
        }
        let mut out = pages.to_vec();
        page::renumber(&mut out, by);
        Bytes::from(out)
    }
}

/// A listener's header pages, numbered to precede `first`, the first audio
/// page it gets.
fn preamble(serial: u32) -> Preamble {
    Arc::new(move |first: &Batch| {
        let seq = page::page_seq(&first.data).unwrap_or(pager::FIRST_AUDIO_SEQ);
        Bytes::from(header::header_pages(serial, seq))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    /// A 20 ms CELT packet.
    fn packet(n: u8) -> Arc<[u8]> {
        Arc::from(&[0xf8, n, n][..])
    }

    /// Every page of `bytes`: (flags, granule, seq, first packet bytes).
    fn pages(mut bytes: &[u8]) -> Vec<(u8, u64, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while bytes.len() >= 27 {
            let n = bytes[26] as usize;
            let body: usize = bytes[27..27 + n].iter().map(|&l| l as usize).sum();
            let first = bytes[27..27 + n].iter().take_while(|&&l| l == 255).count() + 1;
            let first_len: usize = bytes[27..27 + first].iter().map(|&l| l as usize).sum();
            let granule = u64::from_le_bytes(bytes[6..14].try_into().expect("8"));
            let packet = bytes[27 + n..27 + n + first_len].to_vec();
            out.push((
                bytes[5],
                granule,
                page::page_seq(bytes).expect("page"),
                packet,
            ));
            bytes = &bytes[27 + n + body..];
        }
        out
    }

    async fn read(listener: crate::mp3::Listener) -> Vec<u8> {
        let parts: Vec<_> = listener.into_stream().collect().await;
        parts
            .into_iter()
            .flat_map(|p| p.expect("ok").to_vec())
            .collect()
    }

    async fn wait_until(mut cond: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "timed out");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_listener_joining_mid_stream_gets_its_own_headers_then_whole_pages() {
        let config = Mp3Config {
            burst_ms: 400,
            listener_queue_batches: 64,
            ..Mp3Config::default()
        };
        let (sink, fanout) = start("t", &config);
        let early = fanout.subscribe();
        // 4 s: older than the first-words window.
        for i in 0..200u64 {
            sink.push(i, i * 960, packet(i as u8));
        }
        // Wait for the pager to publish 20 pages of 10 packets.
        wait_until(|| fanout.frames_published() >= 200).await;
        let late = fanout.subscribe();
        assert_eq!(fanout.listener_count(), 2);
        drop(sink);
        let (early, late) = (read(early).await, read(late).await);
        let early = pages(&early);
        assert_eq!(early.len(), 2 + 20);
        assert_eq!((early[0].0, early[0].2), (page::BOS, 0));
        assert_eq!(&early[0].3[..8], b"OpusHead");
        assert_eq!(&early[1].3[..8], b"OpusTags");
        assert_eq!(early[2].3, packet(0).to_vec());
        assert_eq!(early[21].1, 3840 + 200 * 960);

        // The burst (400 ms: the last two pages) with headers numbered before it.
        let late = pages(&late);
        let seqs: Vec<u32> = late.iter().map(|p| p.2).collect();
        assert_eq!(seqs, vec![18, 19, 20, 21]);
        assert_eq!((late[0].0, &late[0].3[..8]), (page::BOS, &b"OpusHead"[..]));
        assert_eq!(&late[1].3[..8], b"OpusTags");
        assert_eq!(late[2].3, packet(180).to_vec(), "starts on a page");
        assert_eq!(late[2].1, 3840 + 190 * 960);
        assert!(fanout.is_closed());
    }

    /// Granules of the audio pages of `body` rise, from the page after the
    /// headers.
    fn assert_rising_granules(body: &[(u8, u64, u32, Vec<u8>)]) {
        assert!(body[2..].windows(2).all(|w| w[0].1 < w[1].1), "granules");
        let seqs: Vec<u32> = body.iter().map(|p| p.2).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    }

    #[tokio::test]
    async fn no_paging_until_a_listener_then_a_burst_from_the_first_packet() {
        let config = Mp3Config {
            burst_ms: 400,
            ..Mp3Config::default()
        };
        let (sink, fanout) = start("lazy", &config);
        let demand = sink.demand().expect("lazy");
        // 2 s of a young stream: kept, not paged.
        for i in 0..100u64 {
            sink.push(i, 5000 + i * 960, packet(i as u8));
        }
        assert!(!demand.running());
        assert_eq!(fanout.counters().packets_in, 0, "nothing paged while idle");
        assert_eq!(fanout.frames_published(), 0);

        // The first listener starts the pager from the history: the stream is
        // younger than the first-words window, so from its first packet.
        let listener = fanout.subscribe();
        assert!(demand.running());
        wait_until(|| fanout.frames_published() >= 100).await;
        assert_eq!(fanout.counters().packets_in, 100);
        drop(sink);
        let body = pages(&read(listener).await);
        assert_eq!(body.len(), 2 + 10);
        assert_eq!(&body[0].3[..8], b"OpusHead");
        assert_eq!(body[2].3, packet(0).to_vec(), "the first words");
        assert_eq!(body[2].1, 3840 + 10 * 960, "granules from the RTP time");
        assert_eq!(body[11].1, 3840 + 100 * 960);
        assert_rising_granules(&body);
    }

    #[tokio::test]
    async fn stops_after_the_last_listener_and_restarts_from_the_history() {
        let config = Mp3Config {
            burst_ms: 400,
            ..Mp3Config::default()
        };
        let (sink, fanout) = start("again", &config);
        let demand = sink.demand().expect("lazy");
        let first = fanout.subscribe();
        for i in 0..20u64 {
            sink.push(i, i * 960, packet(i as u8));
        }
        wait_until(|| fanout.counters().packets_in == 20).await;
        assert!(!demand.try_stop(), "a listener is there");
        drop(first);
        assert!(demand.try_stop(), "nobody listens");
        assert!(!demand.running());
        // 4 s later in the stream (older than the first-words window): kept
        // in the history, not paged.
        for i in 200..400u64 {
            sink.push(i, i * 960, packet(i as u8));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(fanout.counters().packets_in, 20, "idle again: no paging");

        // The next listener restarts the pager; its burst is the history's
        // last pages, after its own headers.
        let again = fanout.subscribe();
        assert!(demand.running());
        wait_until(|| fanout.counters().packets_in > 20).await;
        drop(sink);
        let body = pages(&read(again).await);
        assert_eq!(&body[0].3[..8], b"OpusHead");
        assert_eq!(&body[1].3[..8], b"OpusTags");
        assert!(body.len() >= 2 + 2, "a 400 ms burst: {} pages", body.len());
        assert_eq!(body.last().expect("page").3.len(), 3, "audio pages");
        assert_rising_granules(&body);
        assert!(fanout.is_closed());
    }
}
