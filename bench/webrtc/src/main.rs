//! voice-relay-bench: a load generator for the voice relay.
//!
//! It starts S WebRTC senders that stream real Opus at 20 ms pacing, then
//! ramps WebRTC receivers in steps (cumulative: each step adds receivers to
//! the ones already joined), and for every step measures join rate and
//! handshake times, then per-receiver loss, gaps and latency over a window,
//! beside the server's CPU and memory and the generator's own CPU. It talks
//! only to 127.0.0.1.

#![recursion_limit = "256"]

mod client;
mod histogram;
mod link;
mod media;
mod mp3_listener;
mod procstat;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::JoinSet;

use client::{Ctx, Joined, SenderInfo};
use media::{Cmd, RecvResult, WorkerHandle};

/// Load generator for the voice relay (WebRTC senders and receivers over loopback).
#[derive(Parser, Debug, Clone)]
#[command(name = "voice-relay-bench", version, about)]
struct Args {
    /// Server to test (HTTP/WS on TCP PORT, media on UDP PORT). Only
    /// 127.0.0.1 is accepted.
    #[arg(long, conflicts_with = "spawn")]
    server: Option<SocketAddr>,

    /// Senders stream to this server instead (127.0.0.1 only): an origin
    /// that pushes its streams to the server under test (`--whip-push`), so
    /// that receivers measure the edge of an origin → edge hop.
    #[arg(long)]
    sender_server: Option<SocketAddr>,

    /// Start this voice-relay binary on a free 127.0.0.1 port, and stop it at the end.
    #[arg(long)]
    spawn: Option<PathBuf>,

    /// Where the spawned server's log goes.
    #[arg(long, default_value = "/tmp/voice-relay-bench-server.log")]
    server_log: PathBuf,

    /// PID of the server (for CPU/RSS) when it was not spawned by us.
    #[arg(long)]
    server_pid: Option<u32>,

    /// Total receivers after each step (cumulative).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "100,250,500,1000,1500,2000,2500"
    )]
    steps: Vec<usize>,

    /// Number of streams (one sender each); receivers are spread round-robin.
    #[arg(long, default_value_t = 1)]
    streams: usize,

    /// Receivers per stream: one step of streams × this many (overrides --steps).
    #[arg(long)]
    receivers_per_stream: Option<usize>,

    /// Length of the measurement window of each step.
    #[arg(long, default_value_t = 10)]
    measure_secs: u64,

    /// Pause between the end of a join phase and the window.
    #[arg(long, default_value_t = 2)]
    settle_secs: u64,

    /// Receivers joining at the same time.
    #[arg(long, default_value_t = 100)]
    join_concurrency: usize,

    /// One receiver's join (WS + offer/answer + ICE/DTLS) must finish within this.
    #[arg(long, default_value_t = 20)]
    join_timeout_secs: u64,

    /// A step's whole join phase must finish within this.
    #[arg(long, default_value_t = 120)]
    step_join_timeout_secs: u64,

    /// Sender handshakes (offer → answer) to sample, one after another, before the ramp.
    #[arg(long, default_value_t = 200)]
    handshake_samples: usize,

    /// Clients use source addresses 127.0.0.1 ..= 127.0.0.N, like clients on
    /// different hosts (the server limits WebSocket connections per address).
    #[arg(long, default_value_t = 50)]
    source_ips: u32,

    /// Extra argument for a spawned server (repeatable), e.g.
    /// --server-arg=--max-streams=200.
    #[arg(long, allow_hyphen_values = true)]
    server_arg: Vec<String>,

    /// Receivers hand only every Nth RTP packet to str0m (SRTP decrypt and
    /// payload check); the others are timed from their clear-text RTP header.
    /// 1 = every packet fully processed, like a real client.
    #[arg(long, default_value_t = 10)]
    verify_every: u64,

    /// Media threads for receivers (senders have their own thread).
    #[arg(long, default_value_t = 1)]
    workers: usize,

    /// Other processes share the machine's cores: before each window, wait
    /// (up to --quiet-wait-secs) until everything but the server and the
    /// generator uses at most this much CPU (% of one core).
    #[arg(long, default_value_t = 20.0)]
    max_other_cpu: f64,

    /// Longest wait for the machine to be quiet before a window (0 = never wait).
    #[arg(long, default_value_t = 90)]
    quiet_wait_secs: u64,

    /// Keep ramping after a step that is not clean.
    #[arg(long)]
    keep_going: bool,

    /// Plain HTTP MP3 listeners per stream (`/stream/{id}.mp3`, HTTP/1.0),
    /// connected after the senders and judged in every window.
    #[arg(long, default_value_t = 0)]
    mp3_listeners_per_stream: usize,

    /// The server's MP3 bitrate in kbit/s (a clean listener gets ≥ 90 % of it).
    #[arg(long, default_value_t = 128)]
    mp3_kbps: u32,

    /// The whole run stops by itself after this long.
    #[arg(long, default_value_t = 540)]
    max_run_secs: u64,

    /// Every Nth receiver connects over ICE-TCP (the relay's HTTP port)
    /// instead of UDP: 2 = half of them; 0 = none.
    #[arg(long, default_value_t = 0)]
    tcp_every: u64,
}

