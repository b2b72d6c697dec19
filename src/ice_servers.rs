//! ICE servers handed to clients (`--ice-server`): STUN and TURN URIs
//! (RFC 7064, RFC 7065) with their credentials, either a static password or a
//! TURN REST shared secret (coturn's `use-auth-secret`) from which each client
//! gets its own short-lived username and password. Owns parsing and checking
//! a server's spec, issuing credentials, and the two forms a client is handed:
//! `RTCIceServer` objects (WebSocket messages) and RFC 8288 `Link` header
//! values (WHIP/WHEP, RFC 9725). Secrets never appear in `Debug` output.
//!
//! A spec is `URI[;key=value]...` with the keys `username`, `credential`,
//! `credential-file`, `credential-env` (a static password) or `secret`,
//! `secret-file`, `secret-env` (a REST shared secret). Values are
//! percent-decoded; a file gives its first line.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use base64::Engine as _;
use serde::Serialize;

/// The default lifetime of a REST credential.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// One configured server: its URI and how a client authenticates to it.
#[derive(Clone, PartialEq)]
pub struct IceServer {
    uri: String,
    auth: Auth,
}

/// How a client authenticates to a server.
#[derive(Clone, PartialEq)]
enum Auth {
    /// A STUN server: no credentials.
    None,
    /// The same username and password for every client.
    Password { username: String, password: String },
    /// A TURN REST shared secret: each client gets its own username
    /// `<expiry>:<client id>` and password `base64(HMAC-SHA1(secret, username))`.
    Secret(String),
}

impl fmt::Debug for IceServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = match &self.auth {
            Auth::None => "none".to_owned(),
            Auth::Password { username, .. } => format!("password for {username:?}"),
            Auth::Secret(_) => "REST secret".to_owned(),
        };
        write!(f, "IceServer({}, {auth})", self.uri)
    }
}

/// What a client is handed for one server: the `RTCIceServer` dictionary of
/// the WebRTC API (`urls`, `username`, `credential`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RtcIceServer {
    pub urls: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// Every configured server and the lifetime of REST credentials.
#[derive(Debug, Clone, Default)]
pub struct IceServers {
    servers: Vec<IceServer>,
    ttl: Duration,
}

