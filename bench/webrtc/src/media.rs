//! Media workers: each is one OS thread that owns a set of client peers
//! (a str0m `Rtc` plus its own UDP socket on 127.0.0.1) and drives them with
//! one mio poll. Senders write paced Opus RTP; receivers record, per packet,
//! which sender packet it was (from the passed-through RTP timestamp) and when
//! it arrived.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token, Waker};
use str0m::media::Pt;
use str0m::net::Receive;
use str0m::rtp::{RtpWrite, SeqNo, Ssrc};
use str0m::{Event, IceConnectionState, Input, Output, Rtc};
use tokio::sync::oneshot;

use crate::link::{Link, Transport};

/// RTP clock ticks per 20 ms Opus frame.
pub const TICKS_PER_PACKET: u32 = 960;
/// Packet pacing.
pub const PACKET_INTERVAL: Duration = Duration::from_millis(20);
/// How many send times each stream remembers (4096 × 20 ms ≈ 82 s).
const RING: usize = 4096;

const WAKER: Token = Token(0);
/// str0m timers (STUN, RTCP, DTLS retransmits) may fire this much late.
const TIMER_GRANULARITY: Duration = Duration::from_millis(5);

/// Process-wide time origin, so instants can be stored in atomics.
pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

pub fn ns_since_epoch(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_nanos() as u64
}

/// What one sender has sent: packet number k carries RTP timestamp
/// `ts0 + k * 960`; its send time is kept in a ring for the receivers.
pub struct StreamClock {
    pub index: usize,
    pub ts0: u32,
    /// Packets sent so far (the next packet's k).
    pub sent: AtomicU64,
    /// Slot k % RING: (k + 1) of the packet stored there, and its send time.
    slot_k: Box<[AtomicU64]>,
    slot_ns: Box<[AtomicU64]>,
    /// Worst lateness of a send against its 20 ms schedule, in µs (reset per window).
    pub late_max_us: AtomicU64,
}

impl StreamClock {
    pub fn new(index: usize, ts0: u32) -> Self {
        let mk = || {
            (0..RING)
                .map(|_| AtomicU64::new(0))
                .collect::<Vec<_>>()
                .into_boxed_slice()
        };
        StreamClock {
            index,
            ts0,
            sent: AtomicU64::new(0),
            slot_k: mk(),
            slot_ns: mk(),
            late_max_us: AtomicU64::new(0),
        }
    }

    fn record_send(&self, k: u64, ns: u64) {
        let i = (k as usize) % RING;
        self.slot_ns[i].store(ns, Ordering::Relaxed);
        self.slot_k[i].store(k + 1, Ordering::Release);
        self.sent.store(k + 1, Ordering::Release);
    }

    fn send_ns(&self, k: u64) -> Option<u64> {
        let i = (k as usize) % RING;
        if self.slot_k[i].load(Ordering::Acquire) != k + 1 {
            return None;
        }
        Some(self.slot_ns[i].load(Ordering::Relaxed))
    }

    /// The packet number an RTP timestamp stands for.
    pub fn k_of(&self, ts: u32) -> Option<u64> {
        let d = ts.wrapping_sub(self.ts0);
        d.is_multiple_of(TICKS_PER_PACKET)
            .then_some(u64::from(d / TICKS_PER_PACKET))
    }
}

pub enum Role {
    Sender {
        clock: Arc<StreamClock>,
        ssrc: Ssrc,
        pt: Pt,
        seq0: u64,
    },
    Receiver {
        clock: Arc<StreamClock>,
        pt: Pt,
    },
}

/// A negotiated peer handed to a worker.
pub struct NewPeer {
    pub id: u64,
    pub rtc: Rtc,
    pub socket: Transport,
    pub role: Role,
    /// Told when ICE+DTLS completes (or the peer fails first).
    pub connected: oneshot::Sender<Result<Instant, String>>,
}

/// One receiver's view of a measurement window.
#[derive(Debug, Clone)]
pub struct RecvResult {
    pub id: u64,
    pub stream: usize,
    pub alive: bool,
    /// Times ICE went to disconnected since the peer was added.
    pub ice_disconnects: u64,
    pub expected: u64,
    pub got: u64,
    pub duplicates: u64,
    pub max_gap_ns: u64,
    /// Latency of every in-window packet, µs.
    pub lat_us: Vec<u32>,
    pub bad_pt: u64,
    pub bad_payload: u64,
    pub bad_ts: u64,
}