/// A server we started; stopped when dropped.
struct Spawned {
    child: Child,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own child process by its pid.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    for _ in 0..100 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port with both TCP and UDP free")
}

fn spawn_server(bin: &PathBuf, log: &PathBuf, extra: &[String]) -> Result<(Spawned, SocketAddr)> {
    let port = free_port()?;
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let log = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let child = Command::new(bin)
        .arg("--listen")
        .arg(addr.to_string())
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut spawned = Spawned { child };
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok((spawned, addr));
        }
        if let Ok(Some(st)) = spawned.child.try_wait() {
            bail!("the server exited at start: {st}");
        }
        if Instant::now() > until {
            bail!("the server did not listen on {addr} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A server-side latency percentile; beyond the last finite bucket it is
/// only known to be above it.
fn fmt_relay_ms(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        "> 2500".into()
    }
}

/// GET /health as JSON.
async fn health(addr: SocketAddr) -> Option<Value> {
    serde_json::from_str(&http_get(addr, "/health").await?).ok()
}

/// The body of `GET path` on the server (HTTP/1.0, 3 s at most).
async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let head = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        s.write_all(head.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        Some(text.split_once("\r\n\r\n")?.1.to_string())
    };
    tokio::time::timeout(Duration::from_secs(3), get)
        .await
        .ok()?
}

/// The server's forward-latency histogram, if it exposes one.
async fn relay_latency(addr: SocketAddr) -> Option<histogram::Buckets> {
    histogram::parse(&http_get(addr, "/metrics").await?)
}

/// A 440 Hz tone with a slow swell, 20 ms Opus frames at 32 kbit/s.
fn opus_packets(count: usize) -> Result<Vec<Arc<[u8]>>> {
    let mut enc = opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Voip)
        .map_err(|e| anyhow!("opus encoder: {e}"))?;
    enc.set_bitrate(opus::Bitrate::Bits(32_000))
        .map_err(|e| anyhow!("opus bitrate: {e}"))?;
    let two_pi = std::f32::consts::TAU;
    let mut out = Vec::with_capacity(count);
    for frame in 0..count {
        let pcm: Vec<i16> = (0..960)
            .map(|i| {
                let t = (frame * 960 + i) as f32 / 48_000.0;
                let swell = 0.55 + 0.45 * (two_pi * 0.5 * t).sin();
                (swell * 9000.0 * (two_pi * 440.0 * t).sin()) as i16
            })
            .collect();
        let pkt = enc
            .encode_vec(&pcm, 1275)
            .map_err(|e| anyhow!("opus encode: {e}"))?;
        out.push(Arc::from(pkt.into_boxed_slice()));
    }
    Ok(out)
}

fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted_us.len() - 1) as f64).round() as usize;
    sorted_us[i.min(sorted_us.len() - 1)] as f64 / 1000.0
}

fn durations_us(v: &[Duration]) -> Vec<u32> {
    let mut out: Vec<u32> = v
        .iter()
        .map(|d| d.as_micros().min(u32::MAX as u128) as u32)
        .collect();
    out.sort_unstable();
    out
}

/// Clean: ≥ 99.5 % of packets, no gap over 100 ms, latency p99 under 50 ms.
fn receiver_clean(r: &RecvResult) -> bool {
    if !r.alive || r.expected == 0 {
        return false;
    }
    let mut lat = r.lat_us.clone();
    lat.sort_unstable();
    r.got as f64 >= 0.995 * r.expected as f64
        && r.max_gap_ns <= 100_000_000
        && percentile_ms(&lat, 99.0) < 50.0
}

