//! `voice-relay-receiver-memory`: the heap one WebRTC receiver holds in the
//! relay, measured in-process and deterministically (no sockets, simulated
//! time, so machine load does not change a byte of it).
//!
//! N receiver `Rtc`s are built exactly as the relay builds them
//! (`voice_relay::relay::receiver_rtc`: RTP mode, ICE lite, Opus only, the
//! trimmed extension map, the small send buffer, the tapped SRTP keys), each
//! offers one send-only audio m-line as signalling does, and each is driven
//! through ICE and DTLS against its own in-process str0m client. Then the
//! relay side forwards 20 ms Opus packets the way the relay does (its own
//! SRTP context, str0m untouched per copy) for `--seconds` of simulated time
//! while both sides run their timers (STUN consent, RTCP both ways), and
//! finally every receiver is closed (RTCP BYE, DTLS close_notify).
//!
//! Every allocation is tagged with the side that made it (the relay's or the
//! clients'), so the live bytes of the relay side are known exactly at each
//! phase; a size histogram of the relay's live blocks is printed at the end.
//! Only Rust allocations pass through it: aws-lc's cipher contexts are
//! allocated by its C code with `malloc` (about 6 KB per receiver; heaptrack
//! sees them).
//! For which structures hold them, run it under `heaptrack` with `--leak`:
//! the relay's receivers are then leaked at exit (the clients are dropped),
//! and `heaptrack_print` lists what is still allocated by call stack.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::media::{Direction, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use voice_relay::relay::srtp::{tapped_provider, SrtpTx};
use voice_relay::relay::{host_candidates, negotiated_opus_pt, receiver_rtc, KeySlot};

#[derive(Parser)]
#[command(about = "Heap held by one WebRTC receiver of the relay, by phase")]
struct Args {
    /// Receivers.
    #[arg(long, default_value_t = 200)]
    receivers: usize,
    /// Simulated seconds of forwarded 20 ms packets after the handshakes.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Leak the relay's receivers at exit (for heaptrack) instead of closing them.
    #[arg(long)]
    leak: bool,
}

// ---- The tagging allocator -------------------------------------------------

/// Which side the current thread is allocating for.
#[derive(Clone, Copy)]
enum Side {
    Client = 0,
    Relay = 1,
}

thread_local! {
    static SIDE: Cell<Side> = const { Cell::new(Side::Client) };
}

/// Runs `f` with its allocations counted to the relay.
fn as_relay<T>(f: impl FnOnce() -> T) -> T {
    SIDE.with(|s| s.set(Side::Relay));
    let v = f();
    SIDE.with(|s| s.set(Side::Client));
    v
}

/// Size classes of the histogram: up to 2^k bytes for k in 0..BUCKETS.
const BUCKETS: usize = 24;

/// Per side: live bytes and blocks; for the relay, live blocks by size class.
struct Tally {
    bytes: [AtomicIsize; 2],
    blocks: [AtomicIsize; 2],
    relay_by_size: [AtomicIsize; BUCKETS],
    relay_bytes_by_size: [AtomicIsize; BUCKETS],
}

/// Bytes before each block that record its side (a multiple of any alignment
/// up to 16; larger alignments get a header of their own size).
const HEADER: usize = 16;

struct Tagging;

#[global_allocator]
static ALLOC: Tagging = Tagging;

static TALLY: Tally = Tally {
    bytes: [const { AtomicIsize::new(0) }; 2],
    blocks: [const { AtomicIsize::new(0) }; 2],
    relay_by_size: [const { AtomicIsize::new(0) }; BUCKETS],
    relay_bytes_by_size: [const { AtomicIsize::new(0) }; BUCKETS],
};

fn header_for(layout: Layout) -> usize {
    layout.align().max(HEADER)
}

fn bucket(size: usize) -> usize {
    (usize::BITS - size.saturating_sub(1).leading_zeros()).min(BUCKETS as u32 - 1) as usize
}

