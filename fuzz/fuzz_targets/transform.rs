//! Any transform leaf over any event data: checking and rendering end (fuel) without panicking,
//! and whatever renders is JSON.
#![no_main]

use herald_control_plane::transform::{check, render};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

fuzz_target!(|input: (&str, &str)| {
    let (template, data_json) = input;
    let data = match serde_json::from_str::<Value>(data_json) {
        Ok(Value::Object(map)) => Value::Object(map),
        _ => json!({"title": data_json}),
    };
    let envelope = herald_shared::envelope::build("evt_1", "incident.created", "t", "ws_1", &data.to_string());
    let transform = json!({"leaf": template, "list": [template]});
    let _ = check(&transform, "transform");
    let vars = [("key".to_owned(), "value".to_owned())].into();
    if let Ok(body) = render(&transform, &envelope, &vars) {
        serde_json::from_slice::<Value>(&body).expect("a rendered transform is JSON");
    }
});
