//! One `--icecast` target: the URL parsed and checked
//! (`icecast://source:PASS@HOST:8000/{id}.mp3`), the mount a stream is
//! pushed to, the output format the mount's extension picks, and the source
//! password, which no `Debug` or `Display` of these types ever shows.

use std::fmt;
use std::str::FromStr;

use crate::mp3::Format;

/// Icecast's port when the URL names none.
pub const DEFAULT_PORT: u16 = 8000;
/// Icecast's source user when the URL names none.
pub const DEFAULT_USER: &str = "source";
/// What the mount path holds where the stream id goes.
const ID_PLACEHOLDER: &str = "{id}";

/// A password; shown as `***` everywhere.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(password: impl Into<String>) -> Self {
        Self(password.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl FromStr for Password {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(s))
    }
}

/// Which stream a mount carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mount {
    /// A mount per stream: the path with `{id}` in it.
    PerStream(String),
    /// One fixed mount carrying whichever stream is newest.
    Newest(String),
}

/// A parsed `--icecast` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct IcecastUrl {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// `None`: not in the URL (taken from `--icecast-password[-file]`).
    pub password: Option<Password>,
    pub mount: Mount,
}

/// Why an `--icecast` URL was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("must start with icecast://")]
    Scheme,
    #[error("icecasts:// (TLS) is not supported; use icecast:// (plain TCP)")]
    Tls,
    #[error("has no host")]
    NoHost,
    #[error("has an invalid port")]
    Port,
    #[error("needs a mount path, e.g. /{{id}}.mp3")]
    NoMount,
    #[error("mount path may not have a query, a fragment, spaces or control characters")]
    MountChars,
    #[error("has an invalid percent-escape")]
    Escape,
}

impl FromStr for IcecastUrl {
    type Err = UrlError;

    fn from_str(url: &str) -> Result<Self, UrlError> {
        let rest = match url.split_once("://") {
            Some(("icecast", rest)) => rest,
            Some(("icecasts", _)) => return Err(UrlError::Tls),
            _ => return Err(UrlError::Scheme),
        };
        let (authority, path) = match rest.find('/') {
            Some(at) => rest.split_at(at),
            None => (rest, ""),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => (DEFAULT_USER.to_owned(), None),
            Some(info) => {
                let (user, password) = match info.split_once(':') {
                    Some((user, password)) => (user, Some(password)),
                    None => (info, None),
                };
                let user = percent_decode(user)?;
                let password = password.map(percent_decode).transpose()?;
                let user = if user.is_empty() {
                    DEFAULT_USER.to_owned()
                } else {
                    user
                };
                (user, password.map(Password))
            }
        };
        let (host, port) = split_host_port(hostport)?;
        Ok(IcecastUrl {
            host,
            port,
            user,
            password,
            mount: parse_mount(path)?,
        })
    }
}

fn split_host_port(hostport: &str) -> Result<(String, u16), UrlError> {
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or(UrlError::NoHost)?;
        (host, after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err(UrlError::NoHost);
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or(UrlError::Port)?,
    };
    Ok((host.to_owned(), port))
}

fn parse_mount(path: &str) -> Result<Mount, UrlError> {
    if path.len() < 2 {
        return Err(UrlError::NoMount);
    }
    if path
        .chars()
        .any(|c| c == '?' || c == '#' || c.is_whitespace() || c.is_control())
    {
        return Err(UrlError::MountChars);
    }
    Ok(if path.contains(ID_PLACEHOLDER) {
        Mount::PerStream(path.to_owned())
    } else {
        Mount::Newest(path.to_owned())
    })
}

impl IcecastUrl {
    /// The format a mount gets: Ogg/Opus for `.ogg`, otherwise MP3.
    pub fn format(&self) -> Format {
        let path = match &self.mount {
            Mount::PerStream(p) | Mount::Newest(p) => p,
        };
        if path.to_ascii_lowercase().ends_with(".ogg") {
            Format::Ogg
        } else {
            Format::Mp3
        }
    }

    /// The mount path `stream` is pushed to (its id percent-encoded).
    pub fn mount_for(&self, stream: &str) -> String {
        match &self.mount {
            Mount::PerStream(p) => p.replace(ID_PLACEHOLDER, &percent_encode(stream)),
            Mount::Newest(p) => p.clone(),
        }
    }