pub enum Cmd {
    Add(Box<NewPeer>),
    /// Start recording packets with k ≥ k_start[stream].
    Begin {
        k_start: Vec<u64>,
    },
    /// Stop recording; judge packets with k < k_end[stream].
    End {
        k_end: Vec<u64>,
        reply: oneshot::Sender<Vec<RecvResult>>,
    },
    /// Close every peer politely, then stop the thread.
    Shutdown,
}

#[derive(Clone)]
pub struct WorkerHandle {
    tx: Sender<Cmd>,
    waker: Arc<Waker>,
}

impl WorkerHandle {
    pub fn send(&self, cmd: Cmd) {
        if self.tx.send(cmd).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

pub fn spawn_worker(
    name: String,
    packets: Arc<Vec<Arc<[u8]>>>,
    verify_every: u64,
) -> std::io::Result<(WorkerHandle, std::thread::JoinHandle<()>)> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (tx, rx) = mpsc::channel();
    let worker = Worker {
        poll,
        cmds: rx,
        peers: Vec::new(),
        deadlines: Vec::new(),
        packets,
        verify_every: verify_every.max(1),
        next_timeout_min: Instant::now(),
        next_send_min: None,
        recording: None,
    };
    let join = std::thread::Builder::new()
        .name(name)
        .spawn(move || worker.run())?;
    Ok((WorkerHandle { tx, waker }, join))
}

struct SendState {
    clock: Arc<StreamClock>,
    ssrc: Ssrc,
    pt: Pt,
    seq0: u64,
    next_send: Option<Instant>,
    k: u64,
}

struct RecvState {
    rtp_seen: u64,
    clock: Arc<StreamClock>,
    pt: Pt,
    /// (k, arrival ns) of packets at or after the window start, in arrival order.
    recs: Vec<(u64, u64)>,
    bad_pt: u64,
    bad_payload: u64,
    bad_ts: u64,
}

enum Kind {
    Sender(SendState),
    Receiver(RecvState),
}

struct Peer {
    id: u64,
    rtc: Rtc,
    socket: Link,
    local: SocketAddr,
    next_timeout: Instant,
    connected_tx: Option<oneshot::Sender<Result<Instant, String>>>,
    dead: bool,
    ice_disconnects: u64,
    kind: Kind,
}

struct Worker {
    poll: Poll,
    cmds: Receiver<Cmd>,
    peers: Vec<Peer>,
    /// Next str0m timeout of each peer (same index as `peers`).
    deadlines: Vec<Instant>,
    packets: Arc<Vec<Arc<[u8]>>>,
    /// Give str0m every Nth RTP packet only (1 = all).
    verify_every: u64,
    next_timeout_min: Instant,
    next_send_min: Option<Instant>,
    /// Per-stream k_start while a window is open.
    recording: Option<Vec<u64>>,
}

impl Worker {
    fn run(mut self) {
        // Wake as close to the 20 ms send times as the kernel allows.
        // SAFETY: prctl on the calling thread with an integer argument.
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
        }
        let mut events = Events::with_capacity(1024);
        let mut buf = vec![0u8; 2048];
        let mut shutdown_at: Option<Instant> = None;
        let mut last_scan = Instant::now();
        loop {
            loop {
                match self.cmds.try_recv() {
                    Ok(Cmd::Add(p)) => self.add(*p),
                    Ok(Cmd::Begin { k_start }) => {
                        for p in &mut self.peers {
                            if let Kind::Receiver(r) = &mut p.kind {
                                r.recs.clear();
                                r.bad_pt = 0;
                                r.bad_payload = 0;
                                r.bad_ts = 0;
                            }
                        }
                        self.recording = Some(k_start);
                    }
                    Ok(Cmd::End { k_end, reply }) => {
                        let res = self.results(&k_end);
                        self.recording = None;
                        let _ = reply.send(res);
                    }
                    Ok(Cmd::Shutdown) | Err(TryRecvError::Disconnected) => {
                        if shutdown_at.is_none() {
                            shutdown_at = Some(Instant::now());
                            self.close_all();
                        }
                        break;
                    }
                    Err(TryRecvError::Empty) => break,
                }
            }
            if let Some(t) = shutdown_at {
                if t.elapsed() > Duration::from_millis(300) {
                    return;
                }
            }

            let now = Instant::now();
            if self.next_send_min.is_some_and(|t| t <= now) {
                self.send_due(now);
            }
            // Scanning every peer is O(n): do it at most every TIMER_GRANULARITY.
            if self.next_timeout_min.max(last_scan + TIMER_GRANULARITY) <= now {
                self.timeouts(now);
                last_scan = now;
            }

            let scan_at = self.next_timeout_min.max(last_scan + TIMER_GRANULARITY);
            let mut deadline = scan_at.min(now + Duration::from_millis(100));
            if let Some(t) = self.next_send_min {
                deadline = deadline.min(t);
            }
            let wait = deadline.saturating_duration_since(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() != ErrorKind::Interrupted {
                    eprintln!("worker poll failed: {e}");
                    return;
                }
            }
            for ev in events.iter() {
                if ev.token() == WAKER {
                    continue;
                }
                let idx = ev.token().0 - 1;
                self.read_peer(idx, &mut buf);
            }
        }
    }

