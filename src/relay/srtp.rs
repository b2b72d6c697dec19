//! SRTP protection of forwarded RTP, done by the relay itself.
//!
//! str0m runs each receiver's ICE, DTLS and RTCP, but pushing every forwarded
//! copy through its send pipeline costs about 10 µs per copy, most of the
//! relay's time. str0m keeps its SRTP keys to itself, so this module taps the
//! DTLS-SRTP keying material as str0m's DTLS instance hands it over: the
//! receivers' `Rtc`s are built with a crypto provider whose DTLS factory wraps
//! the default one ([`build_tapped`]). From that material [`SrtpTx`] derives
//! the outbound RTP session keys (RFC 3711 §4.3, RFC 7714 §11) and protects a
//! copy with one cipher call. Every other byte str0m sends (STUN, DTLS, SRTCP)
//! still comes from str0m, with its own contexts.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use str0m::crypto::dtls::{
    DtlsCert, DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, DtlsVersion, ProtocolVersion,
    SrtpProfile,
};
use str0m::crypto::{
    AeadAes128Gcm, AeadAes128GcmCipher, AeadAes256Gcm, AeadAes256GcmCipher, Aes128CmSha1_80,
    Aes128CmSha1_80Cipher, CryptoError, CryptoProvider, Sha1HmacProvider, SrtpProvider,
};
use str0m::{Rtc, RtcConfig};

/// The DTLS-SRTP keying material of one peer, as exported by its handshake.
#[derive(Clone)]
pub struct Keys {
    material: Vec<u8>,
    profile: SrtpProfile,
    /// We were the DTLS client: our outbound keys are the client's (left) half.
    client: bool,
}

/// Filled once, when the peer's DTLS handshake exports its keys.
pub type KeySlot = Arc<OnceLock<Keys>>;

/// A crypto provider like str0m's default, but with DTLS instances that
/// report their SRTP keying material to the slot [`build_tapped`] set up.
pub fn tapped_provider() -> Arc<CryptoProvider> {
    static TAP: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    TAP.get_or_init(|| {
        let mut provider = str0m::crypto::from_feature_flags();
        let inner = provider.dtls_provider;
        provider.dtls_provider = Box::leak(Box::new(TapProvider { inner }));
        Arc::new(provider)
    })
    .clone()
}

thread_local! {
    /// The slot of the `Rtc` being built on this thread, for its DTLS instance.
    static BUILDING: RefCell<Option<KeySlot>> = const { RefCell::new(None) };
}

/// Builds an `Rtc` with the tapped provider; the slot receives its keys.
pub fn build_tapped(config: RtcConfig, now: Instant) -> (Rtc, KeySlot) {
    let slot = KeySlot::default();
    BUILDING.with(|b| *b.borrow_mut() = Some(slot.clone()));
    let rtc = config.set_crypto_provider(tapped_provider()).build(now);
    BUILDING.with(|b| b.borrow_mut().take());
    (rtc, slot)
}

#[derive(Debug)]
struct TapProvider {
    inner: &'static dyn DtlsProvider,
}

impl DtlsProvider for TapProvider {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        self.inner.generate_certificate()
    }

    fn new_dtls(
        &self,
        cert: &DtlsCert,
        now: Instant,
        version: DtlsVersion,
        mtu: Option<usize>,
    ) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        let inner = self.inner.new_dtls(cert, now, version, mtu)?;
        // An instance built outside `build_tapped` reports into a slot nobody reads.
        let slot = BUILDING.with(|b| b.borrow().clone()).unwrap_or_default();
        Ok(Box::new(TapInstance { inner, slot }))
    }
}

struct TapInstance {
    inner: Box<dyn DtlsInstance>,
    slot: KeySlot,
}

impl std::fmt::Debug for TapInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapInstance").finish_non_exhaustive()
    }
}

impl DtlsInstance for TapInstance {
    fn set_active(&mut self, active: bool) {
        self.inner.set_active(active)
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        self.inner.handle_packet(packet)
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        let out = self.inner.poll_output(buf);
        if let DtlsOutput::KeyingMaterial(material, profile) = &out {
            let _ = self
                .slot
                .set(Keys::new(material, *profile, self.inner.is_active()));
        }
        out
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.inner.handle_timeout(now)
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<usize, DtlsImplError> {
        self.inner.send_application_data(data)
    }

    fn is_active(&self) -> bool {
        self.inner.is_active()
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.inner.protocol_version()
    }

    fn is_closing(&self) -> bool {
        self.inner.is_closing()
    }

    fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.inner.close()
    }
}

