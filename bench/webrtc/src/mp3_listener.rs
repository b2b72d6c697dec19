//! Plain HTTP MP3 listeners of the streams under test (`--mp3-listeners-per-stream`):
//! each reads `/stream/{id}.mp3` as an HTTP/1.0 client (a bare body) and
//! counts, during a measurement window, the bytes it got and the longest
//! pause between two reads. A listener is clean when it is still connected,
//! got at least 90 % of the stream's bitrate and never waited more than a
//! second.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest pause between two reads of a clean listener.
const MAX_CLEAN_GAP: Duration = Duration::from_secs(1);

/// What one listener saw; shared with its reading task.
pub struct Mp3Listener {
    base: Instant,
    measuring: AtomicBool,
    alive: AtomicBool,
    bytes: AtomicU64,
    last_read_ns: AtomicU64,
    max_gap_ns: AtomicU64,
}

impl Mp3Listener {
    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn on_read(&self, n: usize) {
        let now = self.now_ns();
        let last = self.last_read_ns.swap(now, Ordering::Relaxed);
        if self.measuring.load(Ordering::Relaxed) {
            self.bytes.fetch_add(n as u64, Ordering::Relaxed);
            self.max_gap_ns
                .fetch_max(now.saturating_sub(last), Ordering::Relaxed);
        }
    }

    /// Starts a window.
    pub fn begin(&self) {
        self.bytes.store(0, Ordering::Relaxed);
        self.max_gap_ns.store(0, Ordering::Relaxed);
        self.last_read_ns.store(self.now_ns(), Ordering::Relaxed);
        self.measuring.store(true, Ordering::Relaxed);
    }

    /// Ends a window: bytes got and the longest pause, counting the one
    /// still running.
    pub fn end(&self) -> (u64, Duration, bool) {
        self.measuring.store(false, Ordering::Relaxed);
        let open = self
            .now_ns()
            .saturating_sub(self.last_read_ns.load(Ordering::Relaxed));
        let gap = self.max_gap_ns.load(Ordering::Relaxed).max(open);
        (
            self.bytes.load(Ordering::Relaxed),
            Duration::from_nanos(gap),
            self.alive.load(Ordering::Relaxed),
        )
    }
}

/// Connects one listener to `stream_id` and keeps reading in the background.
pub fn spawn(addr: SocketAddr, stream_id: &str) -> Arc<Mp3Listener> {
    let l = Arc::new(Mp3Listener {
        base: Instant::now(),
        measuring: AtomicBool::new(false),
        alive: AtomicBool::new(true),
        bytes: AtomicU64::new(0),
        last_read_ns: AtomicU64::new(0),
        max_gap_ns: AtomicU64::new(0),
    });
    let task = l.clone();
    let request = format!("GET /stream/{stream_id}.mp3 HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    tokio::spawn(async move {
        if let Err(e) = read(addr, &request, &task).await {
            eprintln!("mp3 listener: {e}");
        }
        task.alive.store(false, Ordering::Relaxed);
    });
    l
}

async fn read(addr: SocketAddr, request: &str, l: &Mp3Listener) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(request.as_bytes()).await?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        l.on_read(n);
    }
}

/// Judges a window of all listeners: a JSON summary and a one-line report.
pub fn judge(listeners: &[Arc<Mp3Listener>], window: Duration, kbps: u32) -> (Value, String) {
    let need = 0.9 * f64::from(kbps) * 125.0 * window.as_secs_f64();
    let seen: Vec<(u64, Duration, bool)> = listeners.iter().map(|l| l.end()).collect();
    let clean = seen
        .iter()
        .filter(|(b, gap, alive)| *alive && *b as f64 >= need && *gap <= MAX_CLEAN_GAP)
        .count();
    let min_kbps = seen
        .iter()
        .map(|(b, _, _)| *b as f64 * 8.0 / 1000.0 / window.as_secs_f64())
        .fold(f64::INFINITY, f64::min);
    let max_gap_ms = seen
        .iter()
        .map(|(_, g, _)| g.as_secs_f64() * 1000.0)
        .fold(0.0, f64::max);
    let line = format!(
        "mp3 listeners: clean {clean}/{}; lowest rate {min_kbps:.1} kbit/s; longest pause {max_gap_ms:.0} ms",
        listeners.len()
    );
    let v = json!({"listeners": listeners.len(), "clean": clean,
                   "min_kbps": min_kbps, "max_gap_ms": max_gap_ms});
    (v, line)
}
