//! The signature schemes receivers verify.
//!
//! - CloudThinker: `X-CloudThinker-Signature: sha256=<lowercase hex HMAC-SHA256(secret, body)>`,
//!   keyed by the secret string's UTF-8 bytes exactly as the user sees it (what the documented
//!   Python verifier does with `secret.encode()`).
//! - Standard Webhooks: `webhook-signature: v1,<base64 HMAC-SHA256(key, "id.timestamp.body")>`,
//!   keyed by the base64-decoded part of the secret after `whsec_`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore as _;
use ring::hmac;

/// Prefix of every generated secret, and of Standard Webhooks secrets.
pub const SECRET_PREFIX: &str = "whsec_";

/// A secret that cannot key the Standard Webhooks scheme.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("a Standard Webhooks secret must start with whsec_")]
    Prefix,
    #[error("the part after whsec_ is not valid base64")]
    Base64,
    #[error("the part after whsec_ must decode to 24 to 64 bytes, not {0}")]
    Length(usize),
}

/// A new secret: `whsec_` + base64 of 32 random bytes.
pub fn generate_secret() -> String {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    format!("{SECRET_PREFIX}{}", STANDARD.encode(raw))
}

/// `sha256=<hex>` of the CloudThinker scheme.
pub fn cloudthinker(secret: &str, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let tag = hmac::sign(&key, body);
    format!("sha256={}", hex::encode(tag.as_ref()))
}

/// Whether `header` is the CloudThinker signature of `body` under `secret` (constant time).
pub fn verify_cloudthinker(secret: &str, body: &[u8], header: &str) -> bool {
    let Some(hex_sig) = header.strip_prefix("sha256=") else { return false };
    let Ok(tag) = hex::decode(hex_sig) else { return false };
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    hmac::verify(&key, body, &tag).is_ok()
}

/// The HMAC key of a Standard Webhooks secret (`whsec_` + base64 of 24 to 64 bytes).
pub fn standard_key(secret: &str) -> Result<Vec<u8>, SecretError> {
    let encoded = secret.strip_prefix(SECRET_PREFIX).ok_or(SecretError::Prefix)?;
    let raw = STANDARD.decode(encoded).map_err(|_| SecretError::Base64)?;
    if (24..=64).contains(&raw.len()) { Ok(raw) } else { Err(SecretError::Length(raw.len())) }
}

/// One `v1,<base64>` entry of the Standard Webhooks `webhook-signature` header.
pub fn standard(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(msg_id.as_bytes());
    ctx.update(b".");
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("v1,{}", STANDARD.encode(ctx.sign().as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4231_test_case_2() {
        let sig = cloudthinker("Jefe", b"what do ya want for nothing?");
        assert_eq!(sig, "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        assert!(verify_cloudthinker("Jefe", b"what do ya want for nothing?", &sig));
        assert!(!verify_cloudthinker("Jefe", b"what do ya want for nothing!", &sig));
        assert!(!verify_cloudthinker("jefe", b"what do ya want for nothing?", &sig));
        assert!(!verify_cloudthinker("Jefe", b"what do ya want for nothing?", "5bdcc146"));
    }

    #[test]
    fn standard_webhooks_reference_vector() {
        let key = standard_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = standard(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, br#"{"test": 2432232314}"#);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn generated_secrets_key_both_schemes() {
        let s = generate_secret();
        assert!(s.starts_with(SECRET_PREFIX));
        assert_eq!(standard_key(&s).unwrap().len(), 32);
        assert_ne!(s, generate_secret());
    }

    #[test]
    fn standard_keys_are_checked() {
        assert_eq!(standard_key("secret_abc"), Err(SecretError::Prefix));
        assert_eq!(standard_key("whsec_!!!"), Err(SecretError::Base64));
        assert_eq!(standard_key(&format!("whsec_{}", STANDARD.encode([0u8; 8]))), Err(SecretError::Length(8)));
    }
}
