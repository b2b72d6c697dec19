//! Configuration: every command-line option, each also readable from a
//! `VOICE_RELAY_*` environment variable, and the values derived from them
//! (the UDP port for media, the addresses announced in ICE candidates).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::access::Access;
use crate::proxy::{ProxyNet, TrustedProxies};

/// The values of `--log-level`.
pub const LOG_LEVELS: [&str; 5] = ["trace", "debug", "info", "warn", "error"];

/// Real-time voice relay: WebRTC (Opus) in, WebRTC and live MP3 out.
#[derive(Parser, Debug, Clone)]
#[command(name = "voice-relay", version, about)]
pub struct Config {
    /// What to do; without one, run the server.
    #[command(subcommand)]
    pub action: Option<Action>,

    /// Address for HTTP and WebSocket signalling.
    #[arg(long, env = "VOICE_RELAY_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// UDP port for all WebRTC media (one socket for every peer).
    /// Defaults to the port number of --listen.
    #[arg(long, env = "VOICE_RELAY_RTC_PORT")]
    pub rtc_port: Option<u16>,

    /// IP address put in the ICE host candidates (repeatable; comma separated in
    /// the environment variable). Default: the machine's non-loopback interface
    /// addresses, or 127.0.0.1 when --listen is a loopback address.
    #[arg(
        long = "announce-ip",
        env = "VOICE_RELAY_ANNOUNCE_IP",
        value_delimiter = ','
    )]
    pub announce_ip: Vec<IpAddr>,

    /// A stream whose sender delivers no RTP for this many seconds ends.
    #[arg(long, env = "VOICE_RELAY_SENDER_IDLE_SECS", default_value_t = 20)]
    pub sender_idle_secs: u64,

    /// A peer that has not completed ICE and DTLS after this many seconds is dropped.
    #[arg(long, env = "VOICE_RELAY_HANDSHAKE_TIMEOUT_SECS", default_value_t = 15)]
    pub handshake_timeout_secs: u64,

    /// Threads that forward one packet of a stream with many receivers
    /// (at least 128 per thread); 0 = one per CPU core, at most 4.
    #[arg(long, env = "VOICE_RELAY_FORWARD_THREADS", default_value_t = 0)]
    pub forward_threads: usize,

    /// Largest WebSocket message accepted from a client, in bytes.
    #[arg(long, env = "VOICE_RELAY_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,

    /// Serve HTTPS and WSS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "VOICE_RELAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) for --tls-cert.
    #[arg(long, env = "VOICE_RELAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Serve HTTPS and WSS with a self-signed certificate made for the
    /// announced IPs and --tls-hostname names, kept in --data-dir and reused
    /// across restarts. Its CA is offered at /ca.crt.
    #[arg(long, env = "VOICE_RELAY_TLS_SELF_SIGNED", conflicts_with = "tls_cert")]
    pub tls_self_signed: bool,

    /// Extra host name for the self-signed certificate (repeatable).
    #[arg(
        long = "tls-hostname",
        env = "VOICE_RELAY_TLS_HOSTNAME",
        value_delimiter = ','
    )]
    pub tls_hostname: Vec<String>,

    /// Where generated state (the self-signed certificate) is kept.
    #[arg(long, env = "VOICE_RELAY_DATA_DIR", default_value = "voice-relay-data")]
    pub data_dir: PathBuf,

    /// An extra plain-HTTP listener serving only /stream/*.mp3, /stream/status
    /// and /health, for speakers that refuse self-signed HTTPS (e.g. 0.0.0.0:8081).
    #[arg(long, env = "VOICE_RELAY_AUDIO_LISTEN")]
    pub audio_listen: Option<SocketAddr>,

    /// Token that grants everything; clients present it as `?token=` or
    /// `Authorization: Bearer`. Off by default (home use).
    #[arg(long, env = "VOICE_RELAY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Read --token from this file (first line).
    #[arg(long, env = "VOICE_RELAY_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,

    /// Token that grants sending (and listening).
    #[arg(long, env = "VOICE_RELAY_SEND_TOKEN", hide_env_values = true)]
    pub send_token: Option<String>,

    /// Token that grants listening (WebRTC receiving, MP3, status).
    #[arg(long, env = "VOICE_RELAY_LISTEN_TOKEN", hide_env_values = true)]
    pub listen_token: Option<String>,

    /// Web origin allowed to open the WebSocket, e.g. https://ha.local:8123
    /// (repeatable). Default: any origin.
    #[arg(
        long = "allowed-origin",
        env = "VOICE_RELAY_ALLOWED_ORIGIN",
        value_delimiter = ','
    )]
    pub allowed_origin: Vec<String>,

    /// Most streams live at once.
    #[arg(long, env = "VOICE_RELAY_MAX_STREAMS", default_value_t = 64)]
    pub max_streams: usize,

    /// Most WebRTC receivers of one stream.
    #[arg(
        long,
        env = "VOICE_RELAY_MAX_RECEIVERS_PER_STREAM",
        default_value_t = 4000
    )]
    pub max_receivers_per_stream: usize,

    /// Most WebRTC receivers in all.
    #[arg(long, env = "VOICE_RELAY_MAX_RECEIVERS", default_value_t = 8000)]
    pub max_receivers: usize,

    /// Most MP3 listeners of one stream.
    #[arg(
        long,
        env = "VOICE_RELAY_MAX_LISTENERS_PER_STREAM",
        default_value_t = 18000
    )]
    pub max_listeners_per_stream: usize,

    /// Most MP3 listeners in all.
    #[arg(long, env = "VOICE_RELAY_MAX_LISTENERS", default_value_t = 18000)]
    pub max_listeners: usize,

    /// Most WebSocket connections from one IP address.
    #[arg(
        long,
        env = "VOICE_RELAY_MAX_CONNECTIONS_PER_IP",
        default_value_t = 200
    )]
    pub max_connections_per_ip: usize,

    /// Messages per second a WebSocket client may send (bursts of twice this).
    #[arg(long, env = "VOICE_RELAY_MAX_MESSAGES_PER_SEC", default_value_t = 20)]
    pub max_messages_per_sec: u32,

    /// Address or network (ADDR/PREFIX) of a reverse proxy (repeatable; comma
    /// separated in the environment variable). Only for connections from
    /// these, the client address is taken from X-Forwarded-For (or
    /// Forwarded): the right-most address that is not a trusted proxy. The
    /// per-address connection limit counts that address.
    #[arg(
        long = "trusted-proxy",
        env = "VOICE_RELAY_TRUSTED_PROXY",
        value_delimiter = ','
    )]
    pub trusted_proxy: Vec<ProxyNet>,

    /// Read options from this JSON file (a Home Assistant add-on's
    /// options). Default: /data/options.json when it exists. Flags and
    /// environment variables win over the file.
    #[arg(long, env = "VOICE_RELAY_OPTIONS_FILE")]
    pub options_file: Option<PathBuf>,

    /// Directory the options file's certfile and keyfile are relative to.
    #[arg(long, env = "VOICE_RELAY_SSL_DIR", default_value = "/ssl")]
    pub ssl_dir: PathBuf,

    /// Log level of the relay's messages (RUST_LOG, when set, wins).
    #[arg(long, env = "VOICE_RELAY_LOG_LEVEL", default_value = "info",
          value_parser = clap::builder::PossibleValuesParser::new(LOG_LEVELS))]
    pub log_level: String,

    /// MP3 bit rate in kbit/s (CBR).
    #[arg(long, env = "VOICE_RELAY_MP3_BITRATE", default_value_t = 128)]
    pub mp3_bitrate: u32,

    /// Milliseconds of recent MP3 audio sent at once to a new listener, at
    /// least (the burst's time floor; also the Ogg/Opus burst).
    #[arg(long, env = "VOICE_RELAY_MP3_BURST_MS", default_value_t = 1000)]
    pub mp3_burst_ms: u32,

    /// Bytes of recent MP3 audio sent at once to a new listener, at least:
    /// browsers (about 32 KB) and ffmpeg (about 20 KB) read this much before
    /// they play, so a burst this large lets them start at once.
    #[arg(long, env = "VOICE_RELAY_MP3_BURST_BYTES", default_value_t = crate::mp3::DEFAULT_BURST_BYTES,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(crate::mp3::MAX_BURST_BYTES)))]
    pub mp3_burst_bytes: u32,

    /// How long `/stream/latest.mp3` waits for a stream to start when none is
    /// live, in milliseconds (a request may ask for less or more with
    /// `?wait=SECONDS`, at most 30 s).
    #[arg(long, env = "VOICE_RELAY_MP3_WAIT_MS", default_value_t = 5000)]
    pub mp3_wait_ms: u64,
}

