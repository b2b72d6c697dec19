//! The health probe (`voice-relay health`): one `GET /health` to the
//! configured listener, over TLS when the server serves TLS, and a verdict
//! for an exit status. Containers use it as their health check, so it needs
//! no curl and no shell. The probe talks to its own machine, so it accepts
//! any certificate (self-signed included).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::http_client::{parse_response, MAX_RESPONSE};

/// Where and how to probe.
#[derive(Debug, Clone)]
pub struct Probe {
    pub addr: SocketAddr,
    pub tls: bool,
    pub timeout: Duration,
}

/// Why the server is not healthy.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot reach {0}: {1}")]
    Unreachable(SocketAddr, std::io::Error),
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("reading the answer failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the answer is not HTTP")]
    NotHttp,
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("the body does not say \"healthy\": {0}")]
    Body(String),
}

impl Probe {
    /// Probes the listener at `listen`: an unspecified address (`0.0.0.0`,
    /// `::`) is reached on the loopback address of its family.
    pub fn new(listen: SocketAddr, tls: bool, timeout: Duration) -> Self {
        let ip = match listen.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        Self {
            addr: SocketAddr::new(ip, listen.port()),
            tls,
            timeout,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}/health", self.addr)
    }

    /// One request; `Ok` only for `200` with `"status": "healthy"`.
    pub fn check(&self) -> Result<(), ProbeError> {
        let tcp = TcpStream::connect_timeout(&self.addr, self.timeout)
            .map_err(|e| ProbeError::Unreachable(self.addr, e))?;
        tcp.set_read_timeout(Some(self.timeout))?;
        tcp.set_write_timeout(Some(self.timeout))?;
        let request = format!(
            "GET /health HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: voice-relay-health\r\n\r\n",
            self.addr
        );
        let raw = if self.tls {
            let conn = rustls::ClientConnection::new(
                tls_config()?,
                ServerName::IpAddress(self.addr.ip().into()),
            )?;
            exchange(rustls::StreamOwned::new(conn, tcp), &request)?
        } else {
            exchange(tcp, &request)?
        };
        verdict(&raw)
    }
}

/// Sends the request and reads the answer until the server closes.
fn exchange(mut stream: impl Read + Write, request: &str) -> Result<Vec<u8>, ProbeError> {
    stream.write_all(request.as_bytes())?;
    stream.flush()?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while raw.len() < MAX_RESPONSE {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // A TLS peer closing without close_notify: what arrived counts.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof && !raw.is_empty() => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(raw)
}

/// Healthy when the status is 200 and the JSON body says `"healthy"`.
fn verdict(raw: &[u8]) -> Result<(), ProbeError> {
    let response = parse_response(raw).ok_or(ProbeError::NotHttp)?;
    if response.status != 200 {
        return Err(ProbeError::Status(response.status));
    }
    let body = response.body;
    let json: serde_json::Value = serde_json::from_slice(&body).map_err(|_| {
        ProbeError::Body(String::from_utf8_lossy(&body).chars().take(200).collect())
    })?;
    match json.get("status").and_then(|s| s.as_str()) {
        Some("healthy") => Ok(()),
        _ => Err(ProbeError::Body(
            json.to_string().chars().take(200).collect(),
        )),
    }
}

fn tls_config() -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Accepts any server certificate (the probe talks to its own machine), but
/// still checks the handshake signatures.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_listen_is_probed_on_loopback() {
        let p = Probe::new(
            "0.0.0.0:8443".parse().unwrap(),
            true,
            Duration::from_secs(1),
        );
        assert_eq!(p.addr, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(p.url(), "https://127.0.0.1:8443/health");
        let p = Probe::new("[::]:80".parse().unwrap(), false, Duration::from_secs(1));
        assert_eq!(p.addr, "[::1]:80".parse().unwrap());
        let p = Probe::new(
            "10.1.2.3:80".parse().unwrap(),
            false,
            Duration::from_secs(1),
        );
        assert_eq!(p.addr.ip(), "10.1.2.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn verdicts() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"status\":\"healthy\",\"senders\":0}";
        assert!(verdict(ok).is_ok());
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n8\r\n{\"status\r\nc\r\n\":\"healthy\"}\r\n0\r\n\r\n";
        assert!(verdict(chunked).is_ok(), "{:?}", verdict(chunked));
        let busy = b"HTTP/1.1 503 Service Unavailable\r\n\r\n{\"status\":\"healthy\"}";
        assert!(matches!(verdict(busy), Err(ProbeError::Status(503))));
        let sick = b"HTTP/1.1 200 OK\r\n\r\n{\"status\":\"starting\"}";
        assert!(matches!(verdict(sick), Err(ProbeError::Body(_))));
        assert!(matches!(
            verdict(b"SSH-2.0-OpenSSH\r\n"),
            Err(ProbeError::NotHttp)
        ));
        assert!(matches!(verdict(b""), Err(ProbeError::NotHttp)));
        let half = b"HTTP/1.1 200 OK\r\n\r\n{\"status\":\"hea";
        assert!(matches!(verdict(half), Err(ProbeError::Body(_))));
    }
}
