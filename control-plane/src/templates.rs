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
                    "summary": "{{ data.title }}",
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
                    "summary": "{{ data.title }}",
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
            description: "Triggers a workflow with repository_dispatch (POST /repos/OWNER/REPO/dispatches). The event_type is the event type with dots turned to dashes; client_payload is the event's data.",
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
