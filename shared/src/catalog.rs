//! The event-type catalog and subscription matching.
//!
//! The 20 types of the product documentation, plus Herald's own operational types. `*` matches
//! every type except `webhook.*`, so that a catch-all subscription can never receive Herald's own
//! failure notifications (and so can never loop); those are subscribed to by name or by
//! `webhook.*`.

/// One catalog entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventType {
    /// `incident.created`.
    pub name: &'static str,
    /// `Incident Events`.
    pub category: &'static str,
    /// What triggers it.
    pub description: &'static str,
}

/// Herald's operational event, published when a delivery exhausts its retry schedule.
pub const DELIVERY_FAILED: &str = "webhook.delivery.failed";
/// The default type of `SendTestEvent`.
pub const TEST: &str = "webhook.test";

const fn t(name: &'static str, category: &'static str, description: &'static str) -> EventType {
    EventType { name, category, description }
}

/// Every event type, in the documentation's order.
pub const EVENT_TYPES: &[EventType] = &[
    t("recommendation.created", "Recommendation Events", "New recommendation generated"),
    t("recommendation.updated", "Recommendation Events", "Recommendation status changed"),
    t("recommendation.implemented", "Recommendation Events", "Recommendation marked complete"),
    t("recommendation.comment", "Recommendation Events", "Comment added to recommendation"),
    t("incident.created", "Incident Events", "New incident created"),
    t("incident.updated", "Incident Events", "Incident details changed"),
    t("incident.resolved", "Incident Events", "Incident marked resolved"),
    t("incident.comment", "Incident Events", "Comment added to incident"),
    t("finding.created", "Security Events", "New security finding detected"),
    t("finding.resolved", "Security Events", "Security finding resolved"),
    t("compliance.changed", "Security Events", "Compliance status changed"),
    t("task.started", "Task Events", "Scheduled task began execution"),
    t("task.completed", "Task Events", "Task finished successfully"),
    t("task.failed", "Task Events", "Task encountered an error"),
    t("conversation.completed", "Agent Events", "Agent conversation finished"),
    t("approval.requested", "Agent Events", "Agent requests approval for action"),
    t("approval.granted", "Agent Events", "User approved agent action"),
    t("resource.discovered", "Resource Events", "New cloud resource found"),
    t("resource.changed", "Resource Events", "Resource configuration changed"),
    t("resource.deleted", "Resource Events", "Resource no longer exists"),
    t(
        DELIVERY_FAILED,
        "Herald Events",
        "A delivery failed its last retry attempt (data: webhook_id, webhook_name, delivery_id, event_id, event_type, attempts, last_status, last_error)",
    ),
    t(TEST, "Herald Events", "A test event sent with SendTestEvent"),
];

/// Whether `name` is Herald's own type (`webhook.*`): not publishable, not matched by `*`.
pub fn is_operational(name: &str) -> bool {
    name.starts_with("webhook.")
}

/// Looks a type up in the catalog.
pub fn find(name: &str) -> Option<&'static EventType> {
    EVENT_TYPES.iter().find(|t| t.name == name)
}

/// Whether `pattern` is a valid subscription: a catalog type, `*`, or `group.*` for a group that
/// has at least one catalog type (`incident.*`, `webhook.*`).
pub fn is_valid_pattern(pattern: &str) -> bool {
    if pattern == "*" || find(pattern).is_some() {
        return true;
    }
    match pattern.strip_suffix(".*") {
        Some(group) if !group.is_empty() => {
            EVENT_TYPES.iter().any(|t| t.name.strip_prefix(group).is_some_and(|rest| rest.starts_with('.')))
        }
        _ => false,
    }
}

/// Whether a subscription `pattern` matches `event_type`.
pub fn pattern_matches(pattern: &str, event_type: &str) -> bool {
    if pattern == "*" {
        return !is_operational(event_type);
    }
    match pattern.strip_suffix(".*") {
        Some(group) => event_type.strip_prefix(group).is_some_and(|rest| rest.starts_with('.')),
        None => pattern == event_type,
    }
}

/// Whether any of `patterns` matches `event_type`.
pub fn subscribes<S: AsRef<str>>(patterns: &[S], event_type: &str) -> bool {
    patterns.iter().any(|p| pattern_matches(p.as_ref(), event_type))
}

/// Whether `patterns` names `event_type` explicitly: by name or by `group.*`, not through `*`.
/// Operational events go only to webhooks that subscribe explicitly.
pub fn subscribes_explicitly<S: AsRef<str>>(patterns: &[S], event_type: &str) -> bool {
    patterns.iter().any(|p| p.as_ref() != "*" && pattern_matches(p.as_ref(), event_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_has_the_documented_types() {
        let documented = EVENT_TYPES.iter().filter(|t| !is_operational(t.name)).count();
        assert_eq!(documented, 20);
        assert!(find(DELIVERY_FAILED).is_some());
        assert!(find(TEST).is_some());
        assert_eq!(find("incident.created").unwrap().description, "New incident created");
    }

    #[test]
    fn patterns() {
        assert!(is_valid_pattern("*"));
        assert!(is_valid_pattern("incident.*"));
        assert!(is_valid_pattern("webhook.*"));
        assert!(is_valid_pattern("task.failed"));
        assert!(!is_valid_pattern("incident"));
        assert!(!is_valid_pattern("incident.exploded"));
        assert!(!is_valid_pattern("nope.*"));
        assert!(!is_valid_pattern(".*"));
        assert!(!is_valid_pattern("incid.*"));
    }

    #[test]
    fn star_excludes_operational_types() {
        assert!(pattern_matches("*", "incident.created"));
        assert!(!pattern_matches("*", DELIVERY_FAILED));
        assert!(!pattern_matches("*", TEST));
        assert!(pattern_matches("webhook.*", DELIVERY_FAILED));
        assert!(pattern_matches(DELIVERY_FAILED, DELIVERY_FAILED));
        assert!(pattern_matches("incident.*", "incident.resolved"));
        assert!(!pattern_matches("incident.*", "incidental.created"));
        assert!(!subscribes_explicitly(&["*"], DELIVERY_FAILED));
        assert!(subscribes_explicitly(&["*", "webhook.delivery.failed"], DELIVERY_FAILED));
    }
}