struct Step {
    joined_ok: usize,
    join_failed: usize,
    join_errors: Vec<String>,
    join_secs: f64,
    offer: Vec<Duration>,
    connect: Vec<Duration>,
    local: Vec<Duration>,
}

fn fmt_ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    media::epoch();
    let nofile = procstat::raise_nofile();
    eprintln!("open-file limit: {nofile}");

    if args.streams == 0 || args.workers == 0 || args.join_concurrency == 0 {
        bail!("--streams, --workers and --join-concurrency must be at least 1");
    }
    let (spawned, addr) = match (&args.spawn, args.server) {
        (Some(bin), _) => {
            let (s, a) = spawn_server(bin, &args.server_log, &args.server_arg)?;
            (Some(s), a)
        }
        (None, Some(a)) => {
            if a.ip() != IpAddr::V4(Ipv4Addr::LOCALHOST) {
                bail!("refusing --server {a}: only 127.0.0.1 may be load-tested");
            }
            (None, a)
        }
        (None, None) => bail!("give --spawn /path/to/voice-relay or --server 127.0.0.1:PORT"),
    };
    if let Some(a) = args.sender_server {
        if a.ip() != IpAddr::V4(Ipv4Addr::LOCALHOST) {
            bail!("refusing --sender-server {a}: only 127.0.0.1 may be used");
        }
    }
    let server_pid = spawned.as_ref().map(|s| s.child.id()).or(args.server_pid);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-signal")
        .enable_all()
        .build()?;
    let result = runtime.block_on(run(args, addr, server_pid));
    runtime.shutdown_timeout(Duration::from_secs(2));
    drop(spawned);
    result
}

async fn run(args: Args, addr: SocketAddr, server_pid: Option<u32>) -> Result<()> {
    let started = Instant::now();
    let run_deadline = started + Duration::from_secs(args.max_run_secs);
    let packets = Arc::new(opus_packets(250)?);
    let provider = str0m::crypto::from_feature_flags();
    let cert = provider
        .dtls_provider
        .generate_certificate()
        .ok_or_else(|| anyhow!("cannot generate a DTLS certificate"))?;

    let (sender_worker, sender_thread) =
        media::spawn_worker("bench-send".into(), packets.clone(), 1)?;
    let mut receiver_workers: Vec<WorkerHandle> = Vec::new();
    let mut threads = vec![sender_thread];
    for i in 0..args.workers {
        let (h, t) = media::spawn_worker(
            format!("bench-recv-{i}"),
            packets.clone(),
            args.verify_every,
        )?;
        receiver_workers.push(h);
        threads.push(t);
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut ctx = Ctx::new(
        addr,
        args.sender_server.unwrap_or(addr),
        args.source_ips,
        cert,
        sender_worker.clone(),
        receiver_workers.clone(),
        stop_rx,
    );
    ctx.tcp_every = args.tcp_every;
    let ctx = Arc::new(ctx);

    let outcome = tokio::select! {
        r = ramp(&args, addr, server_pid, ctx.clone(), run_deadline) => r,
        _ = tokio::time::sleep_until((run_deadline + Duration::from_secs(30)).into()) => {
            Err(anyhow!("the run went past its time limit; stopping"))
        }
    };

    // Leave politely: close the WebSockets (the server drops the legs), then the peers.
    let _ = stop_tx.send(true);
    tokio::time::sleep(Duration::from_millis(800)).await;
    for w in receiver_workers
        .iter()
        .chain(std::iter::once(&sender_worker))
    {
        w.send(Cmd::Shutdown);
    }
    let joined = tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(3), joined).await;
    eprintln!("run took {:.0} s", started.elapsed().as_secs_f64());
    outcome
}