    /// Whether the mount carries the newest stream rather than one per stream.
    pub fn follows_newest(&self) -> bool {
        matches!(self.mount, Mount::Newest(_))
    }

    /// `host:port` for `Host:` and for connecting.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The URL without its password, for logs.
impl fmt::Display for IcecastUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = match &self.mount {
            Mount::PerStream(p) | Mount::Newest(p) => p,
        };
        let password = if self.password.is_some() { ":***" } else { "" };
        write!(
            f,
            "icecast://{}{password}@{}{path}",
            self.user,
            self.authority()
        )
    }
}

impl fmt::Debug for IcecastUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IcecastUrl({self})")
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> Result<String, UrlError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or(UrlError::Escape)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| UrlError::Escape)?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UrlError::Escape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> IcecastUrl {
        s.parse().expect("valid url")
    }

    #[test]
    fn parses_the_documented_form() {
        let u = url("icecast://source:hackme@127.0.0.1:8000/{id}.mp3");
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 8000));
        assert_eq!(u.user, "source");
        assert_eq!(u.password, Some(Password::new("hackme")));
        assert_eq!(u.mount_for("stream_1"), "/stream_1.mp3");
        assert_eq!(u.format(), Format::Mp3);
        assert!(!u.follows_newest());
    }

    #[test]
    fn defaults_fixed_mounts_and_formats() {
        let u = url("icecast://radio.local/live.ogg");
        assert_eq!(
            (u.port, u.user.as_str(), u.password.clone()),
            (8000, "source", None)
        );
        assert!(u.follows_newest());
        assert_eq!(u.mount_for("any"), "/live.ogg");
        assert_eq!(u.format(), Format::Ogg);
        assert_eq!(url("icecast://h/a/{id}.OGG").format(), Format::Ogg);
        assert_eq!(url("icecast://h/{id}").format(), Format::Mp3);
        let u = url("icecast://:pw@[::1]:9000/x.mp3");
        assert_eq!(
            (u.host.as_str(), u.port, u.user.as_str()),
            ("::1", 9000, "source")
        );
        assert_eq!(u.authority(), "[::1]:9000");
    }

    #[test]
    fn password_is_percent_decoded_and_the_id_encoded() {
        let u = url("icecast://me:p%40ss%3Aw%2Cd@h:1/{id}.mp3");
        assert_eq!(u.user, "me");
        assert_eq!(u.password.as_ref().map(Password::expose), Some("p@ss:w,d"));
        assert_eq!(u.mount_for("a b/ü"), "/a%20b%2F%C3%BC.mp3");
        // A password holding '@' unescaped: the last '@' ends the userinfo.
        let u = url("icecast://source:a@b@h/x.mp3");
        assert_eq!(u.password.as_ref().map(Password::expose), Some("a@b"));
        assert_eq!(u.host, "h");
    }

    #[test]
    fn refuses_bad_urls_clearly() {
        for (s, e) in [
            ("http://h/x.mp3", UrlError::Scheme),
            ("h:8000/x.mp3", UrlError::Scheme),
            ("icecasts://h/x.mp3", UrlError::Tls),
            ("icecast:///x.mp3", UrlError::NoHost),
            ("icecast://u:p@:8000/x.mp3", UrlError::NoHost),
            ("icecast://h:0/x.mp3", UrlError::Port),
            ("icecast://h:99999/x.mp3", UrlError::Port),
            ("icecast://h:x/x.mp3", UrlError::Port),
            ("icecast://h", UrlError::NoMount),
            ("icecast://h/", UrlError::NoMount),
            ("icecast://h/x.mp3?a=b", UrlError::MountChars),
            ("icecast://h/x y.mp3", UrlError::MountChars),
            ("icecast://u:%zz@h/x.mp3", UrlError::Escape),
            ("icecast://u:%4@h/x.mp3", UrlError::Escape),
        ] {
            assert_eq!(s.parse::<IcecastUrl>(), Err(e), "{s}");
        }
    }

    #[test]
    fn the_password_never_shows() {
        let u = url("icecast://source:sekrit@h:8000/{id}.mp3");
        let shown = format!("{u} {u:?} {:?}", u.password);
        assert!(!shown.contains("sekrit"), "{shown}");
        assert!(
            shown.contains("icecast://source:***@h:8000/{id}.mp3"),
            "{shown}"
        );
    }
}
