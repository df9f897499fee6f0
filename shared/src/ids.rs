//! Prefixed, time-ordered identifiers (`evt_…`, `dlv_…`, `wh_…`).
//!
//! A ULID sorts by creation time, so the primary key order is also the creation order: pagination
//! is by id, and the newest rows are at one end of every index.

/// Prefix of webhook ids.
pub const WEBHOOK: &str = "wh";
/// Prefix of generated event ids.
pub const EVENT: &str = "evt";
/// Prefix of delivery ids.
pub const DELIVERY: &str = "dlv";
/// Prefix of attempt ids.
pub const ATTEMPT: &str = "att";
/// Prefix of API key ids.
pub const API_KEY: &str = "key";
/// Prefix of lease ids.
pub const LEASE: &str = "lse";
/// Prefix of agent ids generated when an agent gives none.
pub const AGENT: &str = "agt";

/// A new id: `prefix_` followed by a lowercase ULID (26 characters).
pub fn new_id(prefix: &str) -> String {
    let ulid = ulid::Ulid::generate().to_string().to_ascii_lowercase();
    let mut id = String::with_capacity(prefix.len() + 1 + ulid.len());
    id.push_str(prefix);
    id.push('_');
    id.push_str(&ulid);
    id
}

/// Whether `id` looks like an id of this prefix (`prefix_` and 26 base32 characters).
pub fn has_prefix(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('_'))
        .is_some_and(|ulid| ulid.len() == 26 && ulid.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Whether `id` is a valid event id: `[A-Za-z0-9_-]{1,64}`.
pub fn is_valid_event_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_prefixed_and_ordered() {
        let a = new_id(EVENT);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_id(EVENT);
        assert!(has_prefix(&a, EVENT), "{a}");
        assert!(!has_prefix(&a, DELIVERY));
        assert!(a < b, "{a} should sort before {b}");
    }

    #[test]
    fn event_id_charset() {
        assert!(is_valid_event_id("evt_abc-123"));
        assert!(is_valid_event_id(&"a".repeat(64)));
        assert!(!is_valid_event_id(""));
        assert!(!is_valid_event_id(&"a".repeat(65)));
        assert!(!is_valid_event_id("evt abc"));
        assert!(!is_valid_event_id("évt"));
    }
}
