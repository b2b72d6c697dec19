//! Prints the CPU time one stream's pipeline (Opus decode + LAME encode +
//! framing/batching) spends on 60 s of audio. Not a pass/fail benchmark.
//!
//! `cargo run --release --example cpu_per_stream`

use std::sync::Arc;
use std::time::{Duration, Instant};

use voice_relay::mp3::{self, Mp3Config};

const SECS: usize = 60;

/// utime + stime of this process (all threads, live and exited), in seconds.
fn process_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the ")" of the command name; utime/stime are fields 14/15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    ticks as f64 / 100.0 // USER_HZ is 100 on Linux
}

fn main() {
    // Voice-ish test signal: a gliding tone plus harmonics, 32 kbit/s Opus.
    let mut enc = opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Voip)
        .expect("opus encoder");
    enc.set_bitrate(opus::Bitrate::Bits(32_000))
        .expect("bitrate");
    enc.set_inband_fec(true).expect("fec");
    let packets: Vec<Arc<[u8]>> = (0..SECS * 50)
        .map(|p| {
            let pcm: Vec<i16> = (0..960)
                .map(|i| {
                    let t = (p * 960 + i) as f64 / 48_000.0;
                    let f = 200.0 + 150.0 * (t * 0.7).sin();
                    let ph = 2.0 * std::f64::consts::PI * f * t;
                    (6000.0 * (ph.sin() + 0.5 * (2.0 * ph).sin() + 0.25 * (3.0 * ph).sin())) as i16
                })
                .collect();
            Arc::from(enc.encode_vec(&pcm, 1500).expect("encode").as_slice())
        })
        .collect();

    let config = Mp3Config::default();
    let bitrate = config.bitrate_kbps;
    let cpu0 = process_cpu_secs();
    let wall0 = Instant::now();
    let (sink, fanout) = mp3::start("bench", config);
    let frames_for = |pushed: usize| (pushed as f64 * 0.020 / 0.024) as u64;
    for (i, chunk) in packets.chunks(250).enumerate() {
        for (j, p) in chunk.iter().enumerate() {
            let n = (i * 250 + j) as u64;
            sink.push(n, n * 960, Arc::clone(p));
        }
        // Stay well inside the 512-packet queue: let the thread catch up.
        let pushed = (i + 1) * 250;
        while fanout.frames_published() + 10 < frames_for(pushed) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert_eq!(sink.dropped_packets(), 0);
    drop(sink);
    while !fanout.is_closed() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let wall = wall0.elapsed().as_secs_f64();
    let cpu = process_cpu_secs() - cpu0;
    let frames = fanout.frames_published();
    println!(
        "{SECS} s of mono 48 kHz Opus → MP3 {bitrate} kbit/s: {frames} frames, \
         CPU {cpu:.2} s ({:.2}% of one core in real time), wall {wall:.2} s",
        cpu / SECS as f64 * 100.0
    );
}
