//! Live Ogg/Opus for one stream, without transcoding: the sender's own Opus
//! packets in Ogg pages (RFC 7845), fanned out to many HTTP listeners.
//! Owns the entry point [`start`] and the `ogg-<stream_id>` thread that pages
//! the packets the relay hands over.
//!
//! Everything after the pages is the MP3 output's format-neutral machinery,
//! reused in place: each page (or a few, after a long hole) is a
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

use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;

use bytes::Bytes;

use crate::liveness::Liveness;
use crate::mp3::batch::Batch;
use crate::mp3::pipeline::{publish, CloseOnDrop};
use crate::mp3::{
    Fanout, Format, Mp3Config, OpusPacket, PacketSink, PipelineCounters, Preamble, PACKET_QUEUE,
};

use pager::Pager;

/// Starts the Ogg output of one stream: its [`Fanout`] and the sink the
/// relay feeds, with ONE thread `ogg-<stream_id>` paging the packets.
/// Bursts (their time floor; bytes are MP3's alone) and listener lag limits
/// are the MP3 output's (`config`). The pager runs for the whole stream: it
/// only frames the sender's packets, no codec.
pub fn start(stream_id: &str, config: &Mp3Config) -> std::io::Result<(PacketSink, Arc<Fanout>)> {
    let config = &Mp3Config {
        burst_bytes: 0,
        ..config.clone()
    };
    let counters = Arc::new(PipelineCounters::default());
    let serial: u32 = rand::random();
    let fanout = Fanout::with_preamble(
        stream_id,
        Format::Ogg,
        Some(preamble(serial)),
        config,
        Arc::clone(&counters),
    );
    let pager = Pager::new(serial, Arc::clone(&counters));
    let (tx, rx) = mpsc::sync_channel(PACKET_QUEUE);
    let thread_fanout = Arc::clone(&fanout);
    std::thread::Builder::new()
        .name(format!("ogg-{stream_id}"))
        .spawn(move || {
            let _watch = Liveness::process().watch_for_panic("an Ogg pager thread");
            run(rx, pager, thread_fanout)
        })?;
    Ok((PacketSink::new(tx, counters), fanout))
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

fn run(rx: Receiver<OpusPacket>, mut pager: Pager, fanout: Arc<Fanout>) {
    let closer = CloseOnDrop(Arc::clone(&fanout));
    tracing::debug!(stream_id = fanout.stream_id(), "ogg pager started");
    let max_batches = fanout.max_batches_per_packet();
    let mut pending: Vec<Batch> = Vec::new();
    // `recv` fails only once the sink is dropped and the queue drained.
    while let Ok(packet) = rx.recv() {
        pager.push(packet.seq, packet.rtp_time, &packet.payload, &mut pending);
        publish(&fanout, &mut pending, max_batches);
    }
    pager.finish(&mut pending);
    publish(&fanout, &mut pending, max_batches);
    drop(closer);
    tracing::debug!(
        stream_id = fanout.stream_id(),
        counters = ?fanout.counters(),
        "ogg pager finished"
    );
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

    #[tokio::test]
    async fn a_listener_joining_mid_stream_gets_its_own_headers_then_whole_pages() {
        let config = Mp3Config {
            burst_ms: 400,
            ..Mp3Config::default()
        };
        let (sink, fanout) = start("t", &config).expect("start");
        let early = fanout.subscribe();
        for i in 0..50u64 {
            sink.push(i, i * 960, packet(i as u8));
        }
        // Wait for the pager to publish 5 pages of 10 packets.
        while fanout.frames_published() < 50 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let late = fanout.subscribe();
        assert_eq!(fanout.listener_count(), 2);
        drop(sink);
        let read = |l: crate::mp3::Listener| async {
            let parts: Vec<_> = l.into_stream().collect().await;
            parts
                .into_iter()
                .flat_map(|p| p.expect("ok").to_vec())
                .collect::<Vec<u8>>()
        };
        let (early, late) = (read(early).await, read(late).await);
        let early = pages(&early);
        assert_eq!(early.len(), 2 + 5);
        assert_eq!((early[0].0, early[0].2), (page::BOS, 0));
        assert_eq!(&early[0].3[..8], b"OpusHead");
        assert_eq!(&early[1].3[..8], b"OpusTags");
        assert_eq!(early[2].3, packet(0).to_vec());
        assert_eq!(early[6].1, 3840 + 50 * 960);

        // The burst (400 ms: the last two pages) with headers numbered before it.
        let late = pages(&late);
        let seqs: Vec<u32> = late.iter().map(|p| p.2).collect();
        assert_eq!(seqs, vec![3, 4, 5, 6]);
        assert_eq!((late[0].0, &late[0].3[..8]), (page::BOS, &b"OpusHead"[..]));
        assert_eq!(&late[1].3[..8], b"OpusTags");
        assert_eq!(late[2].3, packet(30).to_vec(), "starts on a page");
        assert_eq!(late[2].1, 3840 + 40 * 960);
        assert!(fanout.is_closed());
    }
}
