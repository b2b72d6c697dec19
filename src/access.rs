//! Access control, off by default for home use: optional tokens (one for
//! everything, or separate ones for sending and for listening), presented as
//! `?token=` or `Authorization: Bearer`, and an optional list of web origins
//! allowed to open the WebSocket. Tokens are compared in constant time and
//! never logged.

use axum::http::{header, HeaderMap, Uri};

#[derive(Clone, Debug, Default)]
pub struct Access {
    /// Grants everything.
    pub token: Option<String>,
    /// Grants sending (and listening).
    pub send_token: Option<String>,
    /// Grants listening: WebRTC receiving, MP3, status.
    pub listen_token: Option<String>,
    /// Origins (`scheme://host[:port]`) allowed to open the WebSocket; empty = any.
    pub allowed_origins: Vec<String>,
}

/// What a request may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permissions {
    pub send: bool,
    pub listen: bool,
}

impl Permissions {
    pub const ALL: Permissions = Permissions {
        send: true,
        listen: true,
    };

    pub fn any(&self) -> bool {
        self.send || self.listen
    }
}

impl Access {
    /// The permissions of a request presenting `presented` (or nothing).
    pub fn permissions(&self, presented: Option<&str>) -> Permissions {
        let is = |t: &Option<String>| match (t, presented) {
            (Some(t), Some(p)) => constant_time_eq(t.as_bytes(), p.as_bytes()),
            _ => false,
        };
        let full = is(&self.token);
        let send = if self.token.is_none() && self.send_token.is_none() {
            true
        } else {
            full || is(&self.send_token)
        };
        let listen = if self.token.is_none() && self.listen_token.is_none() {
            true
        } else {
            full || is(&self.send_token) || is(&self.listen_token)
        };
        Permissions { send, listen }
    }

    /// The permissions of an HTTP request (token from the query or header).
    pub fn of_request(&self, uri: &Uri, headers: &HeaderMap) -> Permissions {
        self.permissions(presented_token(uri, headers).as_deref())
    }

    /// Whether a WebSocket upgrade with this `Origin` header may proceed.
    /// Requests without `Origin` (not from a browser) pass.
    pub fn origin_allowed(&self, headers: &HeaderMap) -> bool {
        if self.allowed_origins.is_empty() {
            return true;
        }
        let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
            return true;
        };
        let origin = origin.trim_end_matches('/');
        self.allowed_origins
            .iter()
            .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    }
}

/// The token a request presents: `Authorization: Bearer T` or `?token=T`.
fn presented_token(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    if let Some(auth) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(t) = auth.strip_prefix("Bearer ") {
            return Some(t.trim().to_owned());
        }
    }
    let query = uri.query()?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == "token").then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, bearer: Option<&str>) -> (Uri, HeaderMap) {
        let mut h = HeaderMap::new();
        if let Some(b) = bearer {
            h.insert(
                header::AUTHORIZATION,
                format!("Bearer {b}").parse().unwrap(),
            );
        }
        (uri.parse().unwrap(), h)
    }

    #[test]
    fn open_by_default() {
        let a = Access::default();
        assert_eq!(a.permissions(None), Permissions::ALL);
    }

    #[test]
    fn tokens_grant_what_they_name() {
        let a = Access {
            send_token: Some("s3nd".into()),
            listen_token: Some("l1sten".into()),
            ..Default::default()
        };
        assert!(!a.permissions(None).any());
        assert_eq!(a.permissions(Some("s3nd")), Permissions::ALL);
        let l = a.permissions(Some("l1sten"));
        assert!(l.listen && !l.send);
        assert!(!a.permissions(Some("wrong")).any());

        // Only a send token: listening stays open.
        let a = Access {
            send_token: Some("s".into()),
            ..Default::default()
        };
        let p = a.permissions(None);
        assert!(p.listen && !p.send);

        let a = Access {
            token: Some("all".into()),
            ..Default::default()
        };
        assert!(!a.permissions(None).any());
        assert_eq!(a.permissions(Some("all")), Permissions::ALL);
    }

    #[test]
    fn token_from_query_or_bearer() {
        let a = Access {
            token: Some("a b/c".into()),
            ..Default::default()
        };
        let (u, h) = req("/ws?x=1&token=a%20b%2Fc", None);
        assert_eq!(a.of_request(&u, &h), Permissions::ALL);
        let (u, h) = req("/ws", Some("a b/c"));
        assert_eq!(a.of_request(&u, &h), Permissions::ALL);
        let (u, h) = req("/ws?token=nope", None);
        assert!(!a.of_request(&u, &h).any());
        let (u, h) = req("/ws?token=%zz", None);
        assert!(!a.of_request(&u, &h).any());
    }

    #[test]
    fn origins() {
        let a = Access {
            allowed_origins: vec!["https://ha.local:8123".into()],
            ..Default::default()
        };
        let mut h = HeaderMap::new();
        assert!(a.origin_allowed(&h), "no Origin: not a browser");
        h.insert(header::ORIGIN, "https://ha.local:8123".parse().unwrap());
        assert!(a.origin_allowed(&h));
        h.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
        assert!(!a.origin_allowed(&h));
    }
}