/// KDF labels (RFC 3711 §4.3.1).
const LABEL_RTP_ENCRYPTION: u8 = 0x00;
const LABEL_RTP_AUTH: u8 = 0x01;
const LABEL_RTP_SALT: u8 = 0x02;

/// The outbound SRTP context of one receiver: session keys for its RTP.
pub struct SrtpTx {
    cipher: Cipher,
}

enum Cipher {
    CmSha1 {
        aes: Box<dyn Aes128CmSha1_80Cipher>,
        salt: [u8; 14],
        auth: [u8; 20],
        hmac: &'static dyn Sha1HmacProvider,
    },
    Gcm128 {
        aead: Box<dyn AeadAes128GcmCipher>,
        salt: [u8; 12],
    },
    Gcm256 {
        aead: Box<dyn AeadAes256GcmCipher>,
        salt: [u8; 12],
    },
}

impl SrtpTx {
    /// The outbound context for `keys`, or `None` for a profile we do not know.
    pub fn new(keys: &Keys, provider: &CryptoProvider) -> Option<SrtpTx> {
        let srtp = provider.srtp_provider;
        let cipher = match keys.profile {
            SrtpProfile::AES128_CM_SHA1_80 => {
                let (master, master_salt) = keys.halves::<16, 14>()?;
                let kdf = Kdf::new(srtp, &master, &master_salt);
                Cipher::CmSha1 {
                    aes: srtp
                        .aes_128_cm_sha1_80()
                        .create_cipher(kdf.derive(LABEL_RTP_ENCRYPTION), true),
                    salt: kdf.derive(LABEL_RTP_SALT),
                    auth: kdf.derive(LABEL_RTP_AUTH),
                    hmac: provider.sha1_hmac_provider,
                }
            }
            SrtpProfile::AEAD_AES_128_GCM => {
                let (master, master_salt) = keys.halves::<16, 12>()?;
                let kdf = Kdf::new(srtp, &master, &master_salt);
                Cipher::Gcm128 {
                    aead: srtp
                        .aead_aes_128_gcm()
                        .create_cipher(kdf.derive(LABEL_RTP_ENCRYPTION), true),
                    salt: kdf.derive(LABEL_RTP_SALT),
                }
            }
            SrtpProfile::AEAD_AES_256_GCM => {
                let (master, master_salt) = keys.halves::<32, 12>()?;
                let kdf = Kdf::new(srtp, &master, &master_salt);
                Cipher::Gcm256 {
                    aead: srtp
                        .aead_aes_256_gcm()
                        .create_cipher(kdf.derive(LABEL_RTP_ENCRYPTION), true),
                    salt: kdf.derive(LABEL_RTP_SALT),
                }
            }
            _ => return None,
        };
        Some(SrtpTx { cipher })
    }

    /// The SRTP packet for RTP `header` + `payload`: `index` is the packet's
    /// extended sequence number (ROC << 16 | seq), `ssrc` the one in `header`.
    pub fn protect(
        &mut self,
        header: &[u8],
        payload: &[u8],
        ssrc: u32,
        index: u64,
    ) -> Result<Vec<u8>, CryptoError> {
        let hlen = header.len();
        let roc = (index >> 16) as u32;
        match &mut self.cipher {
            Cipher::CmSha1 {
                aes,
                salt,
                auth,
                hmac,
            } => {
                // The CTR cipher wants room past the payload; the tag uses it.
                let tag = Aes128CmSha1_80::HMAC_TAG_LEN;
                let mut out = vec![0u8; hlen + payload.len() + tag.max(16)];
                out[..hlen].copy_from_slice(header);
                let iv = Aes128CmSha1_80::rtp_iv(*salt, ssrc, index);
                aes.encrypt(&iv, payload, &mut out[hlen..])?;
                let end = hlen + payload.len();
                let mac = hmac.sha1_hmac(auth, &[&out[..end], &roc.to_be_bytes()]);
                out[end..end + tag].copy_from_slice(&mac[..tag]);
                out.truncate(end + tag);
                Ok(out)
            }
            Cipher::Gcm128 { aead, salt } => {
                let mut out = vec![0u8; hlen + payload.len() + AeadAes128Gcm::TAG_LEN];
                out[..hlen].copy_from_slice(header);
                let iv = AeadAes128Gcm::rtp_iv(*salt, ssrc, roc, index as u16);
                aead.encrypt(&iv, header, payload, &mut out[hlen..])?;
                Ok(out)
            }
            Cipher::Gcm256 { aead, salt } => {
                let mut out = vec![0u8; hlen + payload.len() + AeadAes256Gcm::TAG_LEN];
                out[..hlen].copy_from_slice(header);
                let iv = AeadAes256Gcm::rtp_iv(*salt, ssrc, roc, index as u16);
                aead.encrypt(&iv, header, payload, &mut out[hlen..])?;
                Ok(out)
            }
        }
    }
}

