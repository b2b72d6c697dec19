//! The options file: the JSON a Home Assistant add-on's options become
//! (`/data/options.json`), read by the binary itself so the image needs no
//! shell. Owns finding the file, checking every key's type and value (an
//! error names the key), and applying it to the [`Config`]. Precedence:
//! command-line flag > environment variable > options file > default. An
//! unknown key is reported, not fatal, so an older binary survives a newer
//! options file.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, FromArgMatches};
use serde_json::{Map, Value};

use crate::config::{Config, LOG_LEVELS};
use crate::ice_servers::IceServer;
use crate::icecast::{IcecastUrl, Password};
use crate::proxy::ProxyNet;
use crate::whip_push::PushTarget;

/// Where the Home Assistant Supervisor puts an add-on's options.
pub const ADDON_OPTIONS: &str = "/data/options.json";

/// MP3 bit rates LAME offers for 48 kHz (MPEG-1 Layer III).
const MP3_BITRATES: [u64; 13] = [32, 40, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320];

/// A problem with the options file; the message names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("options file {path}: {problem}")]
    File { path: PathBuf, problem: String },
    #[error("options file {path}: option \"{key}\" {problem}")]
    Key {
        path: PathBuf,
        key: String,
        problem: String,
    },
}

/// The configuration, and what the options file did to it.
#[derive(Debug)]
pub struct Configured {
    pub config: Config,
    /// The options file applied, if any.
    pub options_file: Option<PathBuf>,
    /// Keys of the options file this version does not know (ignored).
    pub unknown_keys: Vec<String>,
}

/// Builds the configuration from parsed flags and environment, then the
/// options file (`--options-file`, or `/data/options.json` when present).
pub fn configure(matches: &ArgMatches) -> Result<Configured, anyhow::Error> {
    let mut config = Config::from_arg_matches(matches)?;
    let path = match &config.options_file {
        Some(path) => Some(path.clone()),
        None => Some(PathBuf::from(ADDON_OPTIONS)).filter(|p| p.is_file()),
    };
    let Some(path) = path else {
        return Ok(Configured {
            config,
            options_file: None,
            unknown_keys: Vec::new(),
        });
    };
    let text = std::fs::read_to_string(&path).map_err(|e| OptionsError::File {
        path: path.clone(),
        problem: format!("cannot be read: {e}"),
    })?;
    let (options, unknown_keys) = AddonOptions::parse(&text).map_err(|e| e.in_file(&path))?;
    options
        .apply(&mut config, &|id| given(matches, id), &path)
        .map_err(|e| e.in_file(&path))?;
    Ok(Configured {
        config,
        options_file: Some(path),
        unknown_keys,
    })
}