impl IceServers {
    pub fn new(servers: Vec<IceServer>, ttl: Duration) -> Self {
        Self { servers, ttl }
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// The servers' URIs (nothing secret), for the log.
    pub fn uris(&self) -> Vec<&str> {
        self.servers.iter().map(|s| s.uri.as_str()).collect()
    }

    /// The servers for one client, with fresh REST credentials valid until
    /// `now` + the lifetime.
    pub fn issue(&self, now: SystemTime) -> Vec<RtcIceServer> {
        let expiry = now
            .checked_add(self.ttl)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        self.servers
            .iter()
            .map(|server| server.issue(expiry))
            .collect()
    }

    /// The servers for one client, now.
    pub fn issue_now(&self) -> Vec<RtcIceServer> {
        self.issue(SystemTime::now())
    }
}

impl IceServer {
    fn issue(&self, expiry: u64) -> RtcIceServer {
        let (username, credential) = match &self.auth {
            Auth::None => (None, None),
            Auth::Password { username, password } => {
                (Some(username.clone()), Some(password.clone()))
            }
            Auth::Secret(secret) => {
                let username = format!("{expiry}:{}", client_id());
                let credential = rest_credential(secret, &username);
                (Some(username), Some(credential))
            }
        };
        RtcIceServer {
            urls: self.uri.clone(),
            username,
            credential,
        }
    }
}

/// A random id for one client's REST username (so that two clients never
/// share a username, even within the same second).
fn client_id() -> String {
    format!("vr{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// The TURN REST password for `username`: base64(HMAC-SHA1(secret, username)),
/// what coturn computes with `use-auth-secret`.
fn rest_credential(secret: &str, username: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.as_bytes());
    let tag = hmac::sign(&key, username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
}

impl RtcIceServer {
    /// The RFC 8288 `Link` header value of RFC 9725 section 4.6:
    /// `<uri>; rel="ice-server"` and, for TURN, the username, credential and
    /// `credential-type="password"` as quoted strings.
    pub fn link_value(&self) -> String {
        let mut value = format!("<{}>; rel=\"ice-server\"", self.urls);
        if let (Some(username), Some(credential)) = (&self.username, &self.credential) {
            value.push_str(&format!(
                "; username={}; credential={}; credential-type=\"password\"",
                quoted(username),
                quoted(credential)
            ));
        }
        value
    }
}

/// An RFC 9110 quoted-string: `"` and `\` escaped with a backslash.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The URI schemes a server may have.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scheme {
    Stun,
    Turn,
    Turns,
}

impl FromStr for IceServer {
    type Err = String;

    /// Parses `URI[;key=value]...` (see the module docs), reading any
    /// credential file or environment variable it names.
    fn from_str(spec: &str) -> Result<Self, String> {
        let mut parts = spec.split(';');
        let uri = parts.next().unwrap_or_default().trim();
        let scheme = check_uri(uri)?;
        let mut given = Given::default();
        for part in parts.map(str::trim).filter(|p| !p.is_empty()) {
            given.add(part)?;
        }
        let auth = given.auth(scheme)?;
        Ok(IceServer {
            uri: uri.to_owned(),
            auth,
        })
    }
}

/// The `key=value` parts of a spec, before they are checked together.
#[derive(Default)]
struct Given {
    username: Option<String>,
    credential: Option<String>,
    secret: Option<String>,
}

impl Given {
    fn add(&mut self, part: &str) -> Result<(), String> {
        let Some((key, raw)) = part.split_once('=') else {
            return Err(format!(
                "\"{}\" is not key=value (keys: username, credential, credential-file, \
                 credential-env, secret, secret-file, secret-env)",
                shown(part)
            ));
        };
        let key = key.trim();
        let value = percent_decode(raw.trim())
            .ok_or_else(|| format!("the value of {key} is not valid percent-encoded UTF-8"))?;
        let (slot, value) = match key {
            "username" => (&mut self.username, value),
            "credential" => (&mut self.credential, value),
            "credential-file" => (&mut self.credential, read_file(key, &value)?),
            "credential-env" => (&mut self.credential, read_env(key, &value)?),
            "secret" => (&mut self.secret, value),
            "secret-file" => (&mut self.secret, read_file(key, &value)?),
            "secret-env" => (&mut self.secret, read_env(key, &value)?),
            _ => {
                return Err(format!(
                    "unknown key \"{}\" (keys: username, credential, credential-file, \
                     credential-env, secret, secret-file, secret-env)",
                    shown(key)
                ))
            }
        };
        if value.is_empty() {
            return Err(format!("{key} is empty"));
        }
        if slot.replace(value).is_some() {
            return Err(format!("{key} is given twice"));
        }
        Ok(())
    }

    /// The authentication these parts make for a server of `scheme`.
    fn auth(self, scheme: Scheme) -> Result<Auth, String> {
        match (scheme, self.username, self.credential, self.secret) {
            (Scheme::Stun, None, None, None) => Ok(Auth::None),
            (Scheme::Stun, ..) => Err("a stun: server takes no username or credentials".into()),
            (_, Some(username), Some(password), None) => {
                header_safe("username", &username)?;
                header_safe("credential", &password)?;
                Ok(Auth::Password { username, password })
            }
            (_, None, None, Some(secret)) => Ok(Auth::Secret(secret)),
            (_, Some(_), _, Some(_)) => {
                Err("with a REST secret the username is made per client: leave out username".into())
            }
            (_, _, Some(_), Some(_)) => {
                Err("give either a credential (password) or a secret, not both".into())
            }
            (_, Some(_), None, None) => Err("username needs a credential".into()),
            (_, None, Some(_), None) => Err("credential needs a username".into()),
            (_, None, None, None) => Err(
                "a TURN server needs credentials: username= with credential= (or \
                 credential-file=, credential-env=), or a REST secret (secret=, secret-file=, \
                 secret-env=)"
                    .into(),
            ),
        }
    }
}

/// A username or password goes into an HTTP header: printable ASCII only.
fn header_safe(key: &str, value: &str) -> Result<(), String> {
    if value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        Ok(())
    } else {
        Err(format!(
            "{key} must be printable ASCII (it is sent in HTTP Link headers)"
        ))
    }
}

/// The first line of a credential file.
fn read_file(key: &str, path: &str) -> Result<String, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{key}: cannot read {path}: {e}"))?;
    Ok(text.lines().next().unwrap_or_default().trim().to_owned())
}

fn read_env(key: &str, name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("{key}: environment variable {name} is not set"))
}

/// At most 40 characters of some input, for an error message.
fn shown(text: &str) -> String {
    text.chars().take(40).collect()
}

