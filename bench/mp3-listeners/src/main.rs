#![recursion_limit = "256"]
//! mp3-listeners-bench: how many concurrent live-MP3 (or Ogg/Opus) listeners
//! can a voice-relay server feed in real time?
//!
//! For each step N it opens N plain HTTP/1.1 connections to one MP3 (or Ogg)
//! URL on 127.0.0.1 (one epoll thread, tiny per-connection state), parses
//! every MP3 frame header (or Ogg page header) of every body, lets them run
//! for a measurement window and
//! reports connect rate, real-time ratio, gaps, broken streams, time to first
//! byte/frame, and the server's and its own CPU and memory.

mod ffmpeg;
mod http;
mod listeners;
mod media;
mod mp3;
mod ogg;
mod procstat;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use serde_json::{json, Value};

use listeners::{Conn, End, Pool};
use media::Format;
use procstat::CpuMark;

/// Most listeners a step may open.
const MAX_LISTENERS: usize = 30_000;
/// Most steps in one run.
const MAX_STEPS: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Close every listener after each step; each step connects N anew.
    Fresh,
    /// Keep the listeners and add only the difference for the next step.
    Grow,
}

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Load benchmark for voice-relay's live MP3 and Ogg/Opus fan-out (127.0.0.1 only)"
)]
struct Args {
    /// Stream URL, e.g. http://127.0.0.1:8080/stream/latest.mp3 (127.0.0.1/localhost
    /// only); its path ends in the format's extension (.mp3, .ogg).
    #[arg(long)]
    url: String,
    /// What the listeners parse: MP3 frames, or Ogg/Opus pages.
    #[arg(long, value_enum, default_value_t = Format::Mp3)]
    format: Format,
    /// PID of the server, for its CPU, RSS, threads and fd limit.
    #[arg(long)]
    server_pid: Option<i32>,
    /// PID of the stream's sender (e.g. sender.py), to report its CPU too.
    #[arg(long)]
    sender_pid: Option<i32>,
    /// Listener counts, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    steps: Vec<usize>,
    /// Length of each step's measurement window.
    #[arg(long, default_value_t = 20.0)]
    measure_secs: f64,
    /// Pause between "all connected" and the window.
    #[arg(long, default_value_t = 2.0)]
    settle_secs: f64,
    /// Give up on connections not answered within this time of a step's start.
    #[arg(long, default_value_t = 60.0)]
    connect_timeout_secs: f64,
    /// Most connections connecting or waiting for their response head at once.
    #[arg(long, default_value_t = 100)]
    max_inflight: usize,
    #[arg(long, value_enum, default_value_t = Mode::Fresh)]
    mode: Mode,
    /// ffmpeg time-to-first-audio samples: this many before the first step
    /// (idle server) and during each step's window (under load); 0 = none.
    #[arg(long, default_value_t = 0)]
    ffmpeg_samples: usize,
    /// Skip the remaining steps once the run has lasted this long.
    #[arg(long, default_value_t = 540.0)]
    max_run_secs: f64,
    /// Raise the server's open-file limit with prlimit(2) when it is too low
    /// for the largest step (needs root or CAP_SYS_RESOURCE).
    #[arg(long)]
    raise_server_nofile: bool,
    /// Before each step, wait up to this long for other processes on the
    /// (shared) machine to use < 20 % of one core.
    #[arg(long, default_value_t = 0.0)]
    quiet_wait_secs: f64,
    /// Real-time ratio a clean listener reaches in the window.
    #[arg(long, default_value_t = 0.99)]
    clean_ratio: f64,
    /// The URL is not voice-relay's (e.g. an Icecast mount fed by its push):
    /// do not ask the URL's server for /health (no live-stream check, no
    /// server listener count, a fixed pause after closing a step's listeners).
    #[arg(long)]
    no_health: bool,
    /// The server starts each listener at any byte, not at a frame (Icecast):
    /// the bytes before the first frame are skipped, not counted as broken.
    #[arg(long)]
    unsynced_start: bool,
    /// Largest gap between reads a clean listener has in the window.
    #[arg(long, default_value_t = 500.0)]
    clean_gap_ms: f64,
}

struct Target {
    port: u16,
    host_port: String,
    path: String,
}