/// Whether the argument `id` was set by a flag or an environment variable.
fn given(matches: &ArgMatches, id: &str) -> bool {
    matches!(
        matches.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// An error before the file's path is attached.
#[derive(Debug)]
enum Problem {
    File(String),
    Key(&'static str, String),
}

impl Problem {
    fn in_file(self, path: &Path) -> OptionsError {
        let path = path.to_owned();
        match self {
            Problem::File(problem) => OptionsError::File { path, problem },
            Problem::Key(key, problem) => OptionsError::Key {
                path,
                key: key.to_owned(),
                problem,
            },
        }
    }
}

/// Every option the add-on offers, checked. `None`: not in the file (or null).
#[derive(Debug, Default, PartialEq)]
pub struct AddonOptions {
    pub ssl: Option<bool>,
    pub certfile: Option<String>,
    pub keyfile: Option<String>,
    pub port: Option<u16>,
    pub audio_port: Option<u16>,
    pub announce_ips: Option<Vec<IpAddr>>,
    pub tls_hostnames: Option<Vec<String>>,
    pub token: Option<String>,
    pub send_token: Option<String>,
    pub listen_token: Option<String>,
    pub allowed_origins: Option<Vec<String>>,
    pub trusted_proxies: Option<Vec<ProxyNet>>,
    /// `--ice-server` specs, each checked (credentials included) when read.
    pub ice_servers: Option<Vec<String>>,
    pub ice_credential_ttl: Option<u64>,
    pub icecast: Option<Vec<IcecastUrl>>,
    pub icecast_password: Option<String>,
    pub mp3_bitrate: Option<u32>,
    pub mp3_burst_ms: Option<u32>,
    pub mp3_burst_bytes: Option<u32>,
    pub max_streams: Option<usize>,
    pub max_receivers_per_stream: Option<usize>,
    pub max_receivers: Option<usize>,
    pub max_listeners_per_stream: Option<usize>,
    pub max_listeners: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub max_messages_per_sec: Option<u32>,
    pub log_level: Option<String>,
    pub whip_push: Option<Vec<PushTarget>>,
    pub whip_push_token: Option<String>,
}

/// Largest value of a limit option.
const LIMIT_MAX: u64 = 1_000_000;

impl AddonOptions {
    /// Parses and checks the file's text; also returns the unknown keys.
    fn parse(text: &str) -> Result<(Self, Vec<String>), Problem> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Problem::File(format!("is not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(Problem::File("must hold a JSON object".into()));
        };
        Self::from_map(map)
    }

    fn from_map(map: Map<String, Value>) -> Result<(Self, Vec<String>), Problem> {
        let mut o = AddonOptions::default();
        let mut unknown = Vec::new();
        for (key, value) in map {
            if value.is_null() {
                continue;
            }
            let v = &value;
            match key.as_str() {
                "ssl" => o.ssl = Some(check("ssl", boolean(v))?),
                "certfile" => o.certfile = check("certfile", text(v))?.filter_empty(),
                "keyfile" => o.keyfile = check("keyfile", text(v))?.filter_empty(),
                "port" => o.port = Some(check("port", integer(v, 1, 65535))? as u16),
                "audio_port" => {
                    o.audio_port = Some(check("audio_port", integer(v, 0, 65535))? as u16)
                }
                "announce_ips" => o.announce_ips = Some(check("announce_ips", list(v, ip))?),
                "tls_hostnames" => o.tls_hostnames = Some(check("tls_hostnames", list(v, text))?),
                "token" => o.token = check("token", secret(v))?.filter_empty(),
                "send_token" => o.send_token = check("send_token", secret(v))?.filter_empty(),
                "listen_token" => o.listen_token = check("listen_token", secret(v))?.filter_empty(),
                "allowed_origins" => {
                    o.allowed_origins = Some(check("allowed_origins", list(v, text))?)
                }
                "trusted_proxies" => {
                    o.trusted_proxies = Some(check("trusted_proxies", list(v, proxy_net))?)
                }
                "ice_servers" => o.ice_servers = Some(check("ice_servers", list(v, ice_server))?),
                "ice_credential_ttl" => {
                    o.ice_credential_ttl =
                        Some(check("ice_credential_ttl", integer(v, 60, 30 * 86400))?)
                }
                "icecast" => o.icecast = Some(check("icecast", list(v, icecast_url))?),
                "icecast_password" => {
                    o.icecast_password = check("icecast_password", secret(v))?.filter_empty()
                }
                "mp3_bitrate" => o.mp3_bitrate = Some(check("mp3_bitrate", bitrate(v))?),
                "mp3_burst_ms" => {
                    o.mp3_burst_ms = Some(check("mp3_burst_ms", integer(v, 0, 60_000))? as u32)
                }
                "mp3_burst_bytes" => {
                    let max = u64::from(crate::mp3::MAX_BURST_BYTES);
                    o.mp3_burst_bytes = Some(check("mp3_burst_bytes", integer(v, 0, max))? as u32)
                }
                "max_streams" => o.max_streams = Some(limit("max_streams", v)?),
                "max_receivers_per_stream" => {
                    o.max_receivers_per_stream = Some(limit("max_receivers_per_stream", v)?)
                }
                "max_receivers" => o.max_receivers = Some(limit("max_receivers", v)?),
                "max_listeners_per_stream" => {
                    o.max_listeners_per_stream = Some(limit("max_listeners_per_stream", v)?)
                }
                "max_listeners" => o.max_listeners = Some(limit("max_listeners", v)?),
                "max_connections_per_ip" => {
                    o.max_connections_per_ip = Some(limit("max_connections_per_ip", v)?)
                }
                "max_messages_per_sec" => {
                    o.max_messages_per_sec = Some(limit("max_messages_per_sec", v)? as u32)
                }
                "log_level" => o.log_level = Some(check("log_level", log_level(v))?),
                "whip_push" => o.whip_push = Some(check("whip_push", list(v, push_target))?),
                "whip_push_token" => {
                    o.whip_push_token = check("whip_push_token", secret(v))?.filter_empty()
                }
                _ => unknown.push(key),
            }
        }
        if o.certfile.is_some() != o.keyfile.is_some() {
            let missing = if o.certfile.is_some() {
                "keyfile"
            } else {
                "certfile"
            };
            return Err(Problem::Key(
                missing,
                "is needed too: certfile and keyfile go together".into(),
            ));
        }
        Ok((o, unknown))
    }

    /// Sets each setting the options file has and no flag or environment
    /// variable set (`explicit` says which arguments were given).
    fn apply(
        self,
        config: &mut Config,
        explicit: &dyn Fn(&str) -> bool,
        file: &Path,
    ) -> Result<(), Problem> {
        self.apply_tls(config, explicit)?;
        if let Some(port) = self.port.filter(|_| !explicit("listen")) {
            config.listen = SocketAddr::new(config.listen.ip(), port);
        }
        if let Some(port) = self.audio_port.filter(|_| !explicit("audio_listen")) {
            config.audio_listen = (port != 0).then(|| SocketAddr::new(config.listen.ip(), port));
        }
        if !explicit("data_dir") {
            // State (the self-signed CA) is kept next to the options file:
            // /data for the add-on.
            if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
                config.data_dir = dir.to_owned();
            }
        }
        // Settings whose option, flag and field share a name.
        macro_rules! fill_same {
            ($($name:ident),*) => {$(
                fill(explicit, stringify!($name), &mut config.$name, self.$name);
            )*};
        }
        fill_same!(
            mp3_bitrate,
            mp3_burst_ms,
            mp3_burst_bytes,
            max_streams,
            max_receivers_per_stream,
            max_receivers,
            max_listeners_per_stream,
            max_listeners,
            max_connections_per_ip,
            max_messages_per_sec,
            log_level,
            ice_credential_ttl
        );
        // Lists: the option's name is the flag's plural.
        let announce = self.announce_ips;
        fill(explicit, "announce_ip", &mut config.announce_ip, announce);
        let hostnames = self.tls_hostnames;
        fill(
            explicit,
            "tls_hostname",
            &mut config.tls_hostname,
            hostnames,
        );
        let origins = self.allowed_origins;
        fill(
            explicit,
            "allowed_origin",
            &mut config.allowed_origin,
            origins,
        );
        let ice_servers = self.ice_servers;
        fill(explicit, "ice_server", &mut config.ice_server, ice_servers);
        let proxies = self.trusted_proxies;
        fill(
            explicit,
            "trusted_proxy",
            &mut config.trusted_proxy,
            proxies,
        );
        let icecast = self.icecast;
        fill(explicit, "icecast", &mut config.icecast, icecast);
        if !explicit("icecast_password_file") {
            let password = self.icecast_password.map(Password::new);
            fill_some(
                explicit,
                "icecast_password",
                &mut config.icecast_password,
                password,
            );
        }
        if !explicit("token_file") {
            fill_some(explicit, "token", &mut config.token, self.token);
        }
        let (send, listen) = (self.send_token, self.listen_token);
        fill_some(explicit, "send_token", &mut config.send_token, send);
        fill_some(explicit, "listen_token", &mut config.listen_token, listen);
        fill(explicit, "whip_push", &mut config.whip_push, self.whip_push);
        if !explicit("whip_push_token_file") {
            let token = self.whip_push_token;
            fill_some(
                explicit,
                "whip_push_token",
                &mut config.whip_push_token,
                token,
            );
        }
        Ok(())
    }

    /// `ssl`: with `certfile`/`keyfile` (relative to `--ssl-dir`, `/ssl` by
    /// default), serve them; without, a self-signed certificate. Left alone
    /// when a TLS flag or variable is given.
    fn apply_tls(
        &self,
        config: &mut Config,
        explicit: &dyn Fn(&str) -> bool,
    ) -> Result<(), Problem> {
        if ["tls_cert", "tls_key", "tls_self_signed"]
            .iter()
            .any(|id| explicit(id))
            || self.ssl != Some(true)
        {
            return Ok(());
        }
        match (&self.certfile, &self.keyfile) {
            (Some(cert), Some(key)) => {
                config.tls_cert = Some(existing_file("certfile", &config.ssl_dir, cert)?);
                config.tls_key = Some(existing_file("keyfile", &config.ssl_dir, key)?);
                config.tls_self_signed = false;
            }
            _ => config.tls_self_signed = true,
        }
        Ok(())
    }
}

/// `name` under `dir` (or itself when absolute); it must exist.
fn existing_file(key: &'static str, dir: &Path, name: &str) -> Result<PathBuf, Problem> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Problem::Key(
            key,
            format!("names {}, which does not exist", path.display()),
        ))
    }
}

