//! TLS material: a certificate and key given by the user, or a self-signed
//! certificate authority plus a server certificate for the announced
//! addresses, generated once and kept in the data directory so phones that
//! trusted it (via `GET /ca.crt`) keep trusting it across restarts.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

/// PEM-encoded server certificate chain and key, and the CA users may trust.
pub struct TlsMaterial {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// The certificate to offer at `/ca.crt` (the CA when self-signed, the
    /// given certificate otherwise).
    pub ca_pem: Vec<u8>,
}

/// Reads a user-provided certificate and key.
pub fn load(cert: &Path, key: &Path) -> anyhow::Result<TlsMaterial> {
    let cert_pem = fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
    let key_pem = fs::read(key).with_context(|| format!("reading {}", key.display()))?;
    Ok(TlsMaterial {
        ca_pem: cert_pem.clone(),
        cert_pem,
        key_pem,
    })
}

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const SERVER_CERT: &str = "server.crt";
const SERVER_KEY: &str = "server.key";
const NAMES: &str = "server.names";
/// A server certificate older than this is issued anew.
const REISSUE_AFTER: Duration = Duration::from_secs(300 * 86_400);

/// Loads the self-signed material from `dir`, creating what is missing. The
/// CA is made once; the server certificate is re-issued when the set of
/// names (IPs and host names) changes.
pub fn self_signed(dir: &Path, ips: &[IpAddr], hosts: &[String]) -> anyhow::Result<TlsMaterial> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = |name: &str| -> PathBuf { dir.join(name) };

    let (ca_pem, ca_key) = match (
        fs::read_to_string(path(CA_CERT)),
        fs::read_to_string(path(CA_KEY)),
    ) {
        (Ok(cert), Ok(key)) => (cert, KeyPair::from_pem(&key).context("reading the CA key")?),
        _ => {
            let key = KeyPair::generate().context("generating the CA key")?;
            let cert = ca_params()?.self_signed(&key)?;
            write_private(&path(CA_KEY), key.serialize_pem().as_bytes())?;
            fs::write(path(CA_CERT), cert.pem())?;
            tracing::info!(dir = %dir.display(), "created a self-signed certificate authority");
            (cert.pem(), key)
        }
    };

    let mut names: Vec<String> = hosts.to_vec();
    names.extend(ips.iter().map(|ip| ip.to_string()));
    for default in ["localhost", "127.0.0.1"] {
        if !names.iter().any(|n| n == default) {
            names.push(default.to_string());
        }
    }
    let names_line = names.join(",");
    let current = fs::read_to_string(path(NAMES)).unwrap_or_default();
    let fresh = fs::metadata(path(SERVER_CERT))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < REISSUE_AFTER);
    let have_server = fresh && path(SERVER_KEY).exists();
    if !have_server || current.trim() != names_line {
        // The issuer is described by the same parameters the CA was made with.
        let issuer = Issuer::new(ca_params()?, &ca_key);
        let key = KeyPair::generate().context("generating the server key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "voice-relay");
        params.distinguished_name = dn;
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        // Browsers refuse server certificates valid for more than ~13 months;
        // it is re-issued when it gets old (see `REISSUE_AFTER`).
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(86_400);
        params.not_after = now + Duration::from_secs(390 * 86_400);
        let cert = params.signed_by(&key, &issuer)?;
        write_private(&path(SERVER_KEY), key.serialize_pem().as_bytes())?;
        fs::write(path(SERVER_CERT), cert.pem())?;
        fs::write(path(NAMES), &names_line)?;
        tracing::info!(names = %names_line, "issued a server certificate");
    }
    let mut cert_pem = fs::read(path(SERVER_CERT))?;
    cert_pem.extend_from_slice(ca_pem.as_bytes());
    Ok(TlsMaterial {
        cert_pem,
        key_pem: fs::read(path(SERVER_KEY))?,
        ca_pem: ca_pem.into_bytes(),
    })
}

/// The parameters of our CA certificate (also used to sign with it).
fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Voice Relay local CA");
    dn.push(DnType::OrganizationName, "voice-relay");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2044, 1, 1);
    Ok(params)
}

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_is_created_once_and_reused() {
        let dir = std::env::temp_dir().join(format!("voice-relay-tls-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let ips = ["192.0.2.10".parse().unwrap()];
        let a = self_signed(&dir, &ips, &[]).unwrap();
        let b = self_signed(&dir, &ips, &[]).unwrap();
        assert_eq!(a.ca_pem, b.ca_pem);
        assert_eq!(a.cert_pem, b.cert_pem);
        // A new name re-issues the server certificate under the same CA.
        let c = self_signed(&dir, &ips, &["relay.local".to_string()]).unwrap();
        assert_eq!(a.ca_pem, c.ca_pem);
        assert_ne!(a.cert_pem, c.cert_pem);
        let _ = fs::remove_dir_all(&dir);
    }
}