/// Decodes `%XX` escapes; `None` for a bad escape or bytes that are not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Checks a `stun:`, `turn:` or `turns:` URI (RFC 7064, RFC 7065):
/// `scheme:host[:port]`, and for TURN an optional `?transport=udp|tcp`.
fn check_uri(uri: &str) -> Result<Scheme, String> {
    let Some((scheme, rest)) = uri.split_once(':') else {
        return Err(format!(
            "\"{}\" is not a stun:, turn: or turns: URI",
            shown(uri)
        ));
    };
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "stun" => Scheme::Stun,
        "turn" => Scheme::Turn,
        "turns" => Scheme::Turns,
        _ => {
            return Err(format!(
                "unknown scheme \"{}:\" (expected stun:, turn: or turns:)",
                shown(scheme)
            ))
        }
    };
    if rest.starts_with("//") {
        return Err(format!(
            "write \"{}\" without \"//\" (RFC 7064/7065: scheme:host[:port])",
            shown(uri)
        ));
    }
    let (authority, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    check_authority(authority)?;
    match (scheme, query) {
        (_, None) => Ok(scheme),
        (Scheme::Stun, Some(_)) => Err("a stun: URI takes no ?query".into()),
        (_, Some(q)) if q.eq_ignore_ascii_case("transport=udp") => Ok(scheme),
        (_, Some(q)) if q.eq_ignore_ascii_case("transport=tcp") => Ok(scheme),
        (_, Some(q)) => Err(format!(
            "unknown query \"?{}\" (expected ?transport=udp or ?transport=tcp)",
            shown(q)
        )),
    }
}

/// `host[:port]`: an IPv4 address, a bracketed IPv6 address or a DNS name,
/// and a port from 1 to 65535.
fn check_authority(authority: &str) -> Result<(), String> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((addr, after)) = v6.split_once(']') else {
            return Err(format!("unclosed [ in \"{}\"", shown(authority)));
        };
        if addr.parse::<Ipv6Addr>().is_err() {
            return Err(format!("\"{}\" is not an IPv6 address", shown(addr)));
        }
        match after {
            "" => (addr, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (addr, Some(port)),
                None => return Err(format!("unexpected \"{}\" after ]", shown(after))),
            },
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("the URI has no host".into());
    }
    if !authority.starts_with('[') {
        check_host(host)?;
    }
    if let Some(port) = port {
        match port.parse::<u16>() {
            Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => {}
            _ => return Err(format!("bad port \"{}\" (1 to 65535)", shown(port))),
        }
    }
    Ok(())
}

