//! Time to first audio as a real player sees it: launch ffmpeg on the URL and
//! time (from spawn) its first demuxed packet and first decoded frame (from
//! `-debug_ts` lines on stderr) and its first PCM byte on stdout.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// Seconds from spawn; None if never seen.
    pub first_packet: Option<f64>,
    pub first_decoded: Option<f64>,
    pub first_pcm: Option<f64>,
    pub exit_ok: bool,
}

/// Runs ffmpeg once (bounded by `timeout`).
pub fn sample(url: &str, timeout: Duration) -> Sample {
    let t0 = Instant::now();
    let child = Command::new("ffmpeg")
        .args([
            "-nostdin",
            "-hide_banner",
            "-nostats",
            "-debug_ts",
            "-rw_timeout",
            "10000000",
            "-i",
            url,
            "-t",
            "1",
            "-flush_packets",
            "1",
            "-f",
            "s16le",
            "pipe:1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ffmpeg: could not start: {e}");
            return Sample::default();
        }
    };
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut first_packet = None;
        let mut first_decoded = None;
        for line in BufReader::new(stderr).split(b'\n') {
            let Ok(line) = line else { break };
            let t = t0.elapsed().as_secs_f64();
            let s = String::from_utf8_lossy(&line);
            if first_packet.is_none() && s.contains("demuxer -> ") {
                first_packet = Some(t);
            }
            // ffmpeg 5.x logs "filter -> pts:..." for each decoded frame as
            // it enters the filter graph (newer versions also "decoder -> ").
            if first_decoded.is_none() && (s.contains("decoder -> ") || s.contains("filter -> ")) {
                first_decoded = Some(t);
            }
        }
        let _ = tx.send((first_packet, first_decoded));
    });
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first_pcm = None;
    let mut buf = [0u8; 65536];
    let deadline = t0 + timeout;
    let fd = stdout.as_raw_fd();
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            timed_out = true;
            break;
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) };
        if r <= 0 {
            continue;
        }
        match stdout.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if first_pcm.is_none() {
                    first_pcm = Some(t0.elapsed().as_secs_f64());
                }
            }
        }
    }
    if timed_out {
        let _ = child.kill();
    }
    let status = child.wait();
    let _ = reader.join();
    let (first_packet, first_decoded) = rx.recv().unwrap_or((None, None));
    Sample {
        first_packet,
        first_decoded,
        first_pcm,
        exit_ok: !timed_out && status.map(|s| s.success()).unwrap_or(false),
    }
}

/// `n` samples one after the other.
pub fn samples(url: &str, n: usize) -> Vec<Sample> {
    (0..n)
        .map(|_| sample(url, Duration::from_secs(20)))
        .collect()
}
