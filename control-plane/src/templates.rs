//! Ready-made integration templates served by `ListTemplates`: Slack, Jira, PagerDuty (Events
//! API v2) and GitHub Actions (`repository_dispatch`). Their transforms follow the rules of
//! `Webhook.transform`: string leaves are minijinja templates over the envelope, and a leaf that is
//! exactly `{{ path }}` inserts the typed value.

use serde_json::{Value, json};

/// One template, in domain form.
pub struct Template {
    pub id: &'static str,
    pub name: &'static str,
    pub description: &'static str,
    pub url_pattern: &'static str,
    pub default_events: &'static [&'static str],
    pub headers: &'static [(&'static str, &'static str)],
    pub transform: Value,
    pub required_vars: &'static [&'static str],
}

/// Every template, in a stable order.
pub fn all() -> Vec<Template> {
    vec![
        Template {
            id: "slack",
            name: "Slack",
            description: "Posts a message to a Slack channel through an incoming webhook.",
            url_pattern: "https://hooks.slack.com/services/T000/B000/XXXX",
            default_events: &["recommendation.created", "incident.created"],
            headers: &[],
            transform: json!({"text": "New {{ type }}: {{ data.title }}"}),
            required_vars: &[],
        },
        Template {
            id: "jira",
            name: "Jira",
            description: "Creates a Jira issue through the REST API (POST /rest/api/2/issue). Set the Authorization header and transform_vars.project_key.",
            url_pattern: "https://your-org.atlassian.net/rest/api/2/issue",
            default_events: &["recommendation.created"],
            headers: &[("Authorization", "Basic <base64 of email:api_token>")],
            transform: json!({
                "fields": {
                    "project": {"key": "{{ vars.project_key }}"},
                    "summary": "{{ data.title | default(type ~ ' ' ~ id) }}",
                    "description": "CloudThinker {{ type }} {{ id }} at {{ timestamp }}",
                    "issuetype": {"name": "Task"}
                }
            }),
            required_vars: &["project_key"],
        },
        Template {
            id: "pagerduty",
            name: "PagerDuty",
            description: "Triggers a PagerDuty incident through the Events API v2. Set transform_vars.routing_key to the integration key.",
            url_pattern: "https://events.pagerduty.com/v2/enqueue",
            default_events: &["incident.created"],
            headers: &[("Content-Type", "application/json")],
            transform: json!({
                "routing_key": "{{ vars.routing_key }}",
                "event_action": "trigger",
                "dedup_key": "{{ id }}",
                "payload": {
                    "summary": "{{ data.title | default(type ~ ' ' ~ id) }}",
                    "source": "cloudthinker",
                    "severity": "error",
                    "custom_details": "{{ data }}"
                }
            }),
            required_vars: &["routing_key"],
        },
        Template {
            id: "github_actions",
            name: "GitHub Actions",
            description: "Triggers a workflow with repository_dispatch (POST /repos/OWNER/REPO/dispatches). The event_type is the event type with dots turned to dashes; client_payload is the event's data (GitHub accepts at most 10 top-level keys there).",
            url_pattern: "https://api.github.com/repos/OWNER/REPO/dispatches",
            default_events: &["recommendation.created"],
            headers: &[("Authorization", "Bearer <token with repo scope>"), ("Accept", "application/vnd.github+json")],
            transform: json!({
                "event_type": "{{ type | replace('.', '-') }}",
                "client_payload": "{{ data }}"
            }),
            required_vars: &[],
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENVELOPE: &[u8] = br#"{"id":"evt_1","type":"recommendation.created","timestamp":"2024-01-15T10:30:00Z","workspace_id":"ws_1","data":{"title":"Right-size i-0abc","potential_savings":150.00}}"#;

    fn render(id: &str, vars: &[(&str, &str)]) -> Value {
        let t = all().into_iter().find(|t| t.id == id).unwrap();
        let vars = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        crate::transform::check(&t.transform, "transform").unwrap();
        serde_json::from_slice(&crate::transform::render(&t.transform, ENVELOPE, &vars).unwrap()).unwrap()
    }

    #[test]
    fn slack_posts_text() {
        assert_eq!(render("slack", &[]), json!({"text": "New recommendation.created: Right-size i-0abc"}));
    }

    #[test]
    fn github_repository_dispatch() {
        let v = render("github_actions", &[]);
        assert_eq!(v["event_type"], "recommendation-created", "the type with dots turned to dashes");
        assert_eq!(v["client_payload"], json!({"title": "Right-size i-0abc", "potential_savings": 150.0}));
    }

    #[test]
    fn pagerduty_events_v2() {
        let v = render("pagerduty", &[("routing_key", "R0123456789")]);
        assert_eq!(v["routing_key"], "R0123456789");
        assert_eq!(v["event_action"], "trigger");
        assert_eq!(v["dedup_key"], "evt_1");
        assert_eq!(v["payload"]["summary"], "Right-size i-0abc");
        assert_eq!(v["payload"]["source"], "cloudthinker");
        assert_eq!(v["payload"]["severity"], "error");
        assert!(v["payload"]["custom_details"].is_object());
    }

    #[test]
    fn summaries_never_render_empty() {
        let t = all().into_iter().find(|t| t.id == "pagerduty").unwrap();
        let envelope = br#"{"id":"evt_2","type":"task.failed","timestamp":"2024-01-15T10:30:00Z","workspace_id":"ws_1","data":{}}"#;
        let out = crate::transform::render(&t.transform, envelope, &Default::default()).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["payload"]["summary"], "task.failed evt_2");
    }

    #[test]
    fn jira_issue() {
        let v = render("jira", &[("project_key", "OPS")]);
        assert_eq!(v["fields"]["project"]["key"], "OPS");
        assert_eq!(v["fields"]["summary"], "Right-size i-0abc");
        assert_eq!(v["fields"]["issuetype"]["name"], "Task");
    }
}
