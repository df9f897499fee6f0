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

/// One generator per process, so that ids made within the same millisecond still sort in the
/// order they were made.
static GENERATOR: std::sync::Mutex<ulid::Generator> = std::sync::Mutex::new(ulid::Generator::new());

/// A new id: `prefix_` followed by a lowercase ULID (26 characters), strictly increasing within
/// this process.
pub fn new_id(prefix: &str) -> String {
    let next = GENERATOR.lock().map(|mut g| g.generate().ok()).ok().flatten();
    // The random part overflows only after 2^80 ids in one millisecond; fall back to a fresh one.
    let ulid = next.unwrap_or_else(ulid::Ulid::generate).to_string().to_ascii_lowercase();
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
        let ids: Vec<String> = (0..10_000).map(|_| new_id(EVENT)).collect();
        assert!(has_prefix(&ids[0], EVENT), "{}", ids[0]);
        assert!(!has_prefix(&ids[0], DELIVERY));
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids made in the same millisecond keep their order");
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
