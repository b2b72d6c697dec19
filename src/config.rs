//! Configuration: every command-line option, each also readable from a
//! `VOICE_RELAY_*` environment variable, and the values derived from them
//! (the UDP port for media, the addresses announced in ICE candidates).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::access::Access;
use crate::ice_servers::{IceServer, IceServers};
use crate::icecast::{IcecastUrl, Password};
use crate::proxy::{ProxyNet, TrustedProxies};
use crate::whip_push::PushTarget;

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

    /// A STUN or TURN server handed to clients (repeatable; comma separated
    /// in the environment variable): `URI[;key=value]...`, the URI
    /// `stun:HOST[:PORT]`, `turn:HOST[:PORT][?transport=udp|tcp]` or
    /// `turns:...` (RFC 7064/7065); for TURN either `username=U;credential=P`
    /// (or `credential-file=F`, `credential-env=VAR`) or a TURN REST shared
    /// secret `secret=S` (or `secret-file=F`, `secret-env=VAR`) from which
    /// each client gets its own short-lived credential. Values are
    /// percent-decoded (write `;` `,` `%` as %3B %2C %25).
    #[arg(
        long = "ice-server",
        env = "VOICE_RELAY_ICE_SERVER",
        value_delimiter = ',',
        hide_env_values = true,
        value_name = "SPEC"
    )]
    pub ice_server: Vec<String>,

    /// Lifetime in seconds of the TURN REST credentials handed to clients
    /// (a TURN server refuses them, refreshes of a relay included, once expired).
    #[arg(long, env = "VOICE_RELAY_ICE_CREDENTIAL_TTL", default_value_t = 86400,
          value_parser = clap::value_parser!(u64).range(60..=30 * 86400))]
    pub ice_credential_ttl: u64,
    /// Also publish every stream to this WHIP endpoint (repeatable; comma
    /// separated in the environment variable), as a WHIP client forwarding
    /// the same RTP: e.g. another voice-relay's ingest,
    /// http://edge:8080/whip/{id}. `{id}` is replaced by the stream id.
    /// http:// only.
    #[arg(
        long = "whip-push",
        env = "VOICE_RELAY_WHIP_PUSH",
        value_delimiter = ','
    )]
    pub whip_push: Vec<PushTarget>,

    /// Bearer token sent with every --whip-push request.
    #[arg(long, env = "VOICE_RELAY_WHIP_PUSH_TOKEN", hide_env_values = true)]
    pub whip_push_token: Option<String>,

    /// Read --whip-push-token from this file (first line).
    #[arg(
        long,
        env = "VOICE_RELAY_WHIP_PUSH_TOKEN_FILE",
        conflicts_with = "whip_push_token"
    )]
    pub whip_push_token_file: Option<PathBuf>,

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

    /// Push every stream to an Icecast 2.4 server as a source (repeatable;
    /// comma separated in the environment variable), e.g.
    /// `icecast://source:PASS@HOST:8000/{id}.mp3`: `{id}` is the stream id; a
    /// mount without it (`/live.mp3`) carries the newest stream; a mount
    /// ending in `.ogg` gets Ogg/Opus, any other MP3.
    #[arg(
        long = "icecast",
        env = "VOICE_RELAY_ICECAST",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub icecast: Vec<IcecastUrl>,

    /// Icecast source password for --icecast URLs that have none.
    #[arg(long, env = "VOICE_RELAY_ICECAST_PASSWORD", hide_env_values = true)]
    pub icecast_password: Option<Password>,

    /// Read the Icecast source password from this file (first line).
    #[arg(
        long,
        env = "VOICE_RELAY_ICECAST_PASSWORD_FILE",
        conflicts_with = "icecast_password"
    )]
    pub icecast_password_file: Option<PathBuf>,

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
            Some(path) => first_line(path)?,
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

    /// The --whip-push token (reads --whip-push-token-file). It goes into
    /// an HTTP header, so control characters are refused.
    pub fn whip_push_token(&self) -> std::io::Result<Option<String>> {
        let token = match &self.whip_push_token_file {
            Some(path) => first_line(path)?,
            None => self.whip_push_token.clone().filter(|t| !t.is_empty()),
        };
        if token
            .as_ref()
            .is_some_and(|t| t.chars().any(char::is_control))
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the WHIP push token has control characters",
            ));
        }
        Ok(token)
    }

    /// The proxies whose forwarded client addresses are believed.
    pub fn trusted_proxies(&self) -> TrustedProxies {
        TrustedProxies::new(self.trusted_proxy.clone())
    }

    /// The STUN/TURN servers handed to clients; an error names the server
    /// by its URI only (never its credentials).
    pub fn ice_servers(&self) -> Result<IceServers, String> {
        let servers = self
            .ice_server
            .iter()
            .map(|spec| {
                spec.parse::<IceServer>().map_err(|e| {
                    let uri = spec.split(';').next().unwrap_or_default().trim();
                    format!("--ice-server {uri}: {e}")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(IceServers::new(
            servers,
            Duration::from_secs(self.ice_credential_ttl),
        ))
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

/// The first line of a secret's file, trimmed; `None` if empty.
fn first_line(path: &std::path::Path) -> std::io::Result<Option<String>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .next()
        .map(|l| l.trim().to_owned())
        .filter(|t| !t.is_empty()))
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
    fn a_bad_ice_server_is_named_by_its_uri_not_its_credential() {
        let c = parse(&[
            "--ice-server",
            "stun:h",
            "--ice-server",
            "turn:h:0;username=u;credential=hunter2",
        ]);
        let e = c.ice_servers().expect_err("port 0");
        assert!(e.starts_with("--ice-server turn:h:0: bad port"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let c = parse(&["--ice-server", "stun:h,turn:h?transport=tcp;secret=s"]);
        assert_eq!(
            c.ice_servers().expect("valid").uris(),
            ["stun:h", "turn:h?transport=tcp"]
        );
    }

    #[test]
    fn whip_push_targets_and_token() {
        let c = parse(&[
            "--whip-push",
            "http://127.0.0.1:9000/whip/{id}",
            "--whip-push",
            "http://edge/w/{id}",
            "--whip-push-token",
            "t0k",
        ]);
        assert_eq!(c.whip_push.len(), 2);
        assert_eq!(c.whip_push_token().unwrap().as_deref(), Some("t0k"));
        let c = parse(&["--whip-push-token", "a\r\nX-Injected: 1"]);
        assert!(c.whip_push_token().is_err(), "no header injection");
        assert!(
            Config::try_parse_from(["voice-relay", "--whip-push", "https://edge/whip"]).is_err(),
            "https is refused at startup"
        );
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