/// Sets `field` from the options file unless the argument `id` was given.
fn fill<T>(explicit: &dyn Fn(&str) -> bool, id: &str, field: &mut T, value: Option<T>) {
    if let Some(value) = value {
        if !explicit(id) {
            *field = value;
        }
    }
}

fn fill_some<T>(
    explicit: &dyn Fn(&str) -> bool,
    id: &str,
    field: &mut Option<T>,
    value: Option<T>,
) {
    fill(explicit, id, field, value.map(Some));
}

trait FilterEmpty {
    fn filter_empty(self) -> Option<String>;
}

impl FilterEmpty for String {
    /// An empty text field means "not set" (Home Assistant's UI sends "").
    fn filter_empty(self) -> Option<String> {
        let t = self.trim();
        (!t.is_empty()).then(|| t.to_owned())
    }
}

fn check<T>(key: &'static str, r: Result<T, String>) -> Result<T, Problem> {
    r.map_err(|problem| Problem::Key(key, problem))
}

fn limit(key: &'static str, v: &Value) -> Result<usize, Problem> {
    check(key, integer(v, 1, LIMIT_MAX)).map(|n| n as usize)
}

/// How a value looks in an error message (bounded).
fn shown(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

fn boolean(v: &Value) -> Result<bool, String> {
    v.as_bool()
        .ok_or_else(|| format!("must be true or false, got {}", shown(v)))
}

fn text(v: &Value) -> Result<String, String> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("must be a text, got {}", shown(v)))
}