async fn ramp(
    args: &Args,
    addr: SocketAddr,
    server_pid: Option<u32>,
    ctx: Arc<Ctx>,
    run_deadline: Instant,
) -> Result<()> {
    // 1. Sender handshake samples on an idle server.
    let mut hs = Vec::new();
    let mut hs_failed = 0usize;
    let hs_started = Instant::now();
    for _ in 0..args.handshake_samples {
        if Instant::now() + Duration::from_secs(60) > run_deadline {
            break;
        }
        match tokio::time::timeout(
            Duration::from_secs(10),
            client::sender_handshake_sample(&ctx),
        )
        .await
        {
            Ok(Ok(d)) => hs.push(d),
            Ok(Err(e)) => {
                hs_failed += 1;
                eprintln!("handshake sample failed: {e:#}");
            }
            Err(_) => hs_failed += 1,
        }
    }
    let hs_us = durations_us(&hs);
    let hs_p50 = percentile_ms(&hs_us, 50.0);
    let hs_p99 = percentile_ms(&hs_us, 99.0);
    eprintln!(
        "sender handshake offer→answer: n={} failed={} p50={} ms p99={} ms ({:.1} s)",
        hs.len(),
        hs_failed,
        fmt_ms(hs_p50),
        fmt_ms(hs_p99),
        hs_started.elapsed().as_secs_f64()
    );
    // Let the server reap the sample peers (it drops closed peers after a grace time).
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 2. The real senders.
    let mut senders: Vec<SenderInfo> = Vec::new();
    for i in 0..args.streams {
        let s = client::start_sender(ctx.clone(), i, Duration::from_secs(10))
            .await
            .with_context(|| format!("starting sender {i}"))?;
        senders.push(s);
    }
    eprintln!(
        "{} sender(s) streaming (first: {}); offer→answer under load of senders p50 {:.2} ms",
        senders.len(),
        senders[0].stream_id,
        senders[0].offer_to_answer.as_secs_f64() * 1000.0
    );
    // Pushed from an origin, a stream reaches the server a moment later.
    let listed = if args.sender_server.is_some() { 3 } else { 1 };
    tokio::time::sleep(Duration::from_secs(listed)).await;
    let mp3_listeners: Vec<_> = senders
        .iter()
        .flat_map(|s| {
            (0..args.mp3_listeners_per_stream).map(|_| mp3_listener::spawn(addr, &s.stream_id))
        })
        .collect();
    let rss_base = server_pid.and_then(procstat::rss_kb);

    let steps: Vec<usize> = match args.receivers_per_stream {
        Some(n) => vec![n * args.streams],
        None => args.steps.clone(),
    };
    let mut rows: Vec<Value> = Vec::new();
    let mut table: Vec<String> = Vec::new();
    let mut current = 0usize;
    let mut stop_reason = "last step done".to_string();
    let mut limit: Option<usize> = None;
    let mut last_clean: Option<usize> = None;
    let window_cost = Duration::from_secs(args.settle_secs + args.measure_secs + 2);

    for &target in &steps {
        if target <= current {
            continue;
        }
        let now = Instant::now();
        if now + window_cost + Duration::from_secs(15) > run_deadline {
            stop_reason = "time budget (--max-run-secs) spent".into();
            break;
        }
        // Join (on a quiet machine too: join rate and handshake times are CPU-bound).
        let pre_wait = wait_quiet(
            args.max_other_cpu,
            Duration::from_secs(args.quiet_wait_secs).min(
                run_deadline.saturating_duration_since(now + window_cost + Duration::from_secs(30)),
            ),
            server_pid,
        )
        .await;
        if pre_wait.as_secs() > 0 {
            eprintln!(
                "  waited {:.0} s for a quiet machine before joining",
                pre_wait.as_secs_f64()
            );
        }
        let now = Instant::now();
        let join_budget = Duration::from_secs(args.step_join_timeout_secs).min(
            run_deadline.saturating_duration_since(now + window_cost + Duration::from_secs(5)),
        );
        let step = join_step(args, &ctx, &senders, current, target, join_budget).await;
        current = target;
        eprintln!(
            "step {target}: joined {} failed {} in {:.1} s",
            step.joined_ok, step.join_failed, step.join_secs
        );
        for e in step.join_errors.iter().take(3) {
            eprintln!("  join error: {e}");
        }
        tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
        let quiet_budget = Duration::from_secs(args.quiet_wait_secs).min(
            run_deadline
                .saturating_duration_since(Instant::now() + window_cost + Duration::from_secs(5)),
        );
        let waited = wait_quiet(args.max_other_cpu, quiet_budget, server_pid).await;
        if waited.as_secs() > 0 {
            eprintln!(
                "  waited {:.0} s for other processes to quiet down",
                waited.as_secs_f64()
            );
        }

        // Measure.
        let k_start: Vec<u64> = senders
            .iter()
            .map(|s| s.clock.sent.load(std::sync::atomic::Ordering::Acquire) + 2)
            .collect();
        for s in &senders {
            s.clock
                .late_max_us
                .store(0, std::sync::atomic::Ordering::Relaxed);
        }
        for w in &ctx.receiver_workers {
            w.send(Cmd::Begin {
                k_start: k_start.clone(),
            });
        }
        let srv0 = server_pid.and_then(procstat::snap);
        let gen0 = procstat::snap(std::process::id());
        let sys0 = procstat::sys_snap();
        let hist0 = relay_latency(addr).await;
        mp3_listeners.iter().for_each(|l| l.begin());
        tokio::time::sleep(Duration::from_secs(args.measure_secs)).await;
        let (mp3_row, mp3_line) = mp3_listener::judge(
            &mp3_listeners,
            Duration::from_secs(args.measure_secs),
            args.mp3_kbps,
        );
        if !mp3_listeners.is_empty() {
            eprintln!("  {mp3_line}");
        }
        let hist1 = relay_latency(addr).await;
        let srv1 = server_pid.and_then(procstat::snap);
        let gen1 = procstat::snap(std::process::id());
        let sys1 = procstat::sys_snap();
        let k_end: Vec<u64> = senders
            .iter()
            .map(|s| s.clock.sent.load(std::sync::atomic::Ordering::Acquire))
            .collect();
        let rss = server_pid.and_then(procstat::rss_kb);
        let sender_late_ms = senders
            .iter()
            .map(|s| {
                s.clock
                    .late_max_us
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .max()
            .unwrap_or(0) as f64
            / 1000.0;
        // Packets sent just before the end may still be in flight.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut results: Vec<RecvResult> = Vec::new();
        for w in &ctx.receiver_workers {
            let (tx, rx) = oneshot::channel();
            w.send(Cmd::End {
                k_end: k_end.clone(),
                reply: tx,
            });
            if let Ok(Ok(mut r)) = tokio::time::timeout(Duration::from_secs(10), rx).await {
                results.append(&mut r);
            }
        }
        let server_health = health(addr).await;

        // Judge.
        let clean = results.iter().filter(|r| receiver_clean(r)).count();
        let mp3_clean = mp3_row["clean"].as_u64() == Some(mp3_listeners.len() as u64);
        let step_clean = clean == target && mp3_clean;
        let expected: u64 = results.iter().map(|r| r.expected).sum();
        let got: u64 = results.iter().map(|r| r.got).sum();
        let missing_receivers = target.saturating_sub(results.len());
        let expected_all = expected
            + missing_receivers as u64
                * k_end
                    .iter()
                    .zip(&k_start)
                    .map(|(e, s)| e.saturating_sub(*s))
                    .max()
                    .unwrap_or(0);
        let loss_pct = if expected_all > 0 {
            100.0 * (1.0 - got as f64 / expected_all as f64)
        } else {
            f64::NAN
        };
        let max_gap_ms = results.iter().map(|r| r.max_gap_ns).max().unwrap_or(0) as f64 / 1e6;
        let mut lat: Vec<u32> = results
            .iter()
            .flat_map(|r| r.lat_us.iter().copied())
            .collect();
        lat.sort_unstable();
        let (p50, p99, pmax) = (
            percentile_ms(&lat, 50.0),
            percentile_ms(&lat, 99.0),
            lat.last().map_or(f64::NAN, |v| *v as f64 / 1000.0),
        );
        let dups: u64 = results.iter().map(|r| r.duplicates).sum();
        let bad_pt: u64 = results.iter().map(|r| r.bad_pt).sum();
        let bad_payload: u64 = results.iter().map(|r| r.bad_payload).sum();
        let bad_ts: u64 = results.iter().map(|r| r.bad_ts).sum();
        let dead = results.iter().filter(|r| !r.alive).count();
        let join_rate = if step.join_secs > 0.0 {
            step.joined_ok as f64 / step.join_secs
        } else {
            f64::NAN
        };
        let offer_us = durations_us(&step.offer);
        let connect_us = durations_us(&step.connect);
        let local_us = durations_us(&step.local);
        let ice_disconnects: u64 = results.iter().map(|r| r.ice_disconnects).sum();
        let srv = match (&srv0, &srv1) {
            (Some(a), Some(b)) => Some(procstat::cpu_between(a, b)),
            _ => None,
        };
        let gen = match (&gen0, &gen1) {
            (Some(a), Some(b)) => Some(procstat::cpu_between(a, b)),
            _ => None,
        };
        let srv_groups: Vec<Value> = match (&srv0, &srv1) {
            (Some(a), Some(b)) => procstat::cpu_by_thread_group(a, b)
                .into_iter()
                .take(6)
                .map(|(name, pct, threads)| json!({"threads": name, "count": threads, "cpu_pct": pct}))
                .collect(),
            _ => Vec::new(),
        };
        let sys_pct = match (&sys0, &sys1) {
            (Some(a), Some(b)) => Some(procstat::sys_between(a, b)),
            _ => None,
        };
        // CPU used by everything else on the machine meanwhile (it shares our 2 cores).
        let other_pct = sys_pct.map(|s| {
            (s - srv.as_ref().map_or(0.0, |c| c.percent) - gen.as_ref().map_or(0.0, |c| c.percent))
                .max(0.0)
        });
        let mut worst: Vec<&RecvResult> = results.iter().collect();
        worst.sort_by(|a, b| {
            let fa = a.got as f64 / a.expected.max(1) as f64;
            let fb = b.got as f64 / b.expected.max(1) as f64;
            fa.partial_cmp(&fb)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(b.max_gap_ns.cmp(&a.max_gap_ns))
        });
        let worst: Vec<Value> = worst
            .iter()
            .take(5)
            .map(|r| {
                let mut l = r.lat_us.clone();
                l.sort_unstable();
                json!({"id": r.id, "stream": r.stream, "alive": r.alive, "got": r.got,
                       "expected": r.expected, "max_gap_ms": r.max_gap_ns as f64 / 1e6,
                       "latency_ms_p99": percentile_ms(&l, 99.0)})
            })
            .collect();
        let rss_mb = rss.map(|k| k as f64 / 1024.0);
        let rss_per_rx_kb = match (rss, rss_base) {
            (Some(now), Some(base)) if target > 0 => {
                Some((now as f64 - base as f64) / target as f64)
            }
            _ => None,
        };
        let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".to_string(), f);
        // The server's own histogram over the window (same packets, measured
        // inside the server: no loopback delivery, no generator in it).
        let relay_hist = match (&hist0, &hist1) {
            (Some(a), Some(b)) => Some(b.since(a)),
            _ => None,
        };
        let relay_pct = |p: f64| relay_hist.as_ref().and_then(|h| h.percentile_ms(p));
        let (relay_p50, relay_p99) = (relay_pct(50.0), relay_pct(99.0));
        table.push(format!(
            "| {target} | {} {clean}/{target} | {} | {} | {} | {} | {} | {} / {} | {} | {} / {} | {} / {} | {} | {} | {} | {} | {} | {} | {} |",
            if step_clean { "yes" } else { "NO" },
            fmt_ms(loss_pct),
            fmt_ms(max_gap_ms),
            fmt_ms(p50),
            fmt_ms(p99),
            fmt_ms(pmax),
            opt(relay_p50, &fmt_relay_ms),
            opt(relay_p99, &fmt_relay_ms),
            if join_rate.is_nan() { "-".into() } else { format!("{join_rate:.0}") },
            fmt_ms(percentile_ms(&offer_us, 50.0)),
            fmt_ms(percentile_ms(&offer_us, 99.0)),
            fmt_ms(percentile_ms(&connect_us, 50.0)),
            fmt_ms(percentile_ms(&connect_us, 99.0)),
            opt(srv.as_ref().map(|c| c.percent), &|v| format!("{v:.0}")),
            srv.as_ref().map_or("-".into(), |c| format!("{:.0} ({})", c.hottest_percent, c.hottest_thread)),
            opt(rss_mb, &|v| format!("{v:.0}")),
            opt(rss_per_rx_kb, &|v| format!("{v:.0}")),
            opt(gen.as_ref().map(|c| c.percent), &|v| format!("{v:.0}")),
            gen.as_ref().map_or("-".into(), |c| format!("{:.0} ({})", c.hottest_percent, c.hottest_thread)),
            opt(other_pct, &|v| if v > args.max_other_cpu { format!("{v:.0} (noisy)") } else { format!("{v:.0}") }),
        ));
        let row = json!({
            "receivers": target,
            "clean": step_clean,
            "clean_receivers": clean,
            "measured_receivers": results.len(),
            "dead_receivers": dead,
            "joined": step.joined_ok,
            "join_failed": step.join_failed,
            "join_errors": step.join_errors.iter().take(5).collect::<Vec<_>>(),
            "join_secs": step.join_secs,
            "join_rate_per_s": join_rate,
            "offer_ms_p50": percentile_ms(&offer_us, 50.0),
            "offer_ms_p99": percentile_ms(&offer_us, 99.0),
            "connect_ms_p50": percentile_ms(&connect_us, 50.0),
            "connect_ms_p99": percentile_ms(&connect_us, 99.0),
            "generator_answer_ms_p50": percentile_ms(&local_us, 50.0),
            "generator_answer_ms_p99": percentile_ms(&local_us, 99.0),
            "ice_disconnects": ice_disconnects,
            "packets_expected": expected_all,
            "packets_got": got,
            "loss_pct": loss_pct,
            "max_gap_ms": max_gap_ms,
            "latency_ms_p50": p50,
            "latency_ms_p99": p99,
            "latency_ms_max": pmax,
            "relay_latency_ms_p50": relay_p50,
            "relay_latency_ms_p99": relay_p99,
            "relay_latency_samples": relay_hist.as_ref().map(|h| h.count()),
            "duplicates": dups,
            "bad_payload_type": bad_pt,
            "bad_payload": bad_payload,
            "bad_rtp_timestamp": bad_ts,
            "sender_late_max_ms": sender_late_ms,
            "server_cpu_pct": srv.as_ref().map(|c| c.percent),
            "server_hottest_thread": srv.as_ref().map(|c| c.hottest_thread.clone()),
            "server_hottest_thread_pct": srv.as_ref().map(|c| c.hottest_percent),
            "server_cpu_by_thread": srv_groups,
            "server_rss_mb": rss_mb,
            "server_rss_per_receiver_kb": rss_per_rx_kb,
            "generator_cpu_pct": gen.as_ref().map(|c| c.percent),
            "generator_hottest_thread": gen.as_ref().map(|c| c.hottest_thread.clone()),
            "generator_hottest_thread_pct": gen.as_ref().map(|c| c.hottest_percent),
            "machine_cpu_pct": sys_pct,
            "quiet_wait_secs": waited.as_secs_f64(),
            "other_processes_cpu_pct": other_pct,
            "worst_receivers": worst,
            "mp3_listeners": mp3_row,
            "server_health": server_health,
            "ws_stream_ended": ctx.counters.stream_ended.load(std::sync::atomic::Ordering::Relaxed),
            "ws_server_errors": ctx.counters.server_errors.load(std::sync::atomic::Ordering::Relaxed),
            "ws_closed_by_server": ctx.counters.ws_closed_by_server.load(std::sync::atomic::Ordering::Relaxed),
        });
        eprintln!("{}", table.last().unwrap());
        eprintln!("  detail: {row}");
        rows.push(row);
        if step_clean {
            last_clean = Some(target);
        } else {
            limit.get_or_insert(target);
            if !args.keep_going {
                stop_reason = format!("step {target} not clean");
                break;
            }
        }
    }

    println!(
        "Sender handshake (webrtc_offer sent → webrtc_answer received, idle server): \
         n={} failed={} p50 {} ms, p99 {} ms",
        hs.len(),
        hs_failed,
        fmt_ms(hs_p50),
        fmt_ms(hs_p99)
    );
    println!(
        "Streams: {}; receivers kept across steps (cumulative); window {} s; \
         latency = sender send → receiver arrival on the generator's clock (upper bound of \
         what the server adds: includes loopback and the generator); server-side latency = \
         the server's histogram, sender packet's kernel receive timestamp → kernel took the copy",
        args.streams, args.measure_secs
    );
    println!();
    println!("| receivers | clean | loss % | max gap ms | latency p50 ms | latency p99 ms | latency max ms | server-side latency p50 / p99 ms | join rate /s | offer p50/p99 ms | connect p50/p99 ms | server CPU % of 1 core | server hottest thread % | server RSS MB | RSS per receiver KB | generator CPU % | generator hottest thread % | other processes CPU % |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for line in &table {
        println!("{line}");
    }
    println!();
    println!(
        "Stopped: {stop_reason}. Largest clean step: {}. First unclean step: {}.",
        last_clean.map_or("none".into(), |v| v.to_string()),
        limit.map_or("none".into(), |v| v.to_string())
    );
    let summary = json!({
        "bench": "voice-relay-bench",
        "server": addr.to_string(),
        "streams": args.streams,
        "measure_secs": args.measure_secs,
        "sender_handshake": {
            "samples": hs.len(),
            "failed": hs_failed,
            "p50_ms": hs_p50,
            "p99_ms": hs_p99,
        },
        "largest_clean_step": last_clean,
        "first_unclean_step": limit,
        "stop_reason": stop_reason,
        "steps": rows,
    });
    println!("{summary}");
    Ok(())
}

/// CPU used by every process but the server and the generator, % of one core, over `over`.
async fn other_cpu(server_pid: Option<u32>, over: Duration) -> Option<f64> {
    let (s0, p0, g0) = (
        procstat::sys_snap()?,
        server_pid.and_then(procstat::snap),
        procstat::snap(std::process::id())?,
    );
    tokio::time::sleep(over).await;
    let (s1, p1, g1) = (
        procstat::sys_snap()?,
        server_pid.and_then(procstat::snap),
        procstat::snap(std::process::id())?,
    );
    let srv = match (&p0, &p1) {
        (Some(a), Some(b)) => procstat::cpu_between(a, b).percent,
        _ => 0.0,
    };
    Some(procstat::sys_between(&s0, &s1) - srv - procstat::cpu_between(&g0, &g1).percent)
}

/// Waits until other processes leave the cores to us, at most `budget`.
async fn wait_quiet(max_other: f64, budget: Duration, server_pid: Option<u32>) -> Duration {
    let start = Instant::now();
    while start.elapsed() < budget {
        match other_cpu(server_pid, Duration::from_secs(1)).await {
            Some(o) if o > max_other => continue,
            _ => break,
        }
    }
    start.elapsed().saturating_sub(Duration::from_secs(1))
}

async fn join_step(
    args: &Args,
    ctx: &Arc<Ctx>,
    senders: &[SenderInfo],
    from: usize,
    to: usize,
    budget: Duration,
) -> Step {
    let sem = Arc::new(Semaphore::new(args.join_concurrency));
    let mut set: JoinSet<Result<Joined>> = JoinSet::new();
    let started = Instant::now();
    let per_join = Duration::from_secs(args.join_timeout_secs);
    for i in from..to {
        let s = &senders[i % senders.len()];
        let (ctx, clock, id, sem) = (
            ctx.clone(),
            s.clock.clone(),
            s.stream_id.clone(),
            sem.clone(),
        );
        set.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            client::join_receiver(ctx, clock, id, per_join).await
        });
    }
    let mut step = Step {
        joined_ok: 0,
        join_failed: 0,
        join_errors: Vec::new(),
        join_secs: 0.0,
        offer: Vec::new(),
        connect: Vec::new(),
        local: Vec::new(),
    };
    let deadline = tokio::time::Instant::now() + budget;
    let mut last_done = started;
    loop {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(Some(Ok(Ok(j)))) => {
                step.joined_ok += 1;
                step.offer.push(j.offer);
                step.connect.push(j.connect);
                step.local.push(j.local);
                last_done = Instant::now();
            }
            Ok(Some(Ok(Err(e)))) => {
                step.join_failed += 1;
                step.join_errors.push(format!("{e:#}"));
            }
            Ok(Some(Err(e))) => {
                step.join_failed += 1;
                step.join_errors.push(format!("join task: {e}"));
            }
            Ok(None) => break,
            Err(_) => {
                let left = set.len();
                set.abort_all();
                step.join_failed += left;
                step.join_errors.push(format!(
                    "{left} joins unfinished when the step's join budget ran out"
                ));
                break;
            }
        }
    }
    step.join_secs = last_done.duration_since(started).as_secs_f64();
    step
}