/// Accepts only http://127.0.0.1[:port]/path or http://localhost[:port]/path.
fn parse_url(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only plain http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("{url}: bad port {p:?}"))?,
        ),
        None => (authority, 80),
    };
    if host != "127.0.0.1" && host != "localhost" {
        return Err(format!(
            "refusing host {host:?}: this tool only connects to 127.0.0.1"
        ));
    }
    if port == 0 || path.contains(['\r', '\n', ' ']) {
        return Err(format!("{url}: bad port or path"));
    }
    Ok(Target {
        port,
        host_port: format!("127.0.0.1:{port}"),
        path: path.to_owned(),
    })
}

/// GET a small JSON document from the server (blocking, 5 s timeouts).
fn get_json(port: u16, path: &str) -> Option<Value> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.take(1 << 20).read_to_end(&mut raw).ok()?;
    let end = http::head_end(&raw)?;
    let head = http::parse_head(&raw[..end])?;
    let mut body = Vec::new();
    if head.chunked {
        let mut dec = http::Chunked::default();
        dec.feed(&raw[end..], |ev| {
            if let http::Ev::Data(d) = ev {
                body.extend_from_slice(d)
            }
        });
    } else {
        body.extend_from_slice(&raw[end..]);
    }
    serde_json::from_slice(&body).ok()
}

/// Sum of /health's listener counts of one format (`mp3_listeners`,
/// `ogg_listeners`).
fn health_listeners(h: &Value, format: Format) -> Option<u64> {
    Some(
        h.get(format.health_key())?
            .as_object()?
            .values()
            .filter_map(Value::as_u64)
            .sum(),
    )
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i.min(v.len() - 1)]
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn r1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn jnum(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

fn end_name(e: End) -> String {
    match e {
        End::None => "running".into(),
        End::Connect(errno) => format!("connect:{}", std::io::Error::from_raw_os_error(errno)),
        End::Timeout => "timeout".into(),
        End::Status(s) => format!("status:{s}"),
        End::BadHead => "bad_head".into(),
        End::Eof => "eof".into(),
        End::LastChunk => "body_end".into(),
        End::Read(errno) => format!("read:{}", std::io::Error::from_raw_os_error(errno)),
        End::Framing => "chunk_framing".into(),
        End::Closed => "closed".into(),
    }
}

fn ffmpeg_summary(samples: &[ffmpeg::Sample]) -> Value {
    let pick = |f: fn(&ffmpeg::Sample) -> Option<f64>| -> Value {
        let mut v: Vec<f64> = samples.iter().filter_map(f).map(|s| s * 1000.0).collect();
        if v.is_empty() {
            return Value::Null;
        }
        let n = v.len();
        let min = pct(&mut v, 0.0);
        let med = pct(&mut v, 0.5);
        json!({"n": n, "min_ms": r1(min), "median_ms": r1(med), "all_ms": v.iter().map(|x| r1(*x)).collect::<Vec<_>>()})
    };
    json!({
        "samples": samples.len(),
        "ok": samples.iter().filter(|s| s.exit_ok).count(),
        "first_packet": pick(|s| s.first_packet),
        "first_decoded": pick(|s| s.first_decoded),
        "first_pcm": pick(|s| s.first_pcm),
    })
}

fn ffmpeg_cell(v: &Value) -> String {
    match (
        v.pointer("/first_decoded/min_ms").and_then(Value::as_f64),
        v.pointer("/first_decoded/median_ms")
            .and_then(Value::as_f64),
    ) {
        (Some(a), Some(b)) => format!("{a:.0} / {b:.0}"),
        _ => "–".into(),
    }
}

/// Runs the pool until `until`, or until `stop()` is true.
fn run_until(pool: &mut Pool, until: Instant, mut stop: impl FnMut(&Pool) -> bool) {
    while Instant::now() < until && !stop(pool) {
        let left = until.saturating_duration_since(Instant::now());
        pool.poll(left.as_millis().clamp(1, 50) as i32);
    }
}

struct Baseline {
    rss_kb: Option<u64>,
    value: Value,
}

fn server_snapshot(pid: Option<i32>) -> Value {
    let Some(pid) = pid else { return Value::Null };
    let p = pid.to_string();
    json!({
        "rss_kb": procstat::status_field(&p, "VmRSS"),
        "hwm_kb": procstat::status_field(&p, "VmHWM"),
        "threads": procstat::status_field(&p, "Threads"),
        "fds": procstat::fd_count(&p),
    })
}

fn cpu_json(c: &procstat::CpuPct) -> Value {
    json!({
        "server": c.server.map(r1),
        "sender": c.sender.map(r1),
        "tool": r1(c.own),
        "machine_busy": c.machine_busy.map(r1),
        "machine_softirq": c.machine_softirq.map(r1),
        "others": c.others().map(r1),
        "cores": procstat::cores(),
        "server_threads": c.server_threads.iter().map(|(n, p)| json!([n, r1(*p)])).collect::<Vec<_>>(),
    })
}

fn counter_delta(a: &[(String, u64)], b: &[(String, u64)]) -> Value {
    let mut m = serde_json::Map::new();
    for (k, v) in b {
        let before = a.iter().find(|x| &x.0 == k).map_or(0, |x| x.1);
        m.insert(k.clone(), json!(v.saturating_sub(before)));
    }
    Value::Object(m)
}

fn main() {
    let args = Args::parse();
    std::process::exit(match run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mp3-listeners-bench: {e}");
            2
        }
    });
}