    fn add(&mut self, p: NewPeer) {
        let idx = self.peers.len();
        let NewPeer {
            id,
            rtc,
            socket,
            role,
            connected,
        } = p;
        let local = match socket.local_addr() {
            Ok(a) => a,
            Err(e) => {
                let _ = connected.send(Err(format!("socket: {e}")));
                return;
            }
        };
        let socket = match Link::new(socket, self.poll.registry(), Token(idx + 1)) {
            Ok(s) => s,
            Err(e) => {
                let _ = connected.send(Err(format!("register: {e}")));
                return;
            }
        };
        let kind = match role {
            Role::Sender {
                clock,
                ssrc,
                pt,
                seq0,
            } => Kind::Sender(SendState {
                clock,
                ssrc,
                pt,
                seq0,
                next_send: None,
                k: 0,
            }),
            Role::Receiver { clock, pt } => Kind::Receiver(RecvState {
                rtp_seen: 0,
                clock,
                pt,
                recs: Vec::with_capacity(1024),
                bad_pt: 0,
                bad_payload: 0,
                bad_ts: 0,
            }),
        };
        self.peers.push(Peer {
            id,
            rtc,
            socket,
            local,
            next_timeout: Instant::now(),
            connected_tx: Some(connected),
            dead: false,
            ice_disconnects: 0,
            kind,
        });
        self.deadlines.push(Instant::now());
        self.next_timeout_min = Instant::now();
    }

