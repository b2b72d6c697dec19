//! End-to-end: Opus RTP packets → `start()` → MP3 bytes at two listeners.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use voice_relay::mp3::frames::parse_header;
use voice_relay::mp3::{self, Fanout, Mp3Config};

const FRAME_SECS: f64 = 1152.0 / 48_000.0;

fn sine_packets(freq: f64, packets: usize) -> Vec<Vec<u8>> {
    let mut enc = opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Audio)
        .expect("encoder");
    enc.set_inband_fec(true).expect("fec");
    enc.set_packet_loss_perc(10).expect("loss");
    enc.set_bitrate(opus::Bitrate::Bits(32_000))
        .expect("bitrate");
    (0..packets)
        .map(|p| {
            let pcm: Vec<i16> = (0..960)
                .map(|i| {
                    let t = (p * 960 + i) as f64 / 48_000.0;
                    (10_000.0 * (2.0 * std::f64::consts::PI * freq * t).sin()) as i16
                })
                .collect();
            enc.encode_vec(&pcm, 1500).expect("encode")
        })
        .collect()
}

/// Walks `data` strictly frame by frame from offset 0; returns the frame count.
fn count_frames(data: &[u8]) -> usize {
    let mut pos = 0;
    let mut n = 0;
    while pos < data.len() {
        let h = data
            .get(pos..pos + 4)
            .and_then(|h| parse_header([h[0], h[1], h[2], h[3]]))
            .unwrap_or_else(|| panic!("no valid frame header at byte {pos} (frame {n})"));
        assert_eq!(
            (h.samples, h.sample_rate, h.bitrate_kbps),
            (1152, 48_000, 128)
        );
        pos += h.frame_len;
        n += 1;
    }
    assert_eq!(pos, data.len(), "stream ends on a frame boundary");
    n
}

async fn collect(
    fanout: &Arc<Fanout>,
) -> tokio::task::JoinHandle<Vec<Result<Bytes, std::io::Error>>> {
    let body = fanout.subscribe().into_stream();
    tokio::spawn(body.collect::<Vec<_>>())
}

fn join(chunks: &[Result<Bytes, std::io::Error>]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in chunks {
        out.extend_from_slice(c.as_ref().expect("no listener error"));
    }
    out
}

fn mp3_threads(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("comm"))
                        .is_ok_and(|c| c.trim_end() == name)
                })
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opus_to_mp3_two_listeners_burst_and_gaps() {
    let total_packets = 250; // 5 s
    let packets = sine_packets(1000.0, total_packets);
    let config = Mp3Config {
        listener_queue_batches: 1024, // the pipeline runs faster than real time here
        burst_bytes: 0,               // a burst of burst_ms alone
        ..Mp3Config::default()
    };
    let (sink, fanout) = mp3::start("e2e", config);
    let first = collect(&fanout).await; // before any frame: empty burst, waits
    assert_eq!(fanout.listener_count(), 1);

    // Lost: 60, 61 (FEC + PLC), 100 (FEC). DTX: 120..140 never sent, with
    // contiguous sequence numbers across the hole (400 ms filled).
    let seq_base = 3 * 65_536 + 65_530u64; // extended, past several wraps
    let ts_base = (1u64 << 33) + 17;
    let mut pushed = 0;
    let mut second = None;
    for (i, payload) in packets.iter().enumerate() {
        if i == 190 {
            // Wait until clearly more than burst_ms (1 s) of MP3 is
            // published, and the stream is older than its first-words
            // window (3 s, when a burst reaches back to its first packet),
            // then join late.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while (fanout.frames_published() as f64) * FRAME_SECS < 3.4 {
                assert!(tokio::time::Instant::now() < deadline, "pipeline stalled");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            second = Some(fanout.subscribe());
            assert_eq!(mp3_threads("mp3-e2e"), 1, "exactly one pipeline thread");
        }
        if [60, 61, 100].contains(&i) || (120..140).contains(&i) {
            continue;
        }
        let seq = seq_base + i as u64 - if i >= 140 { 20 } else { 0 };
        let ts = ts_base + i as u64 * 960;
        sink.push(seq, ts, Arc::from(payload.as_slice()));
        pushed += 1;
    }
    let second = second.expect("subscribed");
    let burst_frames = count_frames(second.burst());
    let second = tokio::spawn(second.into_stream().collect::<Vec<_>>());
    assert_eq!(fanout.listener_count(), 2);
    assert_eq!(sink.dropped_packets(), 0);
    drop(sink); // ends the stream

    let first = tokio::time::timeout(Duration::from_secs(30), first)
        .await
        .expect("first listener's body ends")
        .expect("join");
    let second = tokio::time::timeout(Duration::from_secs(30), second)
        .await
        .expect("second listener's body ends")
        .expect("join");
    assert!(fanout.is_closed());
    assert_eq!(fanout.listener_count(), 0);

    let a = join(&first);
    let b = join(&second);
    let frames_a = count_frames(&a);
    let frames_b = count_frames(&b); // starts on a frame boundary
    assert_eq!(frames_a as u64, fanout.frames_published());
    assert!(
        a.ends_with(&b),
        "late listener = exact suffix (no gap, no duplicate)"
    );
    assert!(frames_b < frames_a);

    // Burst: the last ≥ 1 s of whole frames (batches are ~100-120 ms).
    let burst_secs = burst_frames as f64 * FRAME_SECS;
    assert!((1.0..=1.13).contains(&burst_secs), "burst {burst_secs} s");

    // Timeline: 5 s pushed (holes filled) + LAME delay/padding.
    let audio_secs = total_packets as f64 * 0.020;
    let mp3_secs = frames_a as f64 * FRAME_SECS;
    assert!(
        (mp3_secs - audio_secs).abs() <= 0.1,
        "mp3 {mp3_secs} s vs audio {audio_secs} s"
    );

    let stats = fanout.counters();
    assert_eq!(stats.packets_in, pushed);
    assert_eq!(
        stats.packets_late + stats.packets_corrupt + stats.resyncs,
        0
    );
    assert_eq!(stats.samples_fec, 2 * 960, "{stats:?}");
    assert_eq!(stats.samples_plc, 960 + 2880, "{stats:?}");
    assert_eq!(stats.samples_silence, 19_200 - 2880, "{stats:?}");
    assert_eq!(stats.samples_decoded, pushed * 960);

    check_with_ffmpeg(&a, audio_secs);
}