/// An IPv4 address or a DNS name (letters, digits, `-` and `.`).
fn check_host(host: &str) -> Result<(), String> {
    let numeric = host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if numeric {
        return host
            .parse::<Ipv4Addr>()
            .map(|_| ())
            .map_err(|_| format!("\"{}\" is not an IPv4 address", shown(host)));
    }
    let name_ok = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if name_ok {
        Ok(())
    } else {
        Err(format!("\"{}\" is not a host name", shown(host)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(spec: &str) -> Result<IceServer, String> {
        spec.parse()
    }

    /// Each spec is refused with a message that contains its reason.
    fn assert_rejected(cases: &[(&str, &str)]) {
        for (spec, why) in cases {
            let e = parse(spec).expect_err(spec);
            assert!(e.contains(why), "{spec}: {e}");
        }
    }

    #[test]
    fn accepts_stun_and_turn_uris() {
        for ok in [
            "stun:stun.example.net",
            "stun:192.0.2.1:3478",
            "stun:[2001:db8::1]:3478",
            "turn:turn.example.net?transport=tcp;username=u;credential=p",
            "turns:turn.example.net:5349?transport=tcp;username=u;credential=p",
            "TURN:[::1];secret=s",
        ] {
            assert!(parse(ok).is_ok(), "{ok}: {:?}", parse(ok));
        }
    }

    #[test]
    fn rejects_bad_uris_with_a_reason() {
        let cases = [
            ("http://example.net", "unknown scheme"),
            ("stuns:example.net", "unknown scheme"),
            ("example.net", "not a stun:"),
            ("stun:", "no host"),
            ("stun::3478", "no host"),
            ("stun://example.net", "without \"//\""),
            ("stun:example.net:0", "bad port"),
            ("stun:example.net:70000", "bad port"),
            ("stun:example.net:+80", "bad port"),
            ("stun:example.net:x", "bad port"),
            ("stun:example.net?transport=udp", "no ?query"),
            ("turn:example.net?transport=sctp;secret=s", "unknown query"),
            ("stun:300.1.1.1", "not an IPv4"),
            ("stun:[nope]:1", "not an IPv6"),
            ("stun:[::1", "unclosed"),
            ("stun:exa_mple.net", "not a host name"),
        ];
        assert_rejected(&cases);
    }

    #[test]
    fn credentials_are_checked_together() {
        let cases = [
            ("turn:h", "needs credentials"),
            ("turn:h;username=u", "needs a credential"),
            ("turn:h;credential=p", "needs a username"),
            ("turn:h;username=u;secret=s", "leave out username"),
            ("turn:h;credential=p;secret=s", "not both"),
            ("stun:h;username=u;credential=p", "takes no username"),
            ("turn:h;username=u;credential=p;credential=q", "twice"),
            ("turn:h;user=u", "unknown key"),
            ("turn:h;username", "not key=value"),
            ("turn:h;username=;credential=p", "empty"),
            ("turn:h;username=u;credential=%zz", "percent-encoded"),
            ("turn:h;username=u;credential=caf%C3%A9", "printable ASCII"),
            (
                "turn:h;secret-env=VOICE_RELAY_TEST_UNSET_VARIABLE",
                "is not set",
            ),
            ("turn:h;secret-file=/nonexistent/secret", "cannot read"),
        ];
        assert_rejected(&cases);
    }

    #[test]
    fn values_are_percent_decoded_and_files_read() {
        let server = parse("turn:h;username=a%3Bb;credential=p%2Cq%25").expect("spec");
        let issued = IceServers::new(vec![server], DEFAULT_TTL).issue_now();
        assert_eq!(issued[0].username.as_deref(), Some("a;b"));
        assert_eq!(issued[0].credential.as_deref(), Some("p,q%"));

        let dir = std::env::temp_dir().join(format!("vr-ice-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("secret");
        std::fs::write(&file, "from-file\nsecond line\n").expect("write");
        let server = parse(&format!(
            "turn:h;username=u;credential-file={}",
            file.display()
        ))
        .expect("spec");
        let issued = IceServers::new(vec![server], DEFAULT_TTL).issue_now();
        assert_eq!(issued[0].credential.as_deref(), Some("from-file"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn debug_output_hides_secrets() {
        let a = parse("turn:h;username=alice;credential=hunter2").expect("spec");
        let b = parse("turn:h;secret=topsecret").expect("spec");
        let shown = format!("{a:?} {b:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("topsecret"),
            "{shown}"
        );
        assert!(shown.contains("alice"), "{shown}");
    }

    /// The vector was computed independently with Python:
    /// `base64.b64encode(hmac.new(b"north-wind-4517", b"1700003600:vr-test",
    /// hashlib.sha1).digest())`.
    #[test]
    fn rest_credential_matches_an_independent_hmac_sha1() {
        assert_eq!(
            rest_credential("north-wind-4517", "1700003600:vr-test"),
            "OqxnIra+RcWFfN00GvuyEawkIGk="
        );
    }

    #[test]
    fn rest_usernames_expire_after_the_ttl_and_differ_per_client() {
        let servers = IceServers::new(
            vec![parse("turn:h?transport=tcp;secret=north-wind-4517").expect("spec")],
            Duration::from_secs(3600),
        );
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let (a, b) = (servers.issue(now), servers.issue(now));
        let user = a[0].username.clone().expect("username");
        let (expiry, id) = user.split_once(':').expect("expiry:id");
        assert_eq!(expiry, "1700003600");
        assert!(id.starts_with("vr") && id.len() == 14, "{id}");
        assert_ne!(a[0].username, b[0].username);
        assert_eq!(
            a[0].credential.as_deref(),
            Some(rest_credential("north-wind-4517", &user).as_str())
        );
        assert_eq!(a[0].urls, "turn:h?transport=tcp");
    }

    #[test]
    fn link_values_follow_rfc_9725() {
        let stun = RtcIceServer {
            urls: "stun:stun.example.net".into(),
            username: None,
            credential: None,
        };
        assert_eq!(
            stun.link_value(),
            r#"<stun:stun.example.net>; rel="ice-server""#
        );
        let turn = RtcIceServer {
            urls: "turn:t.example.net?transport=tcp".into(),
            username: Some(r#"a"b\c"#.into()),
            credential: Some("p;w,d".into()),
        };
        assert_eq!(
            turn.link_value(),
            r#"<turn:t.example.net?transport=tcp>; rel="ice-server"; username="a\"b\\c"; credential="p;w,d"; credential-type="password""#
        );
    }

    #[test]
    fn rtc_ice_server_serializes_as_the_webrtc_dictionary() {
        let stun = RtcIceServer {
            urls: "stun:h".into(),
            username: None,
            credential: None,
        };
        assert_eq!(
            serde_json::to_string(&stun).expect("json"),
            r#"{"urls":"stun:h"}"#
        );
    }
}
