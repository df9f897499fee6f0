//! WebhookService: the happy paths, every validation rule, masking, pagination.

use herald_shared::proto::{self, Webhook};
use herald_tests::{Backend, bad_field, webhook};
use prost_types::FieldMask;
use tonic::Code;

use crate::support::start;

both_databases!(
    webhook_lifecycle,
    list_is_paginated,
    update_validation,
    secrets_and_headers_are_masked,
    catalog_and_templates,
    standard_webhooks_secrets,
);

pub(crate) fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask { paths: paths.iter().map(|p| (*p).to_owned()).collect() })
}

async fn webhook_lifecycle(backend: Backend) {
    let (cp, _db) = start(backend).await;
    let mut api = cp.webhooks();
    let mut w = webhook("orders", "https://example.com/hook", &["incident.created", "task.*"]);
    w.headers.insert("Authorization".into(), "Basic abc".into());
    w.timeout = Some(prost_types::Duration { seconds: 5, nanos: 0 });
    w.max_in_flight = Some(8);
    w.description = "ops team".into();
    let created =
        api.create_webhook(proto::CreateWebhookRequest { webhook: Some(w) }).await.expect("create").into_inner();
    assert!(created.id.starts_with("wh_"), "{}", created.id);
    assert!(created.secret.starts_with("whsec_"), "a secret is generated");
    assert_eq!(created.active, Some(true), "absent active means active");
    assert_eq!(created.zone, "default");
    assert_eq!(created.signature_scheme, proto::SignatureScheme::Cloudthinker as i32);
    assert_eq!(created.rate_limit_per_second, None, "absent limit stays absent");
    assert_eq!(created.max_in_flight, Some(8));
    assert_eq!(created.timeout.map(|t| t.seconds), Some(5));

    let got = api.get_webhook(proto::GetWebhookRequest { id: created.id.clone() }).await.unwrap().into_inner();
    assert_eq!(got.name, "orders");
    assert_eq!(got.events, vec!["incident.created", "task.*"]);
    assert_eq!(got.description, "ops team");

    let mut change = Webhook { id: created.id.clone(), ..Default::default() };
    change.name = "orders-v2".into();
    change.active = Some(false);
    change.max_in_flight = None;
    let updated = api
        .update_webhook(proto::UpdateWebhookRequest {
            webhook: Some(change),
            update_mask: mask(&["name", "active", "max_in_flight"]),
        })
        .await
        .expect("update")
        .into_inner();
    assert_eq!(updated.name, "orders-v2");
    assert_eq!(updated.active, Some(false));
    assert_eq!(updated.max_in_flight, None, "a masked absent limit is cleared");
    assert_eq!(updated.url, "https://example.com/hook", "fields outside the mask are kept");
    assert_eq!(updated.timeout.map(|t| t.seconds), Some(5));

    let rotated = api
        .rotate_webhook_secret(proto::RotateWebhookSecretRequest { id: created.id.clone(), secret: String::new() })
        .await
        .expect("rotate")
        .into_inner();
    assert!(rotated.secret.starts_with("whsec_"));
    assert_ne!(rotated.secret, created.secret);
    assert!(rotated.rotation_grace_ends_at.is_some(), "the old secret keeps signing during the grace period");
    let given = api
        .rotate_webhook_secret(proto::RotateWebhookSecretRequest {
            id: created.id.clone(),
            secret: "my-own-secret-of-20-chars".into(),
        })
        .await
        .expect("rotate to a given secret")
        .into_inner();
    assert_eq!(given.secret, "my-own-secret-of-20-chars");

    let listed = api.list_webhooks(proto::ListWebhooksRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.webhooks.len(), 1);
    assert!(listed.next_page_token.is_empty());

    let deleted =
        api.delete_webhook(proto::DeleteWebhookRequest { id: created.id.clone() }).await.unwrap().into_inner();
    assert_eq!(deleted.cancelled_deliveries, 0);
    let gone = api.get_webhook(proto::GetWebhookRequest { id: created.id.clone() }).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let again = api.delete_webhook(proto::DeleteWebhookRequest { id: created.id.clone() }).await.unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    assert!(api.list_webhooks(proto::ListWebhooksRequest::default()).await.unwrap().into_inner().webhooks.is_empty());
    cp.stop().await;
}

