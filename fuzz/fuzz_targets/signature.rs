//! Any secret, body and header: verification answers without panicking, a signature verifies
//! under its own secret and body, and a Standard Webhooks secret is judged without panicking.
#![no_main]

use herald_shared::signature;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &[u8], &str)| {
    let (secret, body, header) = input;
    let sig = signature::cloudthinker(secret, body);
    assert!(signature::verify_cloudthinker(secret, body, &sig));
    assert_eq!(signature::verify_cloudthinker(secret, body, header), header == sig);
    if let Ok(key) = signature::standard_key(secret) {
        assert!((24..=64).contains(&key.len()));
        let entry = signature::standard(&key, "msg_1", 1_700_000_000, body);
        assert!(entry.starts_with("v1,"));
    }
});