fn count(side: usize, size: usize, sign: isize) {
    TALLY.bytes[side].fetch_add(sign * size as isize, Ordering::Relaxed);
    TALLY.blocks[side].fetch_add(sign, Ordering::Relaxed);
    if side == Side::Relay as usize {
        let b = bucket(size);
        TALLY.relay_by_size[b].fetch_add(sign, Ordering::Relaxed);
        TALLY.relay_bytes_by_size[b].fetch_add(sign * size as isize, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Tagging {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let h = header_for(layout);
        let Ok(outer) = Layout::from_size_align(layout.size() + h, layout.align().max(HEADER))
        else {
            return std::ptr::null_mut();
        };
        // SAFETY: `outer` has a non-zero size.
        let base = unsafe { System.alloc(outer) };
        if base.is_null() {
            return base;
        }
        // `try_with`: thread-local storage may be gone while a thread exits.
        let side = SIDE.try_with(|s| s.get()).unwrap_or(Side::Client) as usize;
        // SAFETY: the block is `h` bytes longer than asked, and `h` ≥ 16 keeps
        // the returned pointer aligned; the tag lives just before it.
        unsafe {
            let ptr = base.add(h);
            (ptr.sub(8) as *mut usize).write(side);
            count(side, layout.size(), 1);
            ptr
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let h = header_for(layout);
        // SAFETY: `ptr` came from `alloc` with the same layout.
        unsafe {
            let side = (ptr.sub(8) as *const usize).read();
            count(side, layout.size(), -1);
            let outer =
                Layout::from_size_align_unchecked(layout.size() + h, layout.align().max(HEADER));
            System.dealloc(ptr.sub(h), outer);
        }
    }
}

fn live(side: Side) -> (isize, isize) {
    (
        TALLY.bytes[side as usize].load(Ordering::Relaxed),
        TALLY.blocks[side as usize].load(Ordering::Relaxed),
    )
}

// ---- One receiver and its client -------------------------------------------

const RELAY: &str = "127.0.0.1:5000";

/// What the relay holds for one receiver (its `Rtc`, key slot and SRTP
/// context), and the client at the other end.
struct Pair {
    relay: Box<Rtc>,
    keys: KeySlot,
    srtp: Option<SrtpTx>,
    ssrc: u32,
    pt: u8,
    seq: u16,
    connected: bool,
    client: Rtc,
    client_addr: SocketAddr,
    client_rtp: u64,
}

fn receive(rtc: &mut Rtc, now: Instant, from: SocketAddr, to: SocketAddr, data: &[u8]) {
    let Ok(contents) = data.try_into() else {
        return;
    };
    let input = Input::Receive(
        now,
        Receive {
            proto: Protocol::Udp,
            source: from,
            destination: to,
            contents,
        },
    );
    let _ = rtc.handle_input(input);
}

impl Pair {
    fn new(i: usize, cert: &str0m::config::DtlsCert, now: Instant) -> Pair {
        let relay_addr: SocketAddr = RELAY.parse().expect("constant address");
        let client_addr = SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16));
        let (mut relay, keys, offer, pending, mid) = as_relay(|| {
            let (mut rtc, keys) = receiver_rtc(cert, &host_candidates(&[relay_addr], &[]));
            let mut api = rtc.sdp_api();
            let mid = api.add_media(
                MediaKind::Audio,
                Direction::SendOnly,
                Some("stream".into()),
                None,
                None,
            );
            let (offer, pending) = api.apply().expect("an offer");
            // Signalling sends it as text; the client parses it.
            let offer = offer.to_sdp_string();
            (Box::new(rtc), keys, offer, pending, mid)
        });
        let mut client = Rtc::builder()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .build(now);
        client.add_local_candidate(Candidate::host(client_addr, "udp").expect("host candidate"));
        let offer = SdpOffer::from_sdp_string(&offer).expect("our offer parses");
        let answer = client
            .sdp_api()
            .accept_offer(offer)
            .expect("client answers")
            .to_sdp_string();
        let (ssrc, pt) = as_relay(|| {
            let answer = SdpAnswer::from_sdp_string(&answer).expect("answer parses");
            relay
                .sdp_api()
                .accept_answer(pending, answer)
                .expect("answer accepted");
            leg_ids(&mut relay, mid)
        });
        Pair {
            relay,
            keys,
            srtp: None,
            ssrc,
            pt,
            seq: 0xff00,
            connected: false,
            client,
            client_addr,
            client_rtp: 0,
        }
    }

    /// Hands every datagram each side has across, until both are quiet.
    fn exchange(&mut self, now: Instant) {
        let relay_addr: SocketAddr = RELAY.parse().expect("constant address");
        for _ in 0..100 {
            let to_client = as_relay(|| {
                let mut out: Vec<Vec<u8>> = Vec::new();
                while let Ok(o) = self.relay.poll_output() {
                    match o {
                        Output::Timeout(_) => break,
                        Output::Transmit(t) => out.push(t.contents.into()),
                        Output::Event(Event::Connected) => self.connected = true,
                        Output::Event(_) => {}
                    }
                }
                out
            });
            let quiet = to_client.is_empty();
            for data in to_client {
                receive(&mut self.client, now, relay_addr, self.client_addr, &data);
            }
            let mut to_relay = Vec::new();
            while let Ok(o) = self.client.poll_output() {
                match o {
                    Output::Timeout(_) => break,
                    Output::Transmit(t) => to_relay.push(t.contents.to_vec()),
                    Output::Event(Event::RtpPacket(_)) => self.client_rtp += 1,
                    Output::Event(_) => {}
                }
            }
            if quiet && to_relay.is_empty() {
                return;
            }
            as_relay(|| {
                for data in &to_relay {
                    receive(&mut self.relay, now, self.client_addr, relay_addr, data);
                }
            });
        }
    }

    fn tick(&mut self, now: Instant) {
        as_relay(|| {
            let _ = self.relay.handle_input(Input::Timeout(now));
        });
        let _ = self.client.handle_input(Input::Timeout(now));
        self.exchange(now);
    }

    /// One forwarded packet, as the relay's forward path makes it: its own
    /// RTP header and SRTP protect, str0m not involved.
    fn forward(&mut self, k: u32, now: Instant) {
        let datagram = as_relay(|| {
            if self.srtp.is_none() {
                self.srtp = self
                    .keys
                    .get()
                    .and_then(|keys| SrtpTx::new(keys, &tapped_provider()));
            }
            let tx = self.srtp.as_mut()?;
            let seq = self.seq;
            self.seq = self.seq.wrapping_add(1);
            let mut header = [0u8; 12];
            header[0] = 0x80;
            header[1] = self.pt & 0x7f;
            header[2..4].copy_from_slice(&seq.to_be_bytes());
            header[4..8].copy_from_slice(&(k * 960).to_be_bytes());
            header[8..12].copy_from_slice(&self.ssrc.to_be_bytes());
            // The index of a sequence that starts at 0xff00 and counts up by one.
            let index = 0xff00 + u64::from(k);
            tx.protect(&header, &[0x5a; 80], self.ssrc, index).ok()
        });
        if let Some(d) = datagram {
            let relay_addr: SocketAddr = RELAY.parse().expect("constant address");
            receive(&mut self.client, now, relay_addr, self.client_addr, &d);
        }
    }
}

/// The SSRC and Opus payload type of the relay's send stream on `mid`.
fn leg_ids(rtc: &mut Rtc, mid: Mid) -> (u32, u8) {
    let pt = negotiated_opus_pt(rtc, mid).map_or(111, |p| *p);
    let ssrc = rtc
        .direct_api()
        .stream_tx_by_mid(mid, None)
        .map_or(0, |tx| *tx.ssrc());
    (ssrc, pt)
}

// ---- The run -----------------------------------------------------------------

struct Row {
    phase: &'static str,
    relay_bytes: f64,
    relay_blocks: f64,
    client_bytes: f64,
}

fn row(phase: &'static str, base: (isize, isize), client_base: isize, n: usize) -> Row {
    let (bytes, blocks) = live(Side::Relay);
    let (cbytes, _) = live(Side::Client);
    Row {
        phase,
        relay_bytes: (bytes - base.0) as f64 / n as f64,
        relay_blocks: (blocks - base.1) as f64 / n as f64,
        client_bytes: (cbytes - client_base) as f64 / n as f64,
    }
}

fn main() {
    let args = Args::parse();
    let n = args.receivers.max(1);
    let cert = as_relay(|| {
        let _ = tapped_provider();
        str0m::crypto::from_feature_flags()
            .dtls_provider
            .generate_certificate()
            .expect("a DTLS certificate")
    });
    let base = live(Side::Relay);
    let client_base = live(Side::Client).0;
    let mut now = Instant::now();
    let mut rows = Vec::new();

    let mut pairs: Vec<Pair> = (0..n).map(|i| Pair::new(i, &cert, now)).collect();
    rows.push(row(
        "negotiated (offer/answer applied)",
        base,
        client_base,
        n,
    ));

    for _ in 0..1000 {
        now += Duration::from_millis(10);
        for p in pairs.iter_mut() {
            p.tick(now);
        }
        if pairs.iter().all(|p| p.connected && p.keys.get().is_some()) {
            break;
        }
    }
    let connected = pairs.iter().filter(|p| p.connected).count();
    rows.push(row(
        "connected (ICE + DTLS, keys tapped)",
        base,
        client_base,
        n,
    ));

    let packets = args.seconds * 50;
    for k in 0..packets as u32 {
        now += Duration::from_millis(20);
        for p in pairs.iter_mut() {
            p.forward(k, now);
            p.tick(now);
        }
    }
    let got: u64 = pairs.iter().map(|p| p.client_rtp).sum();
    rows.push(row(
        "after forwarding (RTCP both ways)",
        base,
        client_base,
        n,
    ));

    let sizes = relay_histogram();
    if args.leak {
        let relays: Vec<Box<Rtc>> = pairs.into_iter().map(|p| p.relay).collect();
        std::mem::forget(relays);
    } else {
        for p in pairs.iter_mut() {
            as_relay(|| {
                let _ = p.relay.close();
            });
            p.exchange(now);
        }
        rows.push(row(
            "closed (BYE + close_notify flushed)",
            base,
            client_base,
            n,
        ));
        drop(pairs);
        rows.push(row("freed", base, client_base, n));
    }

    println!(
        "receivers: {n}, connected: {connected}, forwarded {} s: client decrypted {got} of {} packets",
        args.seconds,
        packets * n as u64
    );
    println!("| phase | relay bytes per receiver | relay blocks per receiver | client bytes per client |");
    println!("|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.1} | {:.0} |",
            r.phase, r.relay_bytes, r.relay_blocks, r.client_bytes
        );
    }
    println!("\nrelay's live blocks by size, after forwarding (per receiver):");
    println!("| block size | blocks | bytes |");
    println!("|---|---|---|");
    for (k, blocks, bytes) in sizes {
        let lo = if k == 0 { 0 } else { (1usize << (k - 1)) + 1 };
        println!(
            "| {lo}..={} | {:.1} | {:.0} |",
            1usize << k,
            blocks as f64 / n as f64,
            bytes as f64 / n as f64
        );
    }
}

/// The relay side's live blocks by size class: (class, blocks, bytes).
fn relay_histogram() -> Vec<(usize, isize, isize)> {
    (0..BUCKETS)
        .map(|k| {
            (
                k,
                TALLY.relay_by_size[k].load(Ordering::Relaxed),
                TALLY.relay_bytes_by_size[k].load(Ordering::Relaxed),
            )
        })
        .filter(|(_, blocks, _)| *blocks > 0)
        .collect()
}
