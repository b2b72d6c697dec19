//! In-process tests of the relay as a whole.

use std::time::{Duration, Instant};

use super::*;

fn config(liveness: &Liveness) -> RelayConfig {
    RelayConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        announce: vec!["127.0.0.1:9".parse().unwrap()],
        announce_tcp: Vec::new(),
        sender_idle: Duration::from_secs(20),
        handshake_timeout: Duration::from_secs(15),
        forward_threads: 1,
        liveness: liveness.clone(),
    }
}

fn wait_for_failure(liveness: &Liveness) -> Option<String> {
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if let Some(f) = liveness.failure() {
            return Some(f);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

#[test]
fn a_relay_thread_that_dies_is_a_failure_a_shutdown_is_not() {
    let liveness = Liveness::default();
    let (handle, thread) = start(config(&liveness)).unwrap();
    handle.send(Command::Crash).unwrap();
    assert!(thread.join().is_err(), "the relay thread panicked");
    assert_eq!(
        wait_for_failure(&liveness).as_deref(),
        Some("the media relay thread panicked")
    );

    let liveness = Liveness::default();
    let (handle, thread) = start(config(&liveness)).unwrap();
    handle.send(Command::Shutdown).unwrap();
    thread.join().unwrap();
    assert_eq!(liveness.failure(), None);
}

/// A receiver leg of the relay and a WebRTC client (both str0m, no
/// sockets: datagrams are handed across in memory), driven through ICE and
/// DTLS; then the relay's forward path sends it a sender's packets.
mod forward_to_a_client {
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use str0m::media::{Direction, MediaKind};
    use str0m::net::{Protocol, Receive};
    use str0m::rtp::RtpPacket;
    use str0m::{Candidate, Event, Input, Output, Rtc};

    use crate::relay::drain::drain;
    use crate::relay::forward::{self, ForwardPool, ForwardedPacket, Tally};
    use crate::relay::handle::RtcBuilder;
    use crate::relay::leg::Leg;
    use crate::relay::outbox::Outbox;
    use crate::relay::peer::{Peer, PeerKind, Timeouts};

    const RELAY: &str = "127.0.0.1:5000";
    const CLIENT: &str = "127.0.0.1:6000";

    struct Link {
        client_addr: SocketAddr,
        relay: Peer,
        client: Rtc,
        out: Outbox,
        now: Instant,
        received: Vec<RtpPacket>,
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn receive(rtc: &mut Rtc, now: Instant, from: SocketAddr, to: SocketAddr, data: &[u8]) {
        let input = Input::Receive(
            now,
            Receive {
                proto: Protocol::Udp,
                source: from,
                destination: to,
                contents: data.try_into().unwrap(),
            },
        );
        rtc.handle_input(input).unwrap();
    }

    impl Link {
        fn new(client_addr: SocketAddr) -> Link {
            let now = Instant::now();
            let cert = str0m::crypto::from_feature_flags()
                .dtls_provider
                .generate_certificate()
                .unwrap();
            let candidates = crate::relay::host_candidates(&[addr(RELAY)], &[]);
            let (mut relay, keys) = RtcBuilder::new(&cert, &candidates).receiver();
            let mut api = relay.sdp_api();
            let mid = api.add_media(
                MediaKind::Audio,
                Direction::SendOnly,
                Some("s".into()),
                None,
                None,
            );
            let (offer, pending) = api.apply().unwrap();
            let mut client = Rtc::builder()
                .set_rtp_mode(true)
                .clear_codecs()
                .enable_opus(true, false)
                .build(now);
            client.add_local_candidate(Candidate::host(client_addr, "udp").unwrap());
            let answer = client.sdp_api().accept_offer(offer).unwrap();
            relay.sdp_api().accept_answer(pending, answer).unwrap();
            let leg = Leg::negotiated(&mut relay, mid, keys).unwrap();
            let ufrag = relay.direct_api().local_ice_credentials().ufrag;
            let limits = Timeouts {
                handshake: Duration::from_secs(15),
                sender_idle: Duration::from_secs(20),
            };
            let (events, _) = tokio::sync::mpsc::unbounded_channel();
            let relay = Peer::new(
                1,
                Box::new(relay),
                PeerKind::Receiver(leg),
                "s".into(),
                events,
                ufrag,
                limits,
            );
            Link {
                client_addr,
                relay,
                client,
                out: Outbox::new(-1),
                now,
                received: Vec::new(),
            }
        }

        /// Hands every datagram each side has across, until both are quiet.
        fn exchange(&mut self) {
            for _ in 0..100 {
                drain(&mut self.relay, &mut self.out, &mut Vec::new());
                let to_client = self.out.take_queued();
                for (to, data) in &to_client {
                    assert_eq!(*to, self.client_addr);
                    receive(&mut self.client, self.now, addr(RELAY), *to, data);
                }
                let mut to_relay = 0;
                loop {
                    match self.client.poll_output().unwrap() {
                        Output::Timeout(_) => break,
                        Output::Transmit(t) => {
                            to_relay += 1;
                            let (from, now) = (self.client_addr, self.now);
                            receive(&mut self.relay.rtc, now, from, addr(RELAY), &t.contents);
                        }
                        Output::Event(Event::RtpPacket(p)) => self.received.push(p),
                        Output::Event(_) => {}
                    }
                }
                if to_client.is_empty() && to_relay == 0 {
                    return;
                }
            }
        }

        fn tick(&mut self, by: Duration) {
            self.now += by;
            let now = self.now;
            self.relay.rtc.handle_input(Input::Timeout(now)).unwrap();
            self.client.handle_input(Input::Timeout(now)).unwrap();
            self.exchange();
        }

        fn connect(&mut self) {
            for _ in 0..400 {
                self.tick(Duration::from_millis(10));
                let keyed = self.relay.leg_mut().is_some_and(|l| l.keys.get().is_some());
                if self.relay.connected && keyed {
                    return;
                }
            }
            panic!("ICE + DTLS did not complete");
        }

        /// Forwards one sender packet through the relay's forward path.
        fn forward(&mut self, seq: u16, payload: &[u8]) -> Tally {
            let pkt = ForwardedPacket::for_test(seq, u32::from(seq) * 960, payload, self.now);
            let mut tally = Tally::default();
            forward::to_peer(&mut self.relay, &pkt, &mut self.out, &mut tally);
            self.exchange();
            tally
        }
    }

    /// The sender's packets reach the client as the relay rewrote them: its
    /// SSRC and payload type, one continuous sequence (across the receiver's
    /// rollover, and across the sender's jump of more than 2^15), protected
    /// by the relay's own SRTP so that the client's str0m decrypts each.
    #[test]
    fn a_sender_that_jumps_reaches_the_client_continuous_and_decryptable() {
        let mut link = Link::new(addr(CLIENT));
        link.connect();
        let (ssrc, pt) = {
            let leg = link.relay.leg_mut().unwrap();
            (leg.ssrc, leg.pt)
        };
        link.received.clear();
        let sender: Vec<u16> = (1000..1300).chain(40_000..40_300).collect();
        let mut sent = 0;
        for (i, seq) in sender.iter().enumerate() {
            let t = link.forward(*seq, &(i as u32).to_be_bytes());
            assert_eq!(t.by_str0m, 0, "protected by the relay, not str0m");
            assert!(t.failed.is_empty());
            sent += t.sent;
        }
        assert_eq!(sent, sender.len() as u64);
        let got = &link.received;
        assert_eq!(got.len(), sender.len(), "every copy decrypted");
        for (i, p) in got.iter().enumerate() {
            assert_eq!(p.header.ssrc, ssrc);
            assert_eq!(p.header.payload_type, pt);
            assert_eq!(&*p.payload, &(i as u32).to_be_bytes());
            assert_eq!(*p.seq_no, *got[0].seq_no + i as u64, "continuous at {i}");
        }
        assert!(
            *got[0].seq_no >> 16 == 0 && *got[got.len() - 1].seq_no >> 16 == 1,
            "the receiver's rollover counter went from 0 to 1"
        );
    }

    /// A large stream's packet is forwarded in chunks on the pool's threads
    /// and the caller's: every receiver gets every copy (sent for real, over
    /// loopback, by each thread's own outbox), and the counts add up.
    #[test]
    fn the_pool_forwards_every_chunk() {
        use std::net::UdpSocket;
        use std::os::fd::AsRawFd;

        let relay_socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sockets: Vec<UdpSocket> = (0..5)
            .map(|_| {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s
            })
            .collect();
        let mut links: Vec<Link> = sockets
            .iter()
            .map(|s| {
                let mut link = Link::new(s.local_addr().unwrap());
                link.connect();
                link.received.clear();
                link
            })
            .collect();
        let pool = ForwardPool::new(3);
        let mut out = Outbox::new(relay_socket.as_raw_fd());
        let now = Instant::now();
        for seq in 0..20u16 {
            let pkt = ForwardedPacket::for_test(seq, u32::from(seq) * 960, &seq.to_be_bytes(), now);
            let mut peers: Vec<&mut Peer> = links.iter_mut().map(|l| &mut l.relay).collect();
            let tally = pool.forward(&mut peers, 3, &pkt, &mut out);
            assert_eq!((tally.sent, tally.by_str0m), (5, 0));
        }
        assert_eq!(out.sent, 100, "the threads' sends are counted");
        let mut buf = [0u8; 1500];
        for (link, socket) in links.iter_mut().zip(&sockets) {
            for _ in 0..20 {
                let n = socket.recv(&mut buf).unwrap();
                let (now, to) = (link.now, link.client_addr);
                receive(&mut link.client, now, addr(RELAY), to, &buf[..n]);
                link.exchange();
            }
            let payloads: Vec<Vec<u8>> = link.received.iter().map(|p| p.payload.to_vec()).collect();
            let sent: Vec<Vec<u8>> = (0..20u16).map(|s| s.to_be_bytes().to_vec()).collect();
            assert_eq!(payloads, sent);
        }
    }
}