/// A token: an error never shows the value, only its kind.
fn secret(v: &Value) -> Result<String, String> {
    let kind = match v {
        Value::String(s) => return Ok(s.clone()),
        Value::Number(_) => "a number",
        Value::Bool(_) => "true or false",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
        Value::Null => "null",
    };
    Err(format!("must be a text, got {kind}"))
}

fn integer(v: &Value, min: u64, max: u64) -> Result<u64, String> {
    v.as_u64()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| {
            format!(
                "must be a whole number from {min} to {max}, got {}",
                shown(v)
            )
        })
}

fn bitrate(v: &Value) -> Result<u32, String> {
    match v.as_u64() {
        Some(n) if MP3_BITRATES.contains(&n) => Ok(n as u32),
        _ => Err(format!(
            "must be one of {MP3_BITRATES:?} (kbit/s), got {}",
            shown(v)
        )),
    }
}

fn log_level(v: &Value) -> Result<String, String> {
    match v.as_str() {
        Some(l) if LOG_LEVELS.contains(&l) => Ok(l.to_owned()),
        _ => Err(format!("must be one of {LOG_LEVELS:?}, got {}", shown(v))),
    }
}

fn ip(v: &Value) -> Result<IpAddr, String> {
    let t = text(v)?;
    t.trim()
        .parse()
        .map_err(|_| format!("must be an IP address, got {}", shown(v)))
}

