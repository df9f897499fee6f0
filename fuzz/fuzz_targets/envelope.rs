//! Any fields and any valid JSON object as `data`: the envelope is JSON holding exactly them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fuzz_target!(|input: (&str, &str, &str, &str, &str)| {
    let (id, event_type, timestamp, workspace, data_json) = input;
    // The control plane only wraps data it validated as a JSON object.
    let Ok(Value::Object(data)) = serde_json::from_str::<Value>(data_json) else { return };
    let bytes = herald_shared::envelope::build(id, event_type, timestamp, workspace, data_json);
    let parsed: Map<String, Value> = serde_json::from_slice(&bytes).expect("the envelope is JSON");
    assert_eq!(parsed["id"], id);
    assert_eq!(parsed["type"], event_type);
    assert_eq!(parsed["timestamp"], timestamp);
    assert_eq!(parsed["workspace_id"], workspace);
    assert_eq!(parsed["data"], Value::Object(data));
});
