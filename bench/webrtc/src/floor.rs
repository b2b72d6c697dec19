//! voice-relay-floor: the cost floor of forwarding one stream to many
//! receivers on this machine.
//!
//! One thread sends the same datagram every 20 ms to each of N UDP sockets on
//! 127.0.0.1 with bare `sendmmsg` (batches of 64, like the relay's outbox),
//! and another thread drains those sockets. No WebRTC, no SRTP, no routing:
//! what is left is the kernel's loopback path and the system calls. The
//! relay's CPU per forwarded copy (from `voice-relay-bench`) divided by the
//! sending thread's CPU per copy here is how far the relay is above the floor.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use mio::{Events, Interest, Poll, Token};
use socket2::SockAddr;

/// Datagrams per `sendmmsg` call (the relay's outbox uses the same).
const BATCH: usize = 64;
/// One Opus frame every 20 ms.
const PACKET_INTERVAL: Duration = Duration::from_millis(20);

/// Bare sendmmsg floor for the relay's fan-out (loopback only).
#[derive(Parser, Debug)]
#[command(name = "voice-relay-floor", version, about)]
struct Args {
    /// Receiving sockets for each run (each run starts afresh).
    #[arg(long, value_delimiter = ',', default_value = "1000,2000")]
    steps: Vec<usize>,

    /// Datagram size. 110 bytes is an SRTP packet of the bench's 32 kbit/s
    /// Opus sender: ~80 bytes of Opus, a 12-byte RTP header, header
    /// extensions and the 10-byte SRTP tag.
    #[arg(long, default_value_t = 110)]
    packet_bytes: usize,

    /// Warm-up before each measurement window.
    #[arg(long, default_value_t = 2)]
    settle_secs: u64,

    /// Length of each measurement window.
    #[arg(long, default_value_t = 10)]
    measure_secs: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    println!(
        "| receivers | copies/s | sending thread % of a core | µs per copy | % per 1,000 receivers | draining thread % | received / sent |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &n in &args.steps {
        let r = run(n, &args)?;
        println!(
            "| {n} | {:.0} | {:.1} | {:.2} | {:.1} | {:.1} | {} / {} |",
            r.copies_per_sec(),
            r.send_pct(),
            r.micros_per_copy(),
            r.send_pct() * 1000.0 / n as f64,
            r.drain_pct(),
            r.received,
            r.sent,
        );
    }
    Ok(())
}

/// What one window measured.
struct Outcome {
    window: Duration,
    sent: u64,
    received: u64,
    send_cpu: Duration,
    drain_cpu: Duration,
}

impl Outcome {
    fn copies_per_sec(&self) -> f64 {
        self.sent as f64 / self.window.as_secs_f64()
    }
    fn send_pct(&self) -> f64 {
        100.0 * self.send_cpu.as_secs_f64() / self.window.as_secs_f64()
    }
    fn drain_pct(&self) -> f64 {
        100.0 * self.drain_cpu.as_secs_f64() / self.window.as_secs_f64()
    }
    fn micros_per_copy(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        self.send_cpu.as_secs_f64() * 1e6 / self.sent as f64
    }
}

/// Shared between the two threads of one run.
#[derive(Default)]
struct Window {
    measuring: AtomicBool,
    done: AtomicBool,
    received: AtomicU64,
}