fn run(args: Args) -> Result<(), String> {
    let run_start = Instant::now();
    let target = parse_url(&args.url)?;
    if args.unsynced_start {
        mp3::allow_unsynced_start();
    }
    let format = args.format;
    if !target.path.ends_with(format.extension()) {
        return Err(format!(
            "{}: --format {format:?} wants a path ending in {}",
            args.url,
            format.extension()
        ));
    }
    if args.steps.is_empty() || args.steps.len() > MAX_STEPS {
        return Err(format!("give 1..={MAX_STEPS} steps"));
    }
    if let Some(&n) = args.steps.iter().find(|&&n| n == 0 || n > MAX_LISTENERS) {
        return Err(format!("step {n}: each step must be 1..={MAX_LISTENERS}"));
    }
    if args.mode == Mode::Grow && args.steps.windows(2).any(|w| w[1] < w[0]) {
        return Err("--mode grow needs increasing steps".into());
    }
    if !(1.0..=300.0).contains(&args.measure_secs) {
        return Err("--measure-secs must be 1..=300".into());
    }
    let settle = args.settle_secs.clamp(0.0, 60.0);
    let connect_timeout = args.connect_timeout_secs.clamp(1.0, 300.0);
    let max_inflight = args.max_inflight.clamp(1, 10_000);
    let ffmpeg_n = args.ffmpeg_samples.min(20);
    let max_run = args.max_run_secs.clamp(10.0, 3600.0);
    let max_n = *args.steps.iter().max().unwrap_or(&1);

    // fds: ours.
    let want_fds = max_n as u64 + 256;
    let (soft, hard, note) = procstat::raise_nofile(want_fds);
    eprintln!("open-file limit: soft={soft} hard={hard} ({note})");
    if soft < want_fds {
        eprintln!("warning: soft limit {soft} < {want_fds}: the largest step will hit EMFILE");
    }
    // fds: the server's.
    let mut server_nofile = Value::Null;
    if let Some(pid) = args.server_pid {
        if procstat::proc_cpu_secs(pid).is_none() {
            return Err(format!("no process {pid}"));
        }
        if let Some((s, h)) = procstat::nofile_limits(pid) {
            let mut raised = Value::Null;
            let need = max_n as u64 + 128;
            if s < need {
                if args.raise_server_nofile {
                    let to = need.max(h.min(1 << 20));
                    raised = match procstat::raise_other_nofile(pid, to) {
                        Ok(()) => json!(to),
                        Err(e) => json!(format!("failed: {e}")),
                    };
                    eprintln!("server open-file limit {s}/{h}: raised to {raised}");
                } else {
                    eprintln!(
                        "warning: server open-file soft limit {s} < {need}: it will refuse \
                         listeners near the largest step (use --raise-server-nofile)"
                    );
                }
            }
            let after = procstat::nofile_limits(pid);
            server_nofile = json!({"soft": s, "hard": h, "raised_to": raised,
                "now": after.map(|(a, b)| json!([a, b]))});
        }
    }

    // Baseline: the stream must be live.
    let health0 = if args.no_health {
        json!({"not asked": "--no-health"})
    } else {
        get_json(target.port, "/health")
            .ok_or("cannot GET /health on the server (is it running?)")?
    };
    if !args.no_health
        && health0
            .get("active_streams")
            .and_then(Value::as_array)
            .is_none_or(|a| a.is_empty())
    {
        return Err(format!("no live stream on the server: {health0}"));
    }
    let baseline = Baseline {
        rss_kb: args
            .server_pid
            .and_then(|p| procstat::status_field(&p.to_string(), "VmRSS")),
        value: server_snapshot(args.server_pid),
    };
    eprintln!("baseline: server {} health {}", baseline.value, health0);
    let ffmpeg_base = if ffmpeg_n > 0 {
        let s = ffmpeg::samples(&args.url, ffmpeg_n);
        let v = ffmpeg_summary(&s);
        eprintln!("ffmpeg (idle server): {v}");
        v
    } else {
        Value::Null
    };

    let mut pool = Pool::new(target.port, &target.host_port, &target.path, format)
        .map_err(|e| format!("epoll: {e}"))?;
    let mut results: Vec<Value> = Vec::new();
    let mut rows: Vec<String> = Vec::new();
    let mut skipped: Vec<usize> = Vec::new();

    for (si, &n) in args.steps.iter().enumerate() {
        let step_budget = connect_timeout.min(30.0) + settle + args.measure_secs + 25.0;
        if run_start.elapsed().as_secs_f64() + step_budget > max_run {
            eprintln!("step {n}: skipped (would exceed --max-run-secs {max_run})");
            skipped.push(n);
            continue;
        }
        let si = si as u16;
        if args.mode == Mode::Fresh {
            pool.conns.clear();
        }
        pool.fd_exhausted = false;
        pool.errors = Default::default();
        let quiet_start = Instant::now();
        let quiet_limit = Duration::from_secs_f64(args.quiet_wait_secs.clamp(0.0, 120.0));
        let others_before = loop {
            let a = CpuMark::now(args.server_pid, args.sender_pid);
            run_until(&mut pool, Instant::now() + Duration::from_secs(2), |_| {
                false
            });
            let o = a
                .pct_since(&CpuMark::now(args.server_pid, args.sender_pid))
                .others();
            if o.is_none_or(|o| o < 20.0) || quiet_start.elapsed() >= quiet_limit {
                break o;
            }
            eprintln!(
                "step {n}: other processes use {:.0}% CPU, waiting",
                o.unwrap_or(0.0)
            );
        };
        let waited_quiet = quiet_start.elapsed().as_secs_f64();
        let to_open = n.saturating_sub(pool.alive_count());
        eprintln!("step {n}: opening {to_open} listeners");

        // Connect phase.
        let tcp0 = procstat::tcp_counters();
        let c0 = CpuMark::now(args.server_pid, args.sender_pid);
        let t0 = Instant::now();
        let t0_ns = pool.ns_of(t0);
        let deadline = t0 + Duration::from_secs_f64(connect_timeout);
        let mut launched = 0usize;
        loop {
            while launched < to_open && pool.inflight < max_inflight && !pool.fd_exhausted {
                pool.launch(si);
                launched += 1;
            }
            if (launched >= to_open || pool.fd_exhausted) && pool.inflight == 0 {
                break;
            }
            if Instant::now() >= deadline {
                pool.timeout_inflight();
                break;
            }
            pool.poll(10);
        }
        let c1 = CpuMark::now(args.server_pid, args.sender_pid);
        let cpu_connect = c0.pct_since(&c1);
        let (srv_cpu_connect, own_cpu_connect) = (cpu_connect.server, cpu_connect.own);
        let new: Vec<&Conn> = pool.conns.iter().filter(|c| c.step == si).collect();
        let connected = new.iter().filter(|c| c.connected()).count();
        let last_head = new.iter().map(|c| c.t_head).max().unwrap_or(t0_ns);
        let connect_secs = (last_head.saturating_sub(t0_ns)) as f64 / 1e9;
        let connect_rate = if connect_secs > 0.0 {
            connected as f64 / connect_secs
        } else {
            f64::NAN
        };
        let mut ttfb: Vec<f64> = new
            .iter()
            .filter(|c| c.t_first_byte != 0)
            .map(|c| ms(c.t_first_byte - c.t_start))
            .collect();
        let mut ttff: Vec<f64> = new
            .iter()
            .filter(|c| c.t_first_frame != 0)
            .map(|c| ms(c.t_first_frame - c.t_start))
            .collect();
        let mut burst: Vec<f64> = new
            .iter()
            .filter(|c| c.burst_frames > 0)
            .map(|c| ms(c.burst_ns))
            .collect();
        let stream_id = pool.stream_id.clone();
        let connect_errors: Vec<Value> = pool
            .errors
            .by_errno
            .iter()
            .map(|(e, k)| json!({"error": std::io::Error::from_raw_os_error(*e).to_string(), "count": k}))
            .collect();
        let fd_exhausted = pool.fd_exhausted;
        eprintln!(
            "step {n}: {connected}/{to_open} connected in {connect_secs:.2}s ({connect_rate:.0}/s), \
             server CPU {:.0}%, tool CPU {own_cpu_connect:.0}%",
            srv_cpu_connect.unwrap_or(f64::NAN)
        );

        // Settle, then the window.
        run_until(
            &mut pool,
            Instant::now() + Duration::from_secs_f64(settle),
            |_| false,
        );
        let tcp1 = procstat::tcp_counters();
        let rss_after_connect = args
            .server_pid
            .and_then(|p| procstat::status_field(&p.to_string(), "VmRSS"));
        pool.start_window();
        pool.reset_loop_stats();
        let members_at_start = pool.alive_count();
        let w0 = CpuMark::now(args.server_pid, args.sender_pid);
        let win_end = Instant::now() + Duration::from_secs_f64(args.measure_secs);
        let ff_thread = (ffmpeg_n > 0).then(|| {
            let url = args.url.clone();
            std::thread::spawn(move || ffmpeg::samples(&url, ffmpeg_n))
        });
        let port = target.port;
        let health_delay = Duration::from_secs_f64((args.measure_secs - 1.5).max(0.0));
        let ask_health = !args.no_health;
        let health_thread = std::thread::spawn(move || {
            if !ask_health {
                return (None, Duration::ZERO);
            }
            std::thread::sleep(health_delay);
            let t = Instant::now();
            let h = get_json(port, "/health");
            (h, t.elapsed())
        });
        run_until(&mut pool, win_end, |_| false);
        let win_end_ns = pool.end_window();
        let w1 = CpuMark::now(args.server_pid, args.sender_pid);
        let cpu_win = w0.pct_since(&w1);
        let (srv_cpu, own_cpu) = (cpu_win.server, cpu_win.own);
        let tcp_win_end = procstat::tcp_counters();
        let tool_loop = json!({
            "epoll_waits": pool.polls,
            "full_batches": pool.polls_full,
            "max_batch_ms": r1(ms(pool.max_batch_ns)),
        });
        let tcp_mem = procstat::tcp_mem_pages();
        let server_now = server_snapshot(args.server_pid);
        let own_rss_kb = procstat::status_field("self", "VmRSS");
        // Keep reading while helper threads finish (bounded).
        let helpers_deadline = Instant::now() + Duration::from_secs(120);
        run_until(&mut pool, helpers_deadline, |_| {
            health_thread.is_finished() && ff_thread.as_ref().is_none_or(|t| t.is_finished())
        });
        let (health, health_latency) = health_thread.join().unwrap_or((None, Duration::ZERO));
        let health_count = health.as_ref().and_then(|h| health_listeners(h, format));
        let ff = match ff_thread {
            Some(t) if t.is_finished() => ffmpeg_summary(&t.join().unwrap_or_default()),
            Some(_) => json!("did not finish"),
            None => Value::Null,
        };

        // Window statistics over the listeners alive at its start.
        let wall_s = (win_end_ns - pool.win_start()) as f64 / 1e9;
        let members: Vec<&Conn> = pool.conns.iter().filter(|c| c.win_member).collect();
        let mut ratios: Vec<f64> = members.iter().map(|c| c.window_ratio()).collect();
        let mut life: Vec<f64> = members
            .iter()
            .map(|c| c.lifetime_ratio(win_end_ns))
            .collect();
        let mut gaps: Vec<f64> = members.iter().map(|c| ms(c.win_max_gap)).collect();
        let broken = members.iter().filter(|c| !c.intact()).count();
        let alive_end = members.iter().filter(|c| c.alive()).count();
        let clean = members
            .iter()
            .filter(|c| {
                c.alive()
                    && c.intact()
                    && c.window_ratio() >= args.clean_ratio
                    && ms(c.win_max_gap) <= args.clean_gap_ms
            })
            .count();
        let mut ended: Vec<(String, usize)> = Vec::new();
        for c in pool
            .conns
            .iter()
            .filter(|c| !c.alive() && c.end != End::Closed)
        {
            let name = end_name(c.end);
            match ended.iter_mut().find(|(k, _)| *k == name) {
                Some((_, k)) => *k += 1,
                None => ended.push((name, 1)),
            }
        }
        // MP3 only: 128 kbit/s CBR, 384 bytes per 24 ms frame.
        let win_mb_per_s = (format == Format::Mp3).then(|| {
            let bytes: f64 = members
                .iter()
                .map(|c| c.win_audio as f64 / 24e6 * 384.0)
                .sum();
            r1(bytes / wall_s / 1e6)
        });
        let rss_kb = server_now.get("rss_kb").and_then(Value::as_u64);
        let per_listener_kb = match (rss_kb, baseline.rss_kb) {
            (Some(a), Some(b)) if alive_end > 0 => Some((a as f64 - b as f64) / alive_end as f64),
            _ => None,
        };
        let kb_after_connect = match (rss_after_connect, baseline.rss_kb) {
            (Some(a), Some(b)) if connected > 0 => {
                Some(r1((a as f64 - b as f64) / connected as f64))
            }
            _ => None,
        };
        let frames_total: u64 = members.iter().map(|c| c.media.frames()).sum();
        let bytes_total: u64 = members.iter().map(|c| c.body_bytes).sum();

        let row = json!({
            "listeners": n,
            "opened": to_open,
            "connected": connected,
            "connect_secs": r3(connect_secs),
            "connect_rate_per_s": jnum(r1(connect_rate)),
            "connect_errors": connect_errors,
            "fd_exhausted": fd_exhausted,
            "alive_at_window_start": members_at_start,
            "alive_at_end": alive_end,
            "clean": clean,
            "broken": broken,
            "ended": ended.iter().map(|(k, v)| json!({"reason": k, "count": v})).collect::<Vec<_>>(),
            "server_reported_listeners": health_count,
            "health_latency_ms": r1(health_latency.as_secs_f64() * 1000.0),
            "window_secs": r3(wall_s),
            "rt_ratio_window": {"min": jnum(r3(pct(&mut ratios, 0.0))), "p1": jnum(r3(pct(&mut ratios, 0.01))), "p50": jnum(r3(pct(&mut ratios, 0.5)))},
            "rt_ratio_since_connect": {"min": jnum(r3(pct(&mut life, 0.0))), "p50": jnum(r3(pct(&mut life, 0.5)))},
            "max_gap_ms": {"p50": jnum(r1(pct(&mut gaps, 0.5))), "p99": jnum(r1(pct(&mut gaps, 0.99))), "max": jnum(r1(pct(&mut gaps, 1.0)))},
            "ttfb_ms": {"p50": jnum(r1(pct(&mut ttfb, 0.5))), "p99": jnum(r1(pct(&mut ttfb, 0.99))), "max": jnum(r1(pct(&mut ttfb, 1.0)))},
            "ttff_ms": {"p50": jnum(r1(pct(&mut ttff, 0.5))), "p99": jnum(r1(pct(&mut ttff, 0.99))), "max": jnum(r1(pct(&mut ttff, 1.0)))},
            "burst_ms_p50": jnum(r1(pct(&mut burst, 0.5))),
            "window_audio_mb_per_s": win_mb_per_s,
            "frames_total": frames_total,
            "body_bytes_total": bytes_total,
            "server_cpu_pct_connect": srv_cpu_connect.map(r1),
            "server_cpu_pct_window": srv_cpu.map(r1),
            "server": server_now,
            "server_rss_kb_per_listener": per_listener_kb.map(r1),
            "server_rss_kb_after_connect": rss_after_connect,
            "server_rss_kb_per_listener_after_connect": kb_after_connect,
            "tool_loop_window": tool_loop,
            "tool_cpu_pct_connect": r1(own_cpu_connect),
            "cpu_connect": cpu_json(&cpu_connect),
            "other_procs_pct_before_step": others_before.map(r1),
            "waited_for_quiet_secs": r1(waited_quiet),
            "cpu_window": cpu_json(&cpu_win),
            "tcp_counters_connect": counter_delta(&tcp0, &tcp1),
            "tcp_counters_window": counter_delta(&tcp1, &tcp_win_end),
            "tcp_mem_pages_end": tcp_mem,
            "global_max_silence_ms": r1(ms(pool.win_global_gap)),
            "global_max_silence_ended_at_s": r3(pool.win_global_gap_end as f64 / 1e9),
            "tool_cpu_pct_window": r1(own_cpu),
            "tool_rss_kb": own_rss_kb,
            "stream": stream_id,
            "ffmpeg_under_load": ff,
        });
        let g = |p: &str| row.pointer(p).and_then(Value::as_f64).unwrap_or(f64::NAN);
        rows.push(format!(
            "| {n} | {connected} | {:.0} | {alive_end} | {clean} | {:.3} / {:.3} | {:.0} / {:.0} | {broken} | {:.1} / {:.1} | {:.1} / {:.1} | {:.0} / {:.0} | {:.0} | {:.0} / {:.0} / {:.0} | {:.0} | {:.1} | {:.1} | {:.0} | {:.1} | {} |",
            g("/connect_rate_per_s"),
            g("/rt_ratio_window/min"),
            g("/rt_ratio_window/p50"),
            g("/max_gap_ms/p99"),
            g("/max_gap_ms/max"),
            g("/ttfb_ms/p50"),
            g("/ttfb_ms/p99"),
            g("/ttff_ms/p50"),
            g("/ttff_ms/p99"),
            g("/server_cpu_pct_connect"),
            g("/server_cpu_pct_window"),
            g("/cpu_window/sender"),
            g("/cpu_window/machine_busy"),
            g("/cpu_window/machine_softirq"),
            g("/cpu_window/others"),
            g("/global_max_silence_ms"),
            rss_kb.map(|k| k as f64 / 1024.0).unwrap_or(f64::NAN),
            per_listener_kb.unwrap_or(f64::NAN),
            own_cpu,
            own_rss_kb.map(|k| k as f64 / 1024.0).unwrap_or(f64::NAN),
            ffmpeg_cell(&ff),
        ));
        eprintln!(
            "step {n}: {}",
            rows.last().map(String::as_str).unwrap_or("")
        );
        results.push(row);

        if args.mode == Mode::Fresh {
            pool.close_all();
            // Let the server notice before the next step.
            let until = Instant::now() + Duration::from_secs(if args.no_health { 0 } else { 20 });
            while Instant::now() < until {
                if get_json(target.port, "/health")
                    .as_ref()
                    .and_then(|h| health_listeners(h, format))
                    == Some(0)
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    pool.close_all();

    println!("\nformat: {format:?} | mode: {:?} | window {} s | clean = alive, no bad frame/page, window real-time ratio >= {}, max gap <= {} ms | CPU % of one core ({} cores) | CPU and gaps over the window\n",
        args.mode, args.measure_secs, args.clean_ratio, args.clean_gap_ms, procstat::cores());
    println!("| N | connected | conn/s | alive | clean | RT min / p50 | gap p99 / max ms | broken | TTFB p50 / p99 ms | TTF-frame p50 / p99 ms | srv CPU % conn / win | sender CPU % | machine busy / softirq / other procs % | all-silent ms | srv RSS MB | srv KB/listener | tool CPU % | tool RSS MB | ffmpeg TTFA min / med ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!("{r}");
    }
    if !skipped.is_empty() {
        println!("\nskipped steps (time budget): {skipped:?}");
    }
    let summary = json!({
        "tool": "mp3-listeners-bench",
        "url": args.url,
        "format": format!("{format:?}").to_lowercase(),
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "measure_secs": args.measure_secs,
        "settle_secs": settle,
        "max_inflight": max_inflight,
        "tool_nofile": {"soft": soft, "hard": hard, "note": note},
        "server_pid": args.server_pid,
        "server_nofile": server_nofile,
        "baseline": {"server": baseline.value, "health": health0},
        "server_exe": args.server_pid.and_then(|p| std::fs::read_link(format!("/proc/{p}/exe")).ok()).map(|p| p.display().to_string()),
        "ffmpeg_idle": ffmpeg_base,
        "steps": results,
        "skipped_steps": skipped,
        "run_secs": r1(run_start.elapsed().as_secs_f64()),
    });
    println!("\n{summary}");
    Ok(())
}
