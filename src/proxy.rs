//! Clients behind a reverse proxy (Home Assistant's ingress, nginx, Caddy):
//! which peers are trusted proxies (`--trusted-proxy ADDR/PREFIX`) and, for
//! connections from those only, the client address they forward in
//! `X-Forwarded-For` (or, without it, `Forwarded: for=`). The client is the
//! right-most hop that is not itself a trusted proxy: hops further left were
//! written by the client and prove nothing.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use axum::http::{HeaderMap, HeaderName};

/// Most forwarded hops looked at (from the right).
const MAX_HOPS: usize = 32;

/// An address or network: `10.0.0.0/8`, `172.30.32.2`, `fd00::/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyNet {
    addr: IpAddr,
    prefix: u8,
}

impl ProxyNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

/// Whether the first `prefix` bits of `a` and `b` agree.
fn prefix_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let full = usize::from(prefix / 8);
    let rest = prefix % 8;
    if a[..full] != b[..full] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    a[full] & mask == b[full] & mask
}

/// Why a `--trusted-proxy` value is not an address or network.
#[derive(Debug, thiserror::Error)]
pub enum ProxyNetError {
    #[error("not an IP address: {0:?}")]
    Address(String),
    #[error("prefix length {0:?} is not a number from 0 to {1}")]
    Prefix(String, u8),
}

impl FromStr for ProxyNet {
    type Err = ProxyNetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| ProxyNetError::Address(addr.to_owned()))?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| ProxyNetError::Prefix(p.to_owned(), max))?,
        };
        Ok(ProxyNet { addr, prefix })
    }
}

impl fmt::Display for ProxyNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The configured proxies; empty: every peer is the client.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies {
    nets: Vec<ProxyNet>,
}

impl TrustedProxies {
    pub fn new(nets: Vec<ProxyNet>) -> Self {
        Self { nets }
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(ip))
    }

    /// The client's address for a connection from `peer` with `headers`.
    /// From an untrusted peer: the peer. From a trusted one: walking the
    /// forwarded hops from the right, the first one not trusted; all trusted:
    /// the left-most; an unreadable hop stops the walk at the last address
    /// known (so a malformed entry cannot pick the address).
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        let hops = forwarded_hops(headers);
        let mut client = peer;
        for hop in hops.iter().rev().take(MAX_HOPS) {
            match hop {
                Some(ip) => {
                    client = ip.to_canonical();
                    if !self.trusts(client) {
                        return client;
                    }
                }
                None => return client,
            }
        }
        client
    }
}

/// The hops of `X-Forwarded-For` (every such header, in order), or when
/// there is none, the `for=` of each `Forwarded` element; `None` for a hop
/// that is not an address (`unknown`, an obfuscated name, garbage).
fn forwarded_hops(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    let xff = header_list(headers, &XFF);
    if !xff.is_empty() {
        return xff.iter().map(|h| parse_node(h)).collect();
    }
    header_list(headers, &axum::http::header::FORWARDED)
        .iter()
        .map(|element| {
            element
                .split(';')
                .filter_map(|pair| pair.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("for"))
                .and_then(|(_, v)| parse_node(v))
        })
        .collect()
}

/// The comma-separated entries of every `name` header, in order. A header
/// that is not text counts as one unreadable entry.
fn header_list(headers: &HeaderMap, name: &HeaderName) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| match v.to_str() {
            Ok(s) => s.split(',').map(|e| e.trim().to_owned()).collect(),
            Err(_) => vec![String::new()],
        })
        .collect()
}