    fn read_peer(&mut self, idx: usize, buf: &mut [u8]) {
        let Some(peer) = self.peers.get_mut(idx) else {
            return;
        };
        if peer.socket.flush().is_err() {
            kill(peer, "tcp write failed");
            return;
        }
        loop {
            if peer.dead {
                return;
            }
            let (n, source) = match peer.socket.recv(buf) {
                Ok(v) => v,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                    kill(peer, "tcp connection closed");
                    return;
                }
                // ICMP errors (e.g. the server went away) surface here.
                Err(_) => continue,
            };
            let arrival = Instant::now();
            // Light mode: time most RTP packets from their clear-text header
            // (SRTP leaves the header unencrypted) and give str0m only every
            // Nth one, plus everything that is not RTP.
            if self.verify_every > 1 && peer.connected_tx.is_none() {
                if let (Kind::Receiver(r), Some((pt, ts))) = (&mut peer.kind, rtp_header(&buf[..n]))
                {
                    r.rtp_seen += 1;
                    if r.rtp_seen % self.verify_every != 0 {
                        record_rtp(
                            r,
                            pt,
                            ts,
                            None,
                            arrival,
                            &self.packets,
                            self.recording.as_deref(),
                        );
                        continue;
                    }
                }
            }
            let Ok(contents) = buf[..n].try_into() else {
                continue;
            };
            let input = Input::Receive(
                arrival,
                Receive {
                    proto: peer.socket.proto(),
                    source,
                    destination: peer.local,
                    contents,
                },
            );
            if peer.rtc.handle_input(input).is_err() {
                kill(peer, "input error");
                return;
            }
            let t = drain(peer, &self.packets, self.recording.as_deref());
            self.deadlines[idx] = t;
            if t < self.next_timeout_min {
                self.next_timeout_min = t;
            }
            note_sender(peer, &mut self.next_send_min);
        }
    }

    fn timeouts(&mut self, now: Instant) {
        let mut min = now + Duration::from_secs(1);
        // The compact deadline list keeps this scan from touching every peer.
        for idx in 0..self.deadlines.len() {
            if self.deadlines[idx] <= now {
                let peer = &mut self.peers[idx];
                if peer.dead {
                    self.deadlines[idx] = far_future();
                    continue;
                }
                if peer.rtc.handle_input(Input::Timeout(now)).is_err() {
                    kill(peer, "timeout error");
                    self.deadlines[idx] = far_future();
                    continue;
                }
                self.deadlines[idx] = drain(peer, &self.packets, self.recording.as_deref());
                note_sender(peer, &mut self.next_send_min);
            }
            min = min.min(self.deadlines[idx]);
        }
        self.next_timeout_min = min;
    }

    fn send_due(&mut self, now: Instant) {
        let mut min: Option<Instant> = None;
        for (idx, peer) in self.peers.iter_mut().enumerate() {
            if peer.dead {
                continue;
            }
            let Kind::Sender(s) = &mut peer.kind else {
                continue;
            };
            let Some(mut next) = s.next_send else {
                continue;
            };
            let mut wrote = false;
            while next <= now {
                let t = Instant::now();
                let late = t.saturating_duration_since(next).as_micros() as u64;
                s.clock.late_max_us.fetch_max(late, Ordering::Relaxed);
                let k = s.k;
                let payload = self.packets[(k as usize) % self.packets.len()].clone();
                let ts = s
                    .clock
                    .ts0
                    .wrapping_add((k as u32).wrapping_mul(TICKS_PER_PACKET));
                s.clock.record_send(k, ns_since_epoch(t));
                let seq: SeqNo = (s.seq0 + k).into();
                if let Some(tx) = peer.rtc.direct_api().stream_tx(&s.ssrc) {
                    tx.write_rtp(RtpWrite::new(s.pt, seq, ts, t, payload).marker(k == 0));
                }
                s.k += 1;
                next += PACKET_INTERVAL;
                wrote = true;
                // Far behind (the thread stalled): resynchronise instead of bursting.
                if now.saturating_duration_since(next) > Duration::from_millis(200) {
                    next = now + PACKET_INTERVAL;
                }
            }
            s.next_send = Some(next);
            min = Some(min.map_or(next, |m: Instant| m.min(next)));
            if wrote {
                let t = drain(peer, &self.packets, None);
                self.deadlines[idx] = t;
                if t < self.next_timeout_min {
                    self.next_timeout_min = t;
                }
            }
        }
        self.next_send_min = min;
    }

    fn results(&mut self, k_end: &[u64]) -> Vec<RecvResult> {
        let k_start = self.recording.clone().unwrap_or_default();
        let mut out = Vec::new();
        for peer in &mut self.peers {
            let alive = !peer.dead && peer.connected_tx.is_none();
            let Kind::Receiver(r) = &mut peer.kind else {
                continue;
            };
            let stream = r.clock.index;
            let (ks, ke) = (
                k_start.get(stream).copied().unwrap_or(0),
                k_end.get(stream).copied().unwrap_or(0),
            );
            let expected = ke.saturating_sub(ks);
            let mut seen = vec![false; expected as usize];
            let mut got = 0;
            let mut duplicates = 0;
            let mut max_gap = 0u64;
            let mut last: Option<u64> = None;
            let mut lat_us = Vec::with_capacity(expected as usize);
            for &(k, ns) in &r.recs {
                if k < ks || k >= ke {
                    continue;
                }
                let i = (k - ks) as usize;
                if seen[i] {
                    duplicates += 1;
                    continue;
                }
                seen[i] = true;
                got += 1;
                if let Some(l) = last {
                    max_gap = max_gap.max(ns.saturating_sub(l));
                }
                last = Some(ns);
                if let Some(sent) = r.clock.send_ns(k) {
                    lat_us.push((ns.saturating_sub(sent) / 1000).min(u32::MAX as u64) as u32);
                }
            }
            if got < 2 {
                max_gap = expected * PACKET_INTERVAL.as_nanos() as u64;
            }
            out.push(RecvResult {
                id: peer.id,
                stream,
                alive,
                ice_disconnects: peer.ice_disconnects,
                expected,
                got,
                duplicates,
                max_gap_ns: max_gap,
                lat_us,
                bad_pt: r.bad_pt,
                bad_payload: r.bad_payload,
                bad_ts: r.bad_ts,
            });
            r.recs.clear();
        }
        out
    }

    fn close_all(&mut self) {
        for peer in &mut self.peers {
            if peer.dead {
                continue;
            }
            if peer.rtc.close().is_err() {
                peer.rtc.disconnect();
            }
            drain(peer, &self.packets, None);
            peer.dead = true;
        }
    }
}

