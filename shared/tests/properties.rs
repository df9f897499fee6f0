//! Properties of the envelope and the signature schemes over generated input: what receivers
//! parse and verify must hold for every id, type, payload and secret, not just the examples.

use base64::Engine as _;
use herald_shared::{envelope, signature};
use proptest::prelude::*;
use serde_json::{Map, Value};

/// JSON values up to a few levels deep, with every kind of string a publisher might send.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn json_object() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(any::<String>(), json_value(), 0..8).prop_map(|m| m.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_envelope_is_json_with_every_field_intact(
        id in any::<String>(),
        event_type in any::<String>(),
        timestamp in any::<String>(),
        workspace in any::<String>(),
        data in json_object(),
        pretty in any::<bool>(),
    ) {
        // Publishers' spelling of `data` is kept byte for byte, whitespace and all.
        let data_json = if pretty {
            serde_json::to_string_pretty(&data).unwrap()
        } else {
            serde_json::to_string(&data).unwrap()
        };
        let bytes = envelope::build(&id, &event_type, &timestamp, &workspace, &data_json);
        let parsed: Map<String, Value> = serde_json::from_slice(&bytes).expect("the envelope is JSON");
        let keys: Vec<&str> = parsed.keys().map(String::as_str).collect();
        prop_assert_eq!(keys.len(), 5);
        prop_assert_eq!(&parsed["id"], &Value::String(id));
        prop_assert_eq!(&parsed["type"], &Value::String(event_type));
        prop_assert_eq!(&parsed["timestamp"], &Value::String(timestamp));
        prop_assert_eq!(&parsed["workspace_id"], &Value::String(workspace));
        let sent: Value = serde_json::from_str(&data_json).unwrap();
        prop_assert_eq!(&parsed["data"], &sent);
        let tail = format!(",\"data\":{data_json}}}");
        prop_assert!(bytes.ends_with(tail.as_bytes()), "data is embedded verbatim");
    }

    #[test]
    fn a_cloudthinker_signature_verifies_and_nothing_else_does(
        secret in "[ -~]{16,64}",
        other in "[ -~]{16,64}",
        body in prop::collection::vec(any::<u8>(), 0..2048),
        flip in any::<prop::sample::Index>(),
        header in any::<String>(),
    ) {
        let sig = signature::cloudthinker(&secret, &body);
        prop_assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64);
        prop_assert!(signature::verify_cloudthinker(&secret, &body, &sig));
        if other != secret {
            prop_assert!(!signature::verify_cloudthinker(&other, &body, &sig));
        }
        if !body.is_empty() {
            let mut tampered = body.clone();
            tampered[flip.index(body.len())] ^= 0x01;
            prop_assert!(!signature::verify_cloudthinker(&secret, &tampered, &sig));
        }
        // Any header at all is answered, never a panic; only the signature itself verifies.
        prop_assert_eq!(signature::verify_cloudthinker(&secret, &body, &header), header == sig);
    }

    #[test]
    fn standard_webhooks_signatures_match_the_reference_implementation(
        key in prop::collection::vec(any::<u8>(), 24..=64),
        msg_id in "[a-zA-Z0-9_]{1,40}",
        timestamp in 0i64..4_000_000_000,
        body in any::<String>(), // the reference signs text only
    ) {
        let body = body.into_bytes();
        let secret = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(&key));
        prop_assert_eq!(signature::standard_key(&secret).unwrap(), key.clone());
        let ours = signature::standard(&key, &msg_id, timestamp, &body);
        let reference = standardwebhooks::Webhook::new(&secret).unwrap().sign(&msg_id, timestamp, &body).unwrap();
        prop_assert_eq!(ours, reference);
    }

    #[test]
    fn any_string_is_judged_as_a_standard_secret_without_panicking(s in any::<String>()) {
        if let Ok(key) = signature::standard_key(&s) {
            prop_assert!(s.starts_with("whsec_") && (24..=64).contains(&key.len()));
        }
    }
}