async fn list_is_paginated(backend: Backend) {
    let (cp, _db) = start(backend).await;
    let mut api = cp.webhooks();
    let mut ids = Vec::new();
    for i in 0..5 {
        let w = webhook(&format!("w{i}"), "https://example.com/hook", &["*"]);
        ids.push(api.create_webhook(proto::CreateWebhookRequest { webhook: Some(w) }).await.unwrap().into_inner().id);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = api
            .list_webhooks(proto::ListWebhooksRequest { page_size: 2, page_token: token.clone() })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.webhooks.len() <= 2);
        assert!(page.webhooks.iter().all(|w| w.secret.is_empty()), "lists never show secrets");
        seen.extend(page.webhooks.into_iter().map(|w| w.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids, "every webhook once, oldest first");
    for (size, token, field) in [(-1, "", "page_size"), (1001, "", "page_size"), (0, "not-a-token", "page_token")] {
        let err = api
            .list_webhooks(proto::ListWebhooksRequest { page_size: size, page_token: token.into() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(bad_field(&err).as_deref(), Some(field));
    }
    cp.stop().await;
}

/// A case of the validation table: how to spoil a valid webhook, and the field that must be named.
pub(crate) type Spoil = fn(&mut Webhook);

pub(crate) fn create_cases() -> Vec<(&'static str, Spoil, &'static str)> {
    vec![
        ("empty name", |w| w.name.clear(), "webhook.name"),
        ("long name", |w| w.name = "n".repeat(129), "webhook.name"),
        ("control char in name", |w| w.name = "a\u{7}b".into(), "webhook.name"),
        ("empty url", |w| w.url.clear(), "webhook.url"),
        ("relative url", |w| w.url = "/hook".into(), "webhook.url"),
        ("plain http", |w| w.url = "http://example.com/hook".into(), "webhook.url"),
        ("other scheme", |w| w.url = "ftp://example.com/hook".into(), "webhook.url"),
        ("no host", |w| w.url = "https:///hook".into(), "webhook.url"),
        ("user-info", |w| w.url = "https://user:pass@example.com/hook".into(), "webhook.url"),
        ("long url", |w| w.url = format!("https://example.com/{}", "a".repeat(2040)), "webhook.url"),
        ("non-ASCII host", |w| w.url = "https://exämple.com/hook".into(), "webhook.url"),
        ("no events", |w| w.events.clear(), "webhook.events"),
        (
            "unknown event",
            |w| w.events = vec!["incident.created".into(), "incident.exploded".into()],
            "webhook.events[1]",
        ),
        ("bad wildcard", |w| w.events = vec!["incid*".into()], "webhook.events[0]"),
        ("bad header name", |w| _ = w.headers.insert("Bad Name".into(), "x".into()), "webhook.headers[\"Bad Name\"]"),
        (
            "CR/LF in header value",
            |w| _ = w.headers.insert("X-Team".into(), "a\r\nX-Injected: 1".into()),
            "webhook.headers[\"X-Team\"]",
        ),
        (
            "reserved signature header",
            |w| _ = w.headers.insert("X-CloudThinker-Signature".into(), "x".into()),
            "webhook.headers[\"X-CloudThinker-Signature\"]",
        ),
        (
            "reserved webhook- header",
            |w| _ = w.headers.insert("webhook-id".into(), "x".into()),
            "webhook.headers[\"webhook-id\"]",
        ),
        ("reserved Host", |w| _ = w.headers.insert("Host".into(), "evil".into()), "webhook.headers[\"Host\"]"),
        (
            "reserved traceparent",
            |w| _ = w.headers.insert("traceparent".into(), "x".into()),
            "webhook.headers[\"traceparent\"]",
        ),
        ("zone with space", |w| w.zone = "eu west".into(), "webhook.zone"),
        ("zone too long", |w| w.zone = "z".repeat(64), "webhook.zone"),
        ("short secret", |w| w.secret = "short".into(), "webhook.secret"),
        ("unknown scheme", |w| w.signature_scheme = 9, "webhook.signature_scheme"),
        (
            "standard scheme with a plain secret",
            |w| {
                w.signature_scheme = proto::SignatureScheme::StandardWebhooks as i32;
                w.secret = "a-plain-secret-of-enough-length".into();
            },
            "webhook.secret",
        ),
        ("zero timeout", |w| w.timeout = Some(prost_types::Duration { seconds: 0, nanos: 0 }), "webhook.timeout"),
        ("timeout over 60s", |w| w.timeout = Some(prost_types::Duration { seconds: 61, nanos: 0 }), "webhook.timeout"),
        ("zero rate limit", |w| w.rate_limit_per_second = Some(0), "webhook.rate_limit_per_second"),
        ("zero max in flight", |w| w.max_in_flight = Some(0), "webhook.max_in_flight"),
        ("long description", |w| w.description = "d".repeat(1025), "webhook.description"),
        (
            "bad transform var name",
            |w| _ = w.transform_vars.insert("not ok".into(), "x".into()),
            "webhook.transform_vars[\"not ok\"]",
        ),
    ]
}

async fn update_validation(backend: Backend) {
    let (cp, db) = start(backend).await;
    let mut api = cp.webhooks();
    let mut w = webhook("stored", "https://example.com/hook", &["incident.created"]);
    w.headers.insert("Authorization".into(), "Basic abc".into());
    let stored = api.create_webhook(proto::CreateWebhookRequest { webhook: Some(w) }).await.unwrap().into_inner();
    let before = db.snapshot().await;
    // Every create rule also holds on update, through the mask.
    for (what, spoil, field) in create_cases() {
        if field == "webhook.secret" {
            continue; // the secret is not updatable at all; see below
        }
        let mut valid = webhook("valid", "https://example.com/hook", &["incident.created"]);
        spoil(&mut valid);
        let change = Webhook { id: stored.id.clone(), ..valid };
        let path = field.trim_start_matches("webhook.").split(['[', '.']).next().unwrap().to_owned();
        let err = api
            .update_webhook(proto::UpdateWebhookRequest { webhook: Some(change), update_mask: mask(&[&path]) })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert_eq!(bad_field(&err).as_deref(), Some(field), "{what}: {}", err.message());
    }
    let cases: Vec<(&str, Option<FieldMask>, String, &str)> = vec![
        ("secret path", mask(&["secret"]), stored.id.clone(), "update_mask.paths[0]"),
        ("unknown path", mask(&["name", "colour"]), stored.id.clone(), "update_mask.paths[1]"),
        ("empty mask", mask(&[]), stored.id.clone(), "update_mask"),
        ("absent mask", None, stored.id.clone(), "update_mask"),
        ("missing id", mask(&["name"]), String::new(), "webhook.id"),
        ("forged id", mask(&["name"]), "wh_../../etc".into(), "webhook.id"),
    ];
    for (what, update_mask, id, field) in cases {
        let change = Webhook { id, name: "x".into(), ..Default::default() };
        let err =
            api.update_webhook(proto::UpdateWebhookRequest { webhook: Some(change), update_mask }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}");
        assert_eq!(bad_field(&err).as_deref(), Some(field), "{what}: {}", err.message());
    }
    let unknown = Webhook { id: "wh_01aaaaaaaaaaaaaaaaaaaaaaaa".into(), name: "x".into(), ..Default::default() };
    let err =
        api.update_webhook(proto::UpdateWebhookRequest { webhook: Some(unknown), update_mask: mask(&["name"]) }).await;
    assert_eq!(err.unwrap_err().code(), Code::NotFound);
    assert_eq!(db.snapshot().await, before, "rejected updates change nothing");
    let after = api.get_webhook(proto::GetWebhookRequest { id: stored.id.clone() }).await.unwrap().into_inner();
    assert_eq!(after.name, "stored");
    cp.stop().await;
}

async fn secrets_and_headers_are_masked(backend: Backend) {
    let (cp, db) = start(backend).await;
    let mut api = cp.webhooks();
    let mut w = webhook("masked", "https://example.com/hook", &["incident.created"]);
    w.secret = "a-very-private-signing-secret".into();
    w.headers.insert("Authorization".into(), "Basic c2VjcmV0LWNyZWRz".into());
    w.transform_vars.insert("routing_key".into(), "R0UTINGKEY0123456789".into());
    let created = api.create_webhook(proto::CreateWebhookRequest { webhook: Some(w) }).await.unwrap().into_inner();
    assert_eq!(created.secret, "a-very-private-signing-secret", "create shows the secret once");
    assert_eq!(created.headers["Authorization"], "***");
    assert_eq!(created.transform_vars["routing_key"], "***");
    let got = api.get_webhook(proto::GetWebhookRequest { id: created.id.clone() }).await.unwrap().into_inner();
    assert!(got.secret.is_empty(), "reads never show the secret");
    assert_eq!(got.headers["Authorization"], "***");
    assert_eq!(got.transform_vars["routing_key"], "***");

    // `***` sent back keeps the stored value; a new value replaces it.
    let mut change = Webhook { id: created.id.clone(), ..Default::default() };
    change.headers.insert("Authorization".into(), "***".into());
    change.headers.insert("X-Team".into(), "payments".into());
    api.update_webhook(proto::UpdateWebhookRequest { webhook: Some(change), update_mask: mask(&["headers"]) })
        .await
        .unwrap();
    let raw = db.snapshot().await;
    for secret in ["a-very-private-signing-secret", "c2VjcmV0LWNyZWRz", "R0UTINGKEY0123456789", "payments"] {
        assert!(!raw.contains(secret), "{secret} is stored in clear");
    }
    // The stored value survived the masked round trip: the store opens it again.
    let store = herald_control_plane::store::Store::new(db.connect().await, cp.config.secret_key.clone());
    let opened = store.get_webhook("ws_default", &created.id).await.unwrap();
    assert_eq!(opened.spec.headers["Authorization"], "Basic c2VjcmV0LWNyZWRz");
    assert_eq!(opened.spec.headers["X-Team"], "payments");
    assert_eq!(opened.secret, "a-very-private-signing-secret");
    cp.stop().await;
}

async fn catalog_and_templates(backend: Backend) {
    let (cp, _db) = start(backend).await;
    let mut api = cp.webhooks();
    let types = api.list_event_types(proto::ListEventTypesRequest {}).await.unwrap().into_inner().event_types;
    assert_eq!(types.len(), 22);
    assert_eq!(types.iter().filter(|t| !t.operational).count(), 20);
    let created = types.iter().find(|t| t.name == "incident.created").unwrap();
    assert_eq!(created.description, "New incident created");
    assert!(types.iter().any(|t| t.name == "webhook.delivery.failed" && t.operational));
    assert!(types.iter().any(|t| t.name == "webhook.test" && t.operational));

    let templates = api.list_templates(proto::ListTemplatesRequest {}).await.unwrap().into_inner().templates;
    let ids: Vec<&str> = templates.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["slack", "jira", "pagerduty", "github_actions"]);
    for t in &templates {
        assert!(t.url_pattern.starts_with("https://"), "{}", t.id);
        assert!(!t.default_events.is_empty(), "{}", t.id);
        assert!(t.transform.is_some(), "{}", t.id);
    }
    let pd = templates.iter().find(|t| t.id == "pagerduty").unwrap();
    assert_eq!(pd.required_vars, ["routing_key"]);
    cp.stop().await;
}

async fn standard_webhooks_secrets(backend: Backend) {
    let (cp, _db) = start(backend).await;
    let mut api = cp.webhooks();
    let mut w = webhook("std", "https://example.com/hook", &["*"]);
    w.signature_scheme = proto::SignatureScheme::StandardWebhooks as i32;
    let created = api.create_webhook(proto::CreateWebhookRequest { webhook: Some(w) }).await.unwrap().into_inner();
    assert!(herald_shared::signature::standard_key(&created.secret).is_ok(), "generated secrets suit the scheme");
    let rotate = api
        .rotate_webhook_secret(proto::RotateWebhookSecretRequest {
            id: created.id.clone(),
            secret: "plain-secret-not-base64!!".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_field(&rotate).as_deref(), Some("secret"));

    let mut plain = webhook("plain", "https://example.com/hook", &["*"]);
    plain.secret = "a-plain-secret-of-enough-length".into();
    let plain = api.create_webhook(proto::CreateWebhookRequest { webhook: Some(plain) }).await.unwrap().into_inner();
    let change = Webhook {
        id: plain.id.clone(),
        signature_scheme: proto::SignatureScheme::StandardWebhooks as i32,
        ..Default::default()
    };
    let err = api
        .update_webhook(proto::UpdateWebhookRequest { webhook: Some(change), update_mask: mask(&["signature_scheme"]) })
        .await
        .unwrap_err();
    assert_eq!(bad_field(&err).as_deref(), Some("webhook.signature_scheme"));
    cp.stop().await;
}