/// An address from a hop: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`,
/// `[2001:db8::1]:4711`, optionally in double quotes.
fn parse_node(node: &str) -> Option<IpAddr> {
    let node = node.trim();
    let node = node
        .strip_prefix('"')
        .and_then(|n| n.strip_suffix('"'))
        .unwrap_or(node);
    if let Some(rest) = node.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.starts_with(':')) {
            return None;
        }
        return inside.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    let (host, port) = node.split_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn proxies(nets: &[&str]) -> TrustedProxies {
        TrustedProxies::new(nets.iter().map(|n| n.parse().unwrap()).collect())
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn nets_parse_and_contain() {
        let n: ProxyNet = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains(ip("10.200.3.4")) && !n.contains(ip("11.0.0.1")));
        let n: ProxyNet = "172.30.32.2".parse().unwrap();
        assert!(n.contains(ip("172.30.32.2")) && !n.contains(ip("172.30.32.3")));
        let n: ProxyNet = "192.168.1.0/25".parse().unwrap();
        assert!(n.contains(ip("192.168.1.127")) && !n.contains(ip("192.168.1.128")));
        let n: ProxyNet = "fd00::/8".parse().unwrap();
        assert!(n.contains(ip("fd12::1")) && !n.contains(ip("fe80::1")));
        // An IPv4 peer seen on a dual-stack socket.
        let n: ProxyNet = "127.0.0.1".parse().unwrap();
        assert!(n.contains(ip("::ffff:127.0.0.1")));
        let all: ProxyNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")) && !all.contains(ip("::1")));
        assert_eq!(n.to_string(), "127.0.0.1/32");
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "ten",
            "10.0.0.0/",
            "10.0.0.0/x",
            "",
        ] {
            assert!(bad.parse::<ProxyNet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn untrusted_peer_is_the_client() {
        let p = proxies(&["10.0.0.1"]);
        let h = headers(&[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(p.client_ip(ip("10.0.0.2"), &h), ip("10.0.0.2"));
        assert_eq!(
            TrustedProxies::default().client_ip(ip("10.0.0.1"), &h),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn right_most_untrusted_hop() {
        let p = proxies(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.1");
        // The client forged a left-most entry; the proxy appended the real one.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 192.168.1.7")]);
        assert_eq!(p.client_ip(peer, &h), ip("192.168.1.7"));
        // A chain of trusted proxies is skipped.
        let h = headers(&[(
            "x-forwarded-for",
            "6.6.6.6, 192.168.1.7, 10.1.1.1, 10.2.2.2",
        )]);
        assert_eq!(p.client_ip(peer, &h), ip("192.168.1.7"));
        // Several headers are one list, in order.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "192.168.1.8, 10.3.3.3"),
        ]);
        assert_eq!(p.client_ip(peer, &h), ip("192.168.1.8"));
        // All trusted: the left-most.
        let h = headers(&[("x-forwarded-for", "10.9.9.9, 10.8.8.8")]);
        assert_eq!(p.client_ip(peer, &h), ip("10.9.9.9"));
        // No header: the peer.
        assert_eq!(p.client_ip(peer, &HeaderMap::new()), peer);
        // Ports and brackets.
        let h = headers(&[("x-forwarded-for", "[2001:db8::7]:4711")]);
        assert_eq!(p.client_ip(peer, &h), ip("2001:db8::7"));
        let h = headers(&[("x-forwarded-for", "192.168.1.9:5000")]);
        assert_eq!(p.client_ip(peer, &h), ip("192.168.1.9"));
    }

    #[test]
    fn garbage_stops_at_the_last_known_address() {
        let p = proxies(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.1");
        let h = headers(&[("x-forwarded-for", "192.168.1.7, nonsense")]);
        assert_eq!(p.client_ip(peer, &h), peer);
        let h = headers(&[("x-forwarded-for", "unknown, 10.4.4.4")]);
        assert_eq!(p.client_ip(peer, &h), ip("10.4.4.4"));
        let h = headers(&[("x-forwarded-for", "")]);
        assert_eq!(p.client_ip(peer, &h), peer);
        let h = headers(&[("x-forwarded-for", "1.2.3.4:99999")]);
        assert_eq!(p.client_ip(peer, &h), peer);
        let h = headers(&[("x-forwarded-for", "[::1]x")]);
        assert_eq!(p.client_ip(peer, &h), peer);
    }

    #[test]
    fn forwarded_header() {
        let p = proxies(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.1");
        let h = headers(&[(
            "forwarded",
            r#"for=6.6.6.6, for="[2001:db8::cafe]:4711";proto=https, for=10.1.1.1;by=10.0.0.1"#,
        )]);
        assert_eq!(p.client_ip(peer, &h), ip("2001:db8::cafe"));
        let h = headers(&[("forwarded", "For=192.0.2.43:47011;proto=http")]);
        assert_eq!(p.client_ip(peer, &h), ip("192.0.2.43"));
        // Obfuscated or missing `for`: stop at what is known.
        let h = headers(&[("forwarded", "for=192.0.2.1, for=_hidden")]);
        assert_eq!(p.client_ip(peer, &h), peer);
        let h = headers(&[("forwarded", "for=192.0.2.1, proto=https")]);
        assert_eq!(p.client_ip(peer, &h), peer);
        // X-Forwarded-For wins when both are there.
        let h = headers(&[
            ("forwarded", "for=192.0.2.1"),
            ("x-forwarded-for", "192.0.2.2"),
        ]);
        assert_eq!(p.client_ip(peer, &h), ip("192.0.2.2"));
    }
}
