//! `cargo bench --bench forward_path`: what one forwarded copy costs in user
//! space. Per receiver and packet the relay writes an RTP header (a few
//! stores) and makes one SRTP protect call into a fresh datagram buffer; this
//! times that protect for each SRTP profile str0m can negotiate, with an
//! Opus-sized payload. No network is involved; the kernel's share of a copy
//! (the `sendmmsg` path) is measured by `bench/webrtc` and `perf` instead.
//! Prints nanoseconds per copy; not a pass/fail benchmark.

use std::hint::black_box;
use std::time::Instant;

use str0m::crypto::dtls::SrtpProfile;
use voice_relay::relay::srtp::{tapped_provider, Keys, SrtpTx};

/// Copies per measurement, and measurements per profile (the best is kept,
/// as the least disturbed by other work on the machine).
const COPIES: u32 = 200_000;
const ROUNDS: usize = 5;

fn main() {
    let provider = tapped_provider();
    // A 12-byte header + one-byte extension block (audio level, MID), and a
    // typical 32 kbit/s Opus payload of 80 bytes.
    let header = [
        0x90, 0x6f, 0xff, 0x10, 0, 0, 0x3c, 0, 0x12, 0x34, 0x56, 0x78, 0xbe, 0xde, 0, 2, 0x10,
        0x25, 0x40, b'0',
    ];
    let payload = [0x5au8; 80];
    println!("forward path, user space: SRTP protect of one copy (header 20 B + payload 80 B)");
    println!("| profile | ns per copy (best of {ROUNDS} x {COPIES}) |");
    println!("|---|---|");
    for (name, profile, len) in [
        (
            "AES-CM-128 + HMAC-SHA1-80",
            SrtpProfile::AES128_CM_SHA1_80,
            60,
        ),
        ("AEAD-AES-128-GCM", SrtpProfile::AEAD_AES_128_GCM, 56),
        ("AEAD-AES-256-GCM", SrtpProfile::AEAD_AES_256_GCM, 88),
    ] {
        let material: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let keys = Keys::new(&material, profile, false);
        let Some(mut tx) = SrtpTx::new(&keys, &provider) else {
            println!("| {name} | (not supported) |");
            continue;
        };
        let mut best = f64::MAX;
        for _ in 0..ROUNDS {
            let start = Instant::now();
            for i in 0..COPIES {
                let out = tx.protect(&header, &payload, 0x1234_5678, u64::from(i));
                black_box(out.ok());
            }
            let ns = start.elapsed().as_nanos() as f64 / f64::from(COPIES);
            best = best.min(ns);
        }
        println!("| {name} | {best:.0} |");
    }
}