fn proxy_net(v: &Value) -> Result<ProxyNet, String> {
    let t = text(v)?;
    t.parse()
        .map_err(|e| format!("must be an address or ADDR/PREFIX, got {}: {e}", shown(v)))
}

/// An `--ice-server` spec; an error names its URI, never its credentials.
fn ice_server(v: &Value) -> Result<String, String> {
    let spec = secret(v)?;
    match spec.parse::<IceServer>() {
        Ok(_) => Ok(spec),
        Err(e) => {
            let uri = spec.split(';').next().unwrap_or_default().trim();
            Err(format!("{uri}: {e}"))
        }
    }
}

fn push_target(v: &Value) -> Result<PushTarget, String> {
    let t = text(v)?;
    t.trim()
        .parse()
        .map_err(|e| format!("must be an http:// WHIP URL, got {}: {e}", shown(v)))
}

/// An `--icecast` URL: an error never shows the value (it may hold a
/// password).
fn icecast_url(v: &Value) -> Result<IcecastUrl, String> {
    secret(v)?.parse().map_err(|e| {
        format!("must be an icecast://[USER[:PASSWORD]@]HOST[:PORT]/MOUNT URL; this one {e}")
    })
}

fn list<T>(v: &Value, item: fn(&Value) -> Result<T, String>) -> Result<Vec<T>, String> {
    let Value::Array(items) = v else {
        return Err(format!("must be a list, got {}", shown(v)));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, x)| item(x).map_err(|e| format!("item {}: {e}", i + 1)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Flags `args`, then the options `json`, as if read from `dir/options.json`.
    fn configured(args: &[&str], json: &str, dir: &Path) -> Result<Config, String> {
        let mut argv = vec!["voice-relay"];
        argv.extend_from_slice(args);
        let matches = Config::command()
            .try_get_matches_from(argv)
            .map_err(|e| e.to_string())?;
        let path = dir.join("options.json");
        std::fs::write(&path, json).map_err(|e| e.to_string())?;
        let mut config = Config::from_arg_matches(&matches).map_err(|e| e.to_string())?;
        let (options, _) = AddonOptions::parse(json).map_err(|e| e.in_file(&path).to_string())?;
        options
            .apply(&mut config, &|id| given(&matches, id), &path)
            .map_err(|e| e.in_file(&path).to_string())?;
        Ok(config)
    }

    fn tmp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("voice-relay-options-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn options_fill_what_flags_left_at_default() {
        let dir = tmp("fill");
        let c = configured(
            &["--max-streams", "7"],
            r#"{"port": 8443, "audio_port": 8081, "max_streams": 3, "max_listeners": 9,
                "mp3_bitrate": 64, "token": "t", "log_level": "debug", "ssl": false}"#,
            &dir,
        )
        .unwrap();
        assert_eq!(c.listen, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(c.audio_listen, Some("0.0.0.0:8081".parse().unwrap()));
        assert_eq!(c.max_streams, 7, "the flag wins");
        assert_eq!(c.max_listeners, 9);
        assert_eq!(c.mp3_bitrate, 64);
        assert_eq!(c.token.as_deref(), Some("t"));
        assert_eq!(c.log_level, "debug");
        assert_eq!(c.data_dir, dir, "state next to the options file");
        assert!(!c.serves_tls());

        let c = configured(
            &["--listen", "127.0.0.1:9000"],
            r#"{"port": 8443, "audio_port": 0}"#,
            &dir,
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.audio_listen, None);
    }

    #[test]
    fn every_option_reaches_its_setting() {
        let dir = tmp("every");
        let c = configured(
            &[],
            r#"{"announce_ips": ["192.0.2.7"], "tls_hostnames": ["relay.lan"],
                "allowed_origins": ["https://ha.lan:8123"], "trusted_proxies": ["127.0.0.1"],
                "send_token": "s", "listen_token": "l", "mp3_burst_ms": 1500, "mp3_burst_bytes": 16384,
                "max_receivers_per_stream": 11, "max_receivers": 12,
                "max_listeners_per_stream": 13, "max_listeners": 14,
                "max_connections_per_ip": 15, "max_messages_per_sec": 16,
                "whip_push": ["http://edge.lan:8080/whip/{id}"], "whip_push_token": "w",
                "icecast": ["icecast://ice.lan/{id}.mp3"], "icecast_password": "ip"}"#,
            &dir,
        )
        .unwrap();
        assert_eq!(c.announce_ip, vec!["192.0.2.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(c.tls_hostname, ["relay.lan"]);
        assert_eq!(c.allowed_origin, ["https://ha.lan:8123"]);
        assert_eq!(c.trusted_proxy.len(), 1);
        assert_eq!(c.send_token.as_deref(), Some("s"));
        assert_eq!(c.listen_token.as_deref(), Some("l"));
        assert_eq!(c.mp3_burst_ms, 1500);
        assert_eq!(c.mp3_burst_bytes, 16384);
        let limits = [
            c.max_receivers_per_stream,
            c.max_receivers,
            c.max_listeners_per_stream,
            c.max_listeners,
            c.max_connections_per_ip,
        ];
        assert_eq!(limits, [11, 12, 13, 14, 15]);
        assert_eq!(c.max_messages_per_sec, 16);
        assert_eq!(
            c.whip_push[0].for_stream("s").to_string(),
            "http://edge.lan:8080/whip/s"
        );
        assert_eq!(c.whip_push_token().unwrap().as_deref(), Some("w"));
        assert_eq!(c.icecast.len(), 1);
        assert_eq!(c.icecast[0].mount_for("s"), "/s.mp3");
        assert_eq!(c.icecast_password, Some(Password::new("ip")));
    }

    #[test]
    fn ice_servers_are_checked_and_applied() {
        let dir = tmp("ice");
        let c = configured(
            &[],
            r#"{"ice_servers": ["stun:turn.lan", "turn:turn.lan?transport=tcp;secret=s"],
                "ice_credential_ttl": 600}"#,
            &dir,
        )
        .unwrap();
        assert_eq!(c.ice_servers().unwrap().uris().len(), 2);
        assert_eq!(c.ice_credential_ttl, 600);
        let c = configured(
            &["--ice-server", "stun:flag.lan"],
            r#"{"ice_servers": ["stun:file.lan"]}"#,
            &dir,
        )
        .unwrap();
        assert_eq!(c.ice_server, ["stun:flag.lan"], "the flag wins");
        let err = configured(
            &[],
            r#"{"ice_servers": ["turn:turn.lan:0;username=u;credential=hunter2"]}"#,
            &dir,
        )
        .unwrap_err();
        assert!(
            err.contains("\"ice_servers\"") && err.contains("bad port"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn a_bad_icecast_url_is_refused_without_showing_it() {
        let dir = tmp("icecast");
        let err = configured(
            &[],
            r#"{"icecast": ["http://source:sekrit@h/x.mp3"]}"#,
            &dir,
        )
        .expect_err("refused");
        assert!(
            err.contains("\"icecast\"") && err.contains("icecast://"),
            "{err}"
        );
        assert!(!err.contains("sekrit"), "{err}");
        // A password file given as a flag wins over the option's password.
        let file = dir.join("pw");
        std::fs::write(&file, "f").unwrap();
        let flag = file.to_str().unwrap();
        let c = configured(
            &["--icecast-password-file", flag],
            r#"{"icecast_password": "ip"}"#,
            &dir,
        )
        .unwrap();
        assert_eq!(c.icecast_password, None);
    }

    #[test]
    fn ssl_with_and_without_files() {
        let dir = tmp("ssl");
        let c = configured(&[], r#"{"ssl": true}"#, &dir).unwrap();
        assert!(c.tls_self_signed && c.tls_cert.is_none());
        let ssl = dir.to_str().unwrap();
        let err = configured(
            &["--ssl-dir", ssl],
            r#"{"ssl": true, "certfile": "nope.pem", "keyfile": "key.pem"}"#,
            &dir,
        )
        .unwrap_err();
        assert!(
            err.contains("\"certfile\"") && err.contains("nope.pem"),
            "{err}"
        );
        std::fs::write(dir.join("cert.pem"), "x").unwrap();
        std::fs::write(dir.join("key.pem"), "x").unwrap();
        let c = configured(
            &["--ssl-dir", ssl],
            r#"{"ssl": true, "certfile": "cert.pem", "keyfile": "key.pem"}"#,
            &dir,
        )
        .unwrap();
        assert_eq!(c.tls_cert, Some(dir.join("cert.pem")));
        assert!(!c.tls_self_signed);
        // A TLS flag wins over the whole ssl group.
        let c = configured(
            &["--tls-self-signed"],
            r#"{"ssl": true, "certfile": "a", "keyfile": "b"}"#,
            &dir,
        )
        .unwrap();
        assert!(c.tls_self_signed && c.tls_cert.is_none());
        let err = configured(&[], r#"{"ssl": true, "certfile": "a"}"#, &dir).unwrap_err();
        assert!(err.contains("\"keyfile\""), "{err}");
    }

    #[test]
    fn wrong_values_name_the_key() {
        let dir = tmp("bad");
        for (json, key) in [
            (r#"{"port": "8443"}"#, "port"),
            (r#"{"port": 70000}"#, "port"),
            (r#"{"mp3_bitrate": 100}"#, "mp3_bitrate"),
            (r#"{"ssl": "yes"}"#, "ssl"),
            (r#"{"max_streams": 0}"#, "max_streams"),
            (r#"{"max_streams": -1}"#, "max_streams"),
            (r#"{"max_streams": 2.5}"#, "max_streams"),
            (r#"{"log_level": "loud"}"#, "log_level"),
            (r#"{"announce_ips": ["10.0.0.1", "ten"]}"#, "announce_ips"),
            (r#"{"trusted_proxies": "10.0.0.0/8"}"#, "trusted_proxies"),
            (r#"{"trusted_proxies": ["10.0.0.0/33"]}"#, "trusted_proxies"),
            (r#"{"token": 98765}"#, "token"),
            (r#"{"whip_push": ["https://edge/whip"]}"#, "whip_push"),
            (r#"{"whip_push_token": 98765}"#, "whip_push_token"),
        ] {
            let err = configured(&[], json, &dir).unwrap_err();
            assert!(err.contains(&format!("option \"{key}\"")), "{json}: {err}");
            assert!(!err.contains("98765"), "a token's value in an error: {err}");
        }
        let err = configured(&[], "[1, 2]", &dir).unwrap_err();
        assert!(err.contains("JSON object"), "{err}");
        let err = configured(&[], "{\"port\": ", &dir).unwrap_err();
        assert!(err.contains("not valid JSON"), "{err}");
    }

    #[test]
    fn unknown_keys_and_nulls_are_not_errors() {
        let (o, unknown) = AddonOptions::parse(
            r#"{"future_option": 1, "token": null, "certfile": "", "keyfile": ""}"#,
        )
        .unwrap();
        assert_eq!(unknown, vec!["future_option".to_owned()]);
        assert_eq!(o, AddonOptions::default());
    }
}