/// Payload type and timestamp of an RTP (not RTCP) packet, read from its
/// header; RFC 7983 / RFC 5761 demultiplexing.
fn rtp_header(d: &[u8]) -> Option<(Pt, u32)> {
    if d.len() < 12 || !(128..=191).contains(&d[0]) {
        return None;
    }
    let pt = d[1] & 0x7f;
    if (64..=95).contains(&pt) {
        return None; // RTCP
    }
    Some((Pt::from(pt), u32::from_be_bytes([d[4], d[5], d[6], d[7]])))
}

/// One received RTP packet: checks, and its arrival if it is in the window.
fn record_rtp(
    r: &mut RecvState,
    pt: Pt,
    ts: u32,
    payload: Option<&[u8]>,
    arrival: Instant,
    packets: &[Arc<[u8]>],
    recording: Option<&[u64]>,
) {
    if pt != r.pt {
        r.bad_pt += 1;
    }
    let Some(k) = r.clock.k_of(ts) else {
        r.bad_ts += 1;
        return;
    };
    if let Some(p) = payload {
        if *packets[(k as usize) % packets.len()] != *p {
            r.bad_payload += 1;
        }
    }
    if let Some(starts) = recording {
        if k >= starts.get(r.clock.index).copied().unwrap_or(u64::MAX) {
            r.recs.push((k, ns_since_epoch(arrival)));
        }
    }
}

/// A sender that just connected has a first send time the worker must wake for.
fn note_sender(peer: &Peer, next_send_min: &mut Option<Instant>) {
    if let Kind::Sender(s) = &peer.kind {
        if let Some(n) = s.next_send {
            if peer.dead {
                return;
            }
            *next_send_min = Some(next_send_min.map_or(n, |m| m.min(n)));
        }
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

fn kill(peer: &mut Peer, why: &str) {
    peer.dead = true;
    peer.rtc.disconnect();
    if let Some(tx) = peer.connected_tx.take() {
        let _ = tx.send(Err(why.to_string()));
    }
}

/// Polls a peer until it has nothing more to say. Returns its next timeout.
fn drain(peer: &mut Peer, packets: &[Arc<[u8]>], recording: Option<&[u64]>) -> Instant {
    loop {
        if !peer.rtc.is_alive() {
            if !peer.dead {
                kill(peer, "peer closed");
            }
            peer.next_timeout = far_future();
            return peer.next_timeout;
        }
        match peer.rtc.poll_output() {
            Ok(Output::Timeout(t)) => {
                peer.next_timeout = t;
                return t;
            }
            Ok(Output::Transmit(t)) => {
                // Only ever talk to loopback.
                if t.destination.ip().is_loopback() {
                    peer.socket.send(t.destination, &t.contents);
                }
            }
            Ok(Output::Event(ev)) => match ev {
                Event::Connected => {
                    let now = Instant::now();
                    if let Some(tx) = peer.connected_tx.take() {
                        let _ = tx.send(Ok(now));
                    }
                    if let Kind::Sender(s) = &mut peer.kind {
                        s.next_send = Some(now);
                    }
                }
                // Like a browser, keep going: ICE may come back. A peer that
                // never connected fails here at once.
                Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                    peer.ice_disconnects += 1;
                    if peer.connected_tx.is_some() {
                        kill(peer, "ICE disconnected");
                    }
                }
                Event::RtpPacket(pkt) => {
                    if let Kind::Receiver(r) = &mut peer.kind {
                        record_rtp(
                            r,
                            pkt.header.payload_type,
                            pkt.header.timestamp,
                            Some(&pkt.payload),
                            pkt.timestamp,
                            packets,
                            recording,
                        );
                    }
                }
                _ => {}
            },
            Err(_) => {
                kill(peer, "poll error");
                peer.next_timeout = far_future();
                return peer.next_timeout;
            }
        }
    }
}