/// What `voice-relay` does besides running the server.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Action {
    /// Probe the running server (exit status 0 when healthy, 1 otherwise).
    ///
    /// GET /health on the --listen address (on 127.0.0.1 when it is 0.0.0.0;
    /// over TLS, any certificate accepted, when TLS is configured). Reads the
    /// same flags, environment and options file as the server:
    /// `voice-relay [FLAGS] health`.
    Health {
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 5)]
        timeout_secs: u64,
    },
}

impl Config {
    /// Whether the main listener serves HTTPS.
    pub fn serves_tls(&self) -> bool {
        self.tls_cert.is_some() || self.tls_self_signed
    }

    /// The UDP address the media socket binds.
    pub fn rtc_bind(&self) -> SocketAddr {
        SocketAddr::new(
            self.listen.ip(),
            self.rtc_port.unwrap_or(self.listen.port()),
        )
    }

    /// The addresses announced in ICE host candidates.
    pub fn announce_ips(&self) -> Vec<IpAddr> {
        if !self.announce_ip.is_empty() {
            return self.announce_ip.clone();
        }
        let ip = self.listen.ip();
        if ip.is_loopback() {
            return vec![ip];
        }
        if !ip.is_unspecified() {
            return vec![ip];
        }
        let found = interface_addresses();
        if found.is_empty() {
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]
        } else {
            found
        }
    }

    pub fn limits(&self) -> Limits {
        Limits {
            streams: self.max_streams,
            receivers_per_stream: self.max_receivers_per_stream,
            receivers: self.max_receivers,
            listeners_per_stream: self.max_listeners_per_stream,
            listeners: self.max_listeners,
            connections_per_ip: self.max_connections_per_ip,
            messages_per_sec: self.max_messages_per_sec.max(1),
        }
    }

    /// The access rules (reads --token-file).
    pub fn access(&self) -> std::io::Result<Access> {
        let token = match &self.token_file {
            Some(path) => std::fs::read_to_string(path)?
                .lines()
                .next()
                .map(|l| l.trim().to_owned())
                .filter(|t| !t.is_empty()),
            None => self.token.clone(),
        };
        let nonempty = |t: &Option<String>| t.clone().filter(|t| !t.is_empty());
        Ok(Access {
            token,
            send_token: nonempty(&self.send_token),
            listen_token: nonempty(&self.listen_token),
            allowed_origins: self.allowed_origin.clone(),
        })
    }

    /// The proxies whose forwarded client addresses are believed.
    pub fn trusted_proxies(&self) -> TrustedProxies {
        TrustedProxies::new(self.trusted_proxy.clone())
    }

    pub fn sender_idle(&self) -> Duration {
        Duration::from_secs(self.sender_idle_secs.max(1))
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs.max(1))
    }
}

