//! The event envelope receivers get: `{"id":…,"type":…,"timestamp":…,"workspace_id":…,"data":{…}}`.
//!
//! These are exactly the bytes that are signed. `data` is embedded byte for byte as the publisher
//! gave it, so numbers like `150.00` keep their spelling.

use chrono::{DateTime, SecondsFormat, Utc};

/// Builds the envelope around already-validated `data_json` (a JSON object).
pub fn build(id: &str, event_type: &str, timestamp: &str, workspace_id: &str, data_json: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(data_json.len() + id.len() + event_type.len() + workspace_id.len() + 96);
    out.extend_from_slice(b"{\"id\":");
    push_json_string(&mut out, id);
    out.extend_from_slice(b",\"type\":");
    push_json_string(&mut out, event_type);
    out.extend_from_slice(b",\"timestamp\":");
    push_json_string(&mut out, timestamp);
    out.extend_from_slice(b",\"workspace_id\":");
    push_json_string(&mut out, workspace_id);
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(data_json.as_bytes());
    out.push(b'}');
    out
}

fn push_json_string(out: &mut Vec<u8>, s: &str) {
    // serde_json's escaping is the reference; writing into a Vec cannot fail.
    serde_json::to_writer(&mut *out, s).expect("writing a string to a Vec cannot fail");
}

/// Formats an instant the way envelopes carry it: RFC 3339, UTC, `Z`, fractional seconds only
/// when there are any (`2024-01-15T10:30:00Z`, `2024-01-15T10:30:00.250Z`).
pub fn format_timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_embeds_data_byte_for_byte() {
        let body = build(
            "evt_1",
            "recommendation.created",
            "2024-01-15T10:30:00Z",
            "ws_xyz789",
            r#"{"potential_savings": 150.00}"#,
        );
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"id":"evt_1","type":"recommendation.created","timestamp":"2024-01-15T10:30:00Z","workspace_id":"ws_xyz789","data":{"potential_savings": 150.00}}"#
        );
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed["data"]["potential_savings"], 150.0);
    }

    #[test]
    fn strings_are_escaped() {
        let body = build("a\"b", "t", "ts", "ws", "{}");
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed["id"], "a\"b");
    }

    #[test]
    fn timestamps_are_utc_with_z() {
        let t = DateTime::parse_from_rfc3339("2024-01-15T12:30:00+02:00").unwrap().with_timezone(&Utc);
        assert_eq!(format_timestamp(t), "2024-01-15T10:30:00Z");
        let t = DateTime::from_timestamp(1_705_314_600, 250_000_000).unwrap();
        assert_eq!(format_timestamp(t), "2024-01-15T10:30:00.250Z");
    }
}