fn run(n: usize, args: &Args) -> Result<Outcome> {
    let receivers: Vec<UdpSocket> = (0..n)
        .map(|_| UdpSocket::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()
        .context("binding receiving sockets (raise `ulimit -n`?)")?;
    let targets: Vec<SockAddr> = receivers
        .iter()
        .map(|s| s.local_addr().map(SockAddr::from))
        .collect::<std::io::Result<_>>()?;
    if targets.iter().any(|a| !is_loopback(a)) {
        bail!("only loopback is used");
    }
    let window = Arc::new(Window::default());
    let drainer = {
        let window = window.clone();
        std::thread::Builder::new()
            .name("floor-drain".into())
            .spawn(move || drain(receivers, &window))?
    };
    let sender = UdpSocket::bind("127.0.0.1:0")?;
    socket2::SockRef::from(&sender).set_send_buffer_size(4 << 20)?;
    let packet = vec![0x80u8; args.packet_bytes];

    let settle = Duration::from_secs(args.settle_secs);
    let measure = Duration::from_secs(args.measure_secs);
    let start = Instant::now();
    let mut next = start;
    let mut sent = 0u64;
    let mut cpu_at_start = Duration::ZERO;
    let mut measured_from = None;
    while start.elapsed() < settle + measure {
        if measured_from.is_none() && start.elapsed() >= settle {
            window.measuring.store(true, Ordering::Relaxed);
            cpu_at_start = thread_cpu();
            measured_from = Some(Instant::now());
            sent = 0;
        }
        sent += send_round(&sender, &targets, &packet) as u64;
        next += PACKET_INTERVAL;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let send_cpu = thread_cpu().saturating_sub(cpu_at_start);
    let elapsed = measured_from.map(|t| t.elapsed()).unwrap_or_default();
    // Let the last datagrams arrive before the count is read.
    std::thread::sleep(Duration::from_millis(50));
    window.measuring.store(false, Ordering::Relaxed);
    window.done.store(true, Ordering::Relaxed);
    let drain_cpu = drainer
        .join()
        .map_err(|_| anyhow::anyhow!("draining thread panicked"))??;
    Ok(Outcome {
        window: elapsed,
        sent,
        received: window.received.load(Ordering::Relaxed),
        send_cpu,
        drain_cpu,
    })
}

fn is_loopback(a: &SockAddr) -> bool {
    a.as_socket()
        .map(|s: SocketAddr| s.ip().is_loopback())
        .unwrap_or(false)
}

/// One packet to every target; returns how many the kernel took.
fn send_round(sender: &UdpSocket, targets: &[SockAddr], packet: &[u8]) -> usize {
    targets
        .chunks(BATCH)
        .map(|chunk| send_batch(sender.as_raw_fd(), chunk, packet))
        .sum()
}

fn send_batch(fd: i32, targets: &[SockAddr], packet: &[u8]) -> usize {
    let n = targets.len().min(BATCH);
    // SAFETY: zeroed iovec / mmsghdr are valid empty values; every pointer
    // stored below points into `targets`, `packet` or `iovs`, which outlive
    // the call, with their true lengths. The kernel only reads the buffers.
    unsafe {
        let mut iovs: [libc::iovec; BATCH] = std::mem::zeroed();
        let mut msgs: [libc::mmsghdr; BATCH] = std::mem::zeroed();
        for (i, addr) in targets[..n].iter().enumerate() {
            iovs[i].iov_base = packet.as_ptr() as *mut libc::c_void;
            iovs[i].iov_len = packet.len();
            let hdr = &mut msgs[i].msg_hdr;
            hdr.msg_name = addr.as_ptr() as *mut libc::c_void;
            hdr.msg_namelen = addr.len();
            hdr.msg_iov = &mut iovs[i];
            hdr.msg_iovlen = 1;
        }
        let r = libc::sendmmsg(fd, msgs.as_mut_ptr(), n as _, libc::MSG_DONTWAIT as _);
        r.max(0) as usize
    }
}

/// Reads every socket until the run is done; returns this thread's CPU
/// during the measurement window.
fn drain(sockets: Vec<UdpSocket>, window: &Window) -> Result<Duration> {
    let mut poll = Poll::new()?;
    let mut sockets: Vec<mio::net::UdpSocket> = sockets
        .into_iter()
        .map(|s| {
            s.set_nonblocking(true)?;
            Ok(mio::net::UdpSocket::from_std(s))
        })
        .collect::<std::io::Result<_>>()?;
    for (i, s) in sockets.iter_mut().enumerate() {
        poll.registry().register(s, Token(i), Interest::READABLE)?;
    }
    let mut events = Events::with_capacity(1024);
    let mut buf = [0u8; 2048];
    let mut cpu = Duration::ZERO;
    let mut since: Option<Duration> = None;
    while !window.done.load(Ordering::Relaxed) {
        match (window.measuring.load(Ordering::Relaxed), since) {
            (true, None) => since = Some(thread_cpu()),
            (false, Some(t0)) => {
                cpu += thread_cpu().saturating_sub(t0);
                since = None;
            }
            _ => {}
        }
        poll.poll(&mut events, Some(Duration::from_millis(10)))?;
        let counting = window.measuring.load(Ordering::Relaxed);
        for ev in events.iter() {
            let Some(s) = sockets.get(ev.token().0) else {
                continue;
            };
            while s.recv(&mut buf).is_ok() {
                if counting {
                    window.received.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    if let Some(t0) = since {
        cpu += thread_cpu().saturating_sub(t0);
    }
    Ok(cpu)
}

/// CPU time of the calling thread (user + system).
fn thread_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct we pass; RUSAGE_THREAD is a
    // valid `who` on Linux.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
