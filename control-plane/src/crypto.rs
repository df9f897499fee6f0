//! Secrets at rest: webhook secrets, custom header values and transform variables are sealed with
//! ChaCha20-Poly1305 (ring's AEAD) under the `--secret-key` before they reach the database.
//!
//! A sealed value reads `v1.<key id>.<base64 of nonce ‖ ciphertext ‖ tag>`. The key id (the first
//! 8 hex digits of SHA-256 of the key) says which key sealed it, so that a future key rotation can
//! keep old keys for opening. The associated data binds a value to its purpose (`webhook.secret`,
//! `webhook.headers`, …) so that a sealed value copied into another column does not open.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

/// The master key, and the retired keys that may still open values sealed before a rotation of
/// the master key (`--previous-secret-key`; `herald rekey` re-seals them under the current one).
/// `Debug` never prints a key.
#[derive(Clone)]
pub struct SecretKey {
    raw: [u8; 32],
    id: String,
    retired: std::sync::Arc<Vec<SecretKey>>,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({}, ***)", self.id)
    }
}

/// Why a key or a sealed value is unusable. Never contains the secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("the key must be 32 bytes in base64")]
    KeyFormat,
    #[error("sealed value is malformed")]
    Malformed,
    #[error("sealed with key {0}, which is not configured")]
    UnknownKey(String),
    #[error("sealed value does not authenticate")]
    Authentication,
}

impl SecretKey {
    /// A key from 32 raw bytes.
    pub fn from_bytes(raw: [u8; 32]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, &raw);
        SecretKey { raw, id: hex::encode(&digest.as_ref()[..4]), retired: Default::default() }
    }

    /// This key for sealing, and `retired` keys besides it for opening.
    pub fn with_retired(self, retired: Vec<SecretKey>) -> Self {
        SecretKey { retired: std::sync::Arc::new(retired), ..self }
    }

    /// The id that sealed values carry: the first 8 hex digits of the key's SHA-256.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether `sealed` was sealed by this key (not by a retired one).
    pub fn sealed_by_current(&self, sealed: &str) -> bool {
        sealed.split('.').nth(1) == Some(self.id.as_str())
    }

    /// A key from base64 (standard or URL-safe) of 32 bytes.
    pub fn from_base64(text: &str) -> Result<Self, CryptoError> {
        let text = text.trim();
        let bytes =
            STANDARD.decode(text).or_else(|_| URL_SAFE_NO_PAD.decode(text)).map_err(|_| CryptoError::KeyFormat)?;
        let raw: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::KeyFormat)?;
        Ok(Self::from_bytes(raw))
    }

    /// A new random key, in base64.
    pub fn generate_base64() -> String {
        let mut raw = [0u8; 32];
        SystemRandom::new().fill(&mut raw).expect("the system random source works");
        STANDARD.encode(raw)
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &self.raw).expect("a 32-byte key is valid"))
    }

    /// Seals `plaintext` for `purpose`.
    pub fn seal(&self, purpose: &str, plaintext: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).expect("the system random source works");
        let mut buf = plaintext.to_vec();
        self.aead()
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(purpose.as_bytes()), &mut buf)
            .expect("sealing cannot fail for in-memory sizes");
        let mut out = Vec::with_capacity(NONCE_LEN + buf.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        format!("v1.{}.{}", self.id, URL_SAFE_NO_PAD.encode(out))
    }

    /// Opens a value sealed for `purpose`.
    pub fn open(&self, purpose: &str, sealed: &str) -> Result<Vec<u8>, CryptoError> {
        let mut parts = sealed.splitn(3, '.');
        let (Some("v1"), Some(kid), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(CryptoError::Malformed);
        };
        let key = match kid == self.id {
            true => self,
            false => {
                self.retired.iter().find(|k| k.id == kid).ok_or_else(|| CryptoError::UnknownKey(kid.to_owned()))?
            }
        };
        let mut bytes = URL_SAFE_NO_PAD.decode(body).map_err(|_| CryptoError::Malformed)?;
        if bytes.len() < NONCE_LEN {
            return Err(CryptoError::Malformed);
        }
        let mut ciphertext = bytes.split_off(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(&bytes).map_err(|_| CryptoError::Malformed)?;
        let plain = key
            .aead()
            .open_in_place(nonce, Aad::from(purpose.as_bytes()), &mut ciphertext)
            .map_err(|_| CryptoError::Authentication)?;
        Ok(plain.to_vec())
    }

    /// Seals a UTF-8 string.
    pub fn seal_str(&self, purpose: &str, plaintext: &str) -> String {
        self.seal(purpose, plaintext.as_bytes())
    }

    /// Opens a sealed UTF-8 string.
    pub fn open_str(&self, purpose: &str, sealed: &str) -> Result<String, CryptoError> {
        String::from_utf8(self.open(purpose, sealed)?).map_err(|_| CryptoError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trips_and_hides_the_plaintext() {
        let key = SecretKey::from_bytes([1; 32]);
        let sealed = key.seal_str("webhook.secret", "whsec_topsecretvalue");
        assert!(!sealed.contains("topsecret"));
        assert_eq!(key.open_str("webhook.secret", &sealed).unwrap(), "whsec_topsecretvalue");
        assert_ne!(sealed, key.seal_str("webhook.secret", "whsec_topsecretvalue"), "nonces differ");
    }

    #[test]
    fn wrong_purpose_key_or_tampering_fails() {
        let key = SecretKey::from_bytes([1; 32]);
        let sealed = key.seal_str("webhook.secret", "s");
        assert_eq!(key.open("webhook.headers", &sealed), Err(CryptoError::Authentication));
        let other = SecretKey::from_bytes([2; 32]);
        assert!(matches!(other.open("webhook.secret", &sealed), Err(CryptoError::UnknownKey(_))));
        let mut tampered = sealed.clone();
        tampered.pop();
        tampered.push(if sealed.ends_with('A') { 'B' } else { 'A' });
        assert!(key.open("webhook.secret", &tampered).is_err());
        assert_eq!(key.open("webhook.secret", "plain"), Err(CryptoError::Malformed));
    }

    #[test]
    fn retired_keys_open_what_they_sealed_and_never_seal() {
        let old = SecretKey::from_bytes([1; 32]);
        let sealed = old.seal_str("webhook.secret", "s");
        let new = SecretKey::from_bytes([2; 32]).with_retired(vec![old.clone()]);
        assert_eq!(new.open_str("webhook.secret", &sealed).unwrap(), "s");
        assert!(!new.sealed_by_current(&sealed));
        let resealed = new.seal_str("webhook.secret", "s");
        assert!(new.sealed_by_current(&resealed) && resealed.split('.').nth(1) == Some(new.id()));
        assert!(matches!(old.open("webhook.secret", &resealed), Err(CryptoError::UnknownKey(_))));
    }

    #[test]
    fn keys_parse_from_base64() {
        let text = SecretKey::generate_base64();
        assert!(SecretKey::from_base64(&text).is_ok());
        assert_eq!(SecretKey::from_base64("c2hvcnQ=").unwrap_err(), CryptoError::KeyFormat);
    }
}