/// Bounds on what clients may use; hitting one gives a clear error.
#[derive(Debug, Clone)]
pub struct Limits {
    pub streams: usize,
    pub receivers_per_stream: usize,
    pub receivers: usize,
    pub listeners_per_stream: usize,
    pub listeners: usize,
    pub connections_per_ip: usize,
    pub messages_per_sec: u32,
}

/// The IPv4 addresses of the machine's non-loopback, up interfaces.
fn interface_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    // SAFETY: getifaddrs fills a linked list that we walk read-only and free once.
    unsafe {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut cur = list;
        while !cur.is_null() {
            let ifa = &*cur;
            let up = ifa.ifa_flags & (libc::IFF_UP as u32) != 0;
            let loopback = ifa.ifa_flags & (libc::IFF_LOOPBACK as u32) != 0;
            if up && !loopback && !ifa.ifa_addr.is_null() {
                let family = (*ifa.ifa_addr).sa_family as i32;
                if family == libc::AF_INET {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                    if !ip.is_link_local() && !out.contains(&IpAddr::V4(ip)) {
                        out.push(IpAddr::V4(ip));
                    }
                }
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        let mut v = vec!["voice-relay"];
        v.extend_from_slice(args);
        Config::try_parse_from(v).expect("valid args")
    }

    #[test]
    fn rtc_port_defaults_to_listen_port() {
        let c = parse(&["--listen", "127.0.0.1:9000"]);
        assert_eq!(c.rtc_bind(), "127.0.0.1:9000".parse().unwrap());
        let c = parse(&["--listen", "127.0.0.1:9000", "--rtc-port", "9100"]);
        assert_eq!(c.rtc_bind().port(), 9100);
    }

    #[test]
    fn loopback_listen_announces_loopback() {
        let c = parse(&["--listen", "127.0.0.1:9000"]);
        assert_eq!(
            c.announce_ips(),
            vec!["127.0.0.1".parse::<IpAddr>().unwrap()]
        );
        let c = parse(&["--announce-ip", "10.0.0.5", "--announce-ip", "10.0.0.6"]);
        assert_eq!(c.announce_ips().len(), 2);
    }
}