/// Decodes with ffmpeg (if installed) and checks pitch, length and the DTX hole.
fn check_with_ffmpeg(mp3: &[u8], audio_secs: f64) {
    let child = Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-f",
            "mp3",
            "-i",
            "pipe:0",
        ])
        .args(["-f", "s16le", "-ac", "1", "-ar", "48000", "pipe:1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        eprintln!("ffmpeg not found; skipping decode check");
        return;
    };
    let mut stdin = child.stdin.take().expect("stdin");
    let input = mp3.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("ffmpeg output");
    writer.join().expect("writer").expect("write mp3");
    assert!(
        out.status.success(),
        "ffmpeg: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pcm: Vec<f64> = out
        .stdout
        .chunks_exact(2)
        .map(|b| f64::from(i16::from_le_bytes([b[0], b[1]])))
        .collect();
    let secs = pcm.len() as f64 / 48_000.0;
    assert!((secs - audio_secs).abs() <= 0.1, "decoded {secs} s");

    let window =
        |from: f64, len: f64| &pcm[(from * 48_000.0) as usize..((from + len) * 48_000.0) as usize];
    let tone = window(0.5, 0.2);
    let peak = (200..4000)
        .step_by(5)
        .map(|f| (f, goertzel_power(tone, f64::from(f))))
        .max_by(|x, y| x.1.total_cmp(&y.1))
        .expect("bins")
        .0;
    assert!((985..=1015).contains(&peak), "dominant frequency {peak} Hz");

    // Digital silence inside the DTX hole (2.4 s + 60 ms PLC .. 2.8 s).
    let rms = |w: &[f64]| (w.iter().map(|s| s * s).sum::<f64>() / w.len() as f64).sqrt();
    let tone_rms = rms(tone);
    let hole_rms = rms(window(2.53, 0.2));
    assert!(tone_rms > 3000.0, "tone rms {tone_rms}");
    assert!(
        hole_rms < tone_rms / 100.0,
        "hole rms {hole_rms} vs tone {tone_rms}"
    );
    eprintln!(
        "ffmpeg: {secs:.3} s, peak {peak} Hz, tone rms {tone_rms:.0}, hole rms {hole_rms:.1}"
    );
    // And the tone is back after the hole.
    assert!(rms(window(2.85, 0.1)) > tone_rms / 2.0);
}

fn goertzel_power(x: &[f64], freq: f64) -> f64 {
    let w = 2.0 * std::f64::consts::PI * freq / 48_000.0;
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0, 0.0);
    for &v in x {
        let s = v + coeff * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    s1 * s1 + s2 * s2 - coeff * s1 * s2
}

#[tokio::test]
async fn invalid_config_fails_cleanly() {
    let bad = Mp3Config {
        bitrate_kbps: 100,
        ..Mp3Config::default()
    };
    assert!(bad.validate().is_err());
    assert!(mp3::try_start("bad", bad.clone()).is_err());
    let (sink, fanout) = mp3::start("bad", bad);
    assert!(fanout.is_closed(), "a pipeline that cannot start is closed");
    sink.push(1, 0, Arc::from(&[1u8, 2, 3][..])); // must not block or panic
    assert_eq!(sink.dropped_packets(), 1);
    let items: Vec<_> = fanout.subscribe().into_stream().collect().await;
    assert!(items.is_empty());
    for ok in [32, 128, 320] {
        let c = Mp3Config {
            bitrate_kbps: ok,
            ..Mp3Config::default()
        };
        assert!(c.validate().is_ok());
    }
    for bad in [0, 8, 16, 24, 56, 127, 384] {
        let c = Mp3Config {
            bitrate_kbps: bad,
            ..Mp3Config::default()
        };
        assert!(c.validate().is_err(), "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_packets_and_full_queue_never_block_or_panic() {
    let (sink, fanout) = mp3::start("junk", Mp3Config::default());
    let listener = fanout.subscribe().into_stream();
    let good = sine_packets(440.0, 1).remove(0);
    // 2000 pushes in a tight loop: queue (512) may fill; extra ones are dropped.
    for i in 0..2000u64 {
        let payload: Arc<[u8]> = match i % 4 {
            0 => Arc::from(good.as_slice()),
            1 => Arc::from(&[0xFFu8, 0xFF, 0xFF][..]),
            2 => Arc::from(&[][..]),
            _ => Arc::from(&[(i % 251) as u8; 40][..]),
        };
        sink.push(i, i * 960, payload);
    }
    let dropped = sink.dropped_packets();
    drop(sink);
    let items: Vec<_> = tokio::time::timeout(Duration::from_secs(60), listener.collect::<Vec<_>>())
        .await
        .expect("ends");
    let bytes = join(&items);
    count_frames(&bytes);
    let stats = fanout.counters();
    assert_eq!(stats.packets_in + dropped, 2000);
    assert!(stats.packets_corrupt > 0);
    // Every emitted PCM sample (decoded or filled) reached the MP3 timeline,
    // and the timeline never runs ahead of the RTP clock.
    let emitted =
        stats.samples_decoded + stats.samples_plc + stats.samples_fec + stats.samples_silence;
    let secs = count_frames(&bytes) as f64 * FRAME_SECS;
    assert!(
        (secs - emitted as f64 / 48_000.0).abs() <= 0.1,
        "{secs} s for {stats:?}"
    );
    assert!(emitted <= 2000 * 960 + 5760, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_gap_fill_does_not_drop_listeners() {
    // Default lag limit (32 batches). 1 s audio, a 9 s hole (contiguous seq,
    // e.g. DTX), 1 s audio. The listener is only read after the stream ended,
    // so it must not have been pushed past 32 batches by the 9 s fill.
    let (sink, fanout) = mp3::start("longgap", Mp3Config::default());
    let listener = fanout.subscribe();
    let packets = sine_packets(1000.0, 100);
    for (i, p) in packets.iter().enumerate() {
        let i = i as u64;
        let ts = i * 960 + if i >= 50 { 9 * 48_000 } else { 0 };
        sink.push(i, ts, Arc::from(p.as_slice()));
    }
    drop(sink);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !fanout.is_closed() {
        assert!(tokio::time::Instant::now() < deadline, "pipeline stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let items: Vec<_> = listener.into_stream().collect().await;
    let bytes = join(&items); // panics on a listener error
    let secs = count_frames(&bytes) as f64 * FRAME_SECS;
    assert!((secs - 11.0).abs() <= 0.1, "{secs} s");
    let stats = fanout.counters();
    assert_eq!(stats.samples_silence, 9 * 48_000 - 2880, "{stats:?}");
    assert_eq!(stats.listeners_dropped_slow, 0);
}