impl Keys {
    /// Keys from exported DTLS-SRTP material (client key, server key, client
    /// salt, server salt); `client` if we were the DTLS client.
    pub fn new(material: &[u8], profile: SrtpProfile, client: bool) -> Keys {
        Keys {
            material: material.to_vec(),
            profile,
            client,
        }
    }

    pub fn profile(&self) -> SrtpProfile {
        self.profile
    }

    /// Our outbound master key and salt. The exported material is laid out
    /// client key, server key, client salt, server salt (RFC 5764 §4.2).
    fn halves<const K: usize, const S: usize>(&self) -> Option<([u8; K], [u8; S])> {
        if self.material.len() != 2 * K + 2 * S {
            return None;
        }
        let (k, s) = if self.client {
            (0, 2 * K)
        } else {
            (K, 2 * K + S)
        };
        let key = self.material[k..k + K].try_into().ok()?;
        let salt = self.material[s..s + S].try_into().ok()?;
        Some((key, salt))
    }
}

/// The AES-CM key derivation of RFC 3711 §4.3.3 with a key derivation rate
/// of zero: the session key for `label` is the AES keystream (under the
/// master key) from the block `(master_salt XOR label << 48) << 16`. A 12-byte
/// GCM master salt is zero-padded on the right to the 14 bytes of the block
/// prefix, as libsrtp does.
struct Kdf<'a> {
    srtp: &'a dyn SrtpProvider,
    master: &'a [u8],
    salt: [u8; 14],
}

impl<'a> Kdf<'a> {
    fn new(srtp: &'a dyn SrtpProvider, master: &'a [u8], master_salt: &[u8]) -> Self {
        let mut salt = [0u8; 14];
        salt[..master_salt.len()].copy_from_slice(master_salt);
        Kdf { srtp, master, salt }
    }

    fn derive<const N: usize>(&self, label: u8) -> [u8; N] {
        let mut out = [0u8; N];
        let mut block = [0u8; 16];
        block[..14].copy_from_slice(&self.salt);
        // key_id = label || r (r = 0, 48 bits) is right-aligned in 112 bits.
        block[7] ^= label;
        for (counter, chunk) in out.chunks_mut(16).enumerate() {
            block[14..].copy_from_slice(&(counter as u16).to_be_bytes());
            // The ECB round pads its output: give it room for two blocks.
            let mut keystream = [0u8; 32];
            if self.master.len() == 32 {
                self.srtp
                    .srtp_aes_256_ecb_round(self.master, &block, &mut keystream);
            } else {
                self.srtp
                    .srtp_aes_128_ecb_round(self.master, &block, &mut keystream);
            }
            chunk.copy_from_slice(&keystream[..chunk.len()]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 3711 Appendix B.3: key derivation test vectors.
    #[test]
    fn derives_rfc3711_session_keys() {
        let provider = tapped_provider();
        let master = hex("E1F97A0D3E018BE0D64FA32C06DE4139");
        let salt = hex("0EC675AD498AFEEBB6960B3AABE6");
        let kdf = Kdf::new(provider.srtp_provider, &master, &salt);
        let key: [u8; 16] = kdf.derive(LABEL_RTP_ENCRYPTION);
        let session_salt: [u8; 14] = kdf.derive(LABEL_RTP_SALT);
        let auth: [u8; 20] = kdf.derive(LABEL_RTP_AUTH);
        assert_eq!(key.to_vec(), hex("C61E7A93744F39EE10734AFE3FF7A087"));
        assert_eq!(session_salt.to_vec(), hex("30CBBC08863D8C85D49DB34A9AE1"));
        assert_eq!(
            auth.to_vec(),
            hex("CEBE321F6FF7716B6FD4AB49AF256A156D38BAA4")
        );
    }

    #[test]
    fn outbound_half_depends_on_dtls_role() {
        let material: Vec<u8> = (0u8..56).collect();
        let mut keys = Keys {
            material,
            profile: SrtpProfile::AEAD_AES_128_GCM,
            client: true,
        };
        let (k, s) = keys.halves::<16, 12>().unwrap();
        assert_eq!(k[0], 0);
        assert_eq!(s[0], 32);
        keys.client = false;
        let (k, s) = keys.halves::<16, 12>().unwrap();
        assert_eq!(k[0], 16);
        assert_eq!(s[0], 44);
        assert!(keys.halves::<32, 12>().is_none(), "wrong length refused");
    }
}
