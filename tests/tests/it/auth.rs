//! Authentication, scopes and workspace isolation, on every RPC.

use herald_control_plane::auth::Scope;
use herald_control_plane::store::Store;
use herald_shared::proto::{self, Webhook};
use herald_tests::{Backend, ControlPlane, event, new_key, webhook};
use prost_types::FieldMask;
use tonic::{Code, Status};

use crate::support::start;

both_databases!(
    every_rpc_needs_a_valid_key,
    publish_keys_cannot_configure,
    workspaces_are_isolated,
    data_survives_restart
);

/// Calls every unary RPC of the API with `key`, returning each outcome's code.
async fn call_everything(cp: &ControlPlane, key: Option<&str>) -> Vec<(&'static str, Code)> {
    fn code<T>(r: Result<tonic::Response<T>, Status>) -> Code {
        match r {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        }
    }
    let mut w = cp.webhooks_as(key);
    let mut e = cp.events_as(key);
    let mut d = cp.deliveries_as(key);
    let mut a = cp.agents_as(key);
    let hook = webhook("x", "https://example.com/hook", &["*"]);
    vec![
        ("CreateWebhook", code(w.create_webhook(proto::CreateWebhookRequest { webhook: Some(hook) }).await)),
        ("GetWebhook", code(w.get_webhook(proto::GetWebhookRequest { id: "wh_x".into() }).await)),
        ("ListWebhooks", code(w.list_webhooks(proto::ListWebhooksRequest::default()).await)),
        ("UpdateWebhook", code(w.update_webhook(proto::UpdateWebhookRequest::default()).await)),
        ("DeleteWebhook", code(w.delete_webhook(proto::DeleteWebhookRequest::default()).await)),
        ("RotateWebhookSecret", code(w.rotate_webhook_secret(proto::RotateWebhookSecretRequest::default()).await)),
        ("SendTestEvent", code(w.send_test_event(proto::SendTestEventRequest::default()).await)),
        ("ListEventTypes", code(w.list_event_types(proto::ListEventTypesRequest {}).await)),
        ("ListTemplates", code(w.list_templates(proto::ListTemplatesRequest {}).await)),
        (
            "PublishEvent",
            code(e.publish_event(proto::PublishEventRequest { event: Some(event("task.started", "{}")) }).await),
        ),
        (
            "PublishEvents",
            code(e.publish_events(proto::PublishEventsRequest { events: vec![event("task.started", "{}")] }).await),
        ),
        ("GetEvent", code(e.get_event(proto::GetEventRequest { id: "evt_x".into() }).await)),
        ("ListDeliveries", code(d.list_deliveries(proto::ListDeliveriesRequest::default()).await)),
        ("GetDelivery", code(d.get_delivery(proto::GetDeliveryRequest::default()).await)),
        ("RetryDelivery", code(d.retry_delivery(proto::RetryDeliveryRequest::default()).await)),
        ("ReplayWebhook", code(d.replay_webhook(proto::ReplayWebhookRequest::default()).await)),
        ("WatchDeliveries", code(d.watch_deliveries(proto::WatchDeliveriesRequest::default()).await)),
        ("ListAgents", code(a.list_agents(proto::ListAgentsRequest::default()).await)),
    ]
}

async fn every_rpc_needs_a_valid_key(backend: Backend) {
    let (cp, db) = start(backend).await;
    let before = db.snapshot().await;
    for key in [None, Some("hk_wrong-key"), Some("")] {
        for (rpc, code) in call_everything(&cp, key).await {
            assert_eq!(code, Code::Unauthenticated, "{rpc} with key {key:?}");
        }
    }
    assert_eq!(db.snapshot().await, before, "refused calls write nothing");
    // Agents use agent tokens, never API keys: a session without one, with a wrong one, or with
    // an API key is refused.
    for key in [None, Some("wrong-agent-token-0123456789"), Some(cp.api_key.as_str())] {
        let mut agents = cp.agents_as(key);
        let session = agents.session(tokio_stream::iter(Vec::<proto::AgentMessage>::new())).await;
        assert_eq!(session.unwrap_err().code(), Code::Unauthenticated, "session with {key:?}");
    }
    cp.stop().await;
}

async fn publish_keys_cannot_configure(backend: Backend) {
    let (cp, db) = start(backend).await;
    let publisher = new_key();
    let store = Store::new(db.connect().await, cp.config.secret_key.clone());
    store.put_api_key("ws_default", &publisher, Scope::Publish).await.unwrap();
    for (rpc, code) in call_everything(&cp, Some(&publisher)).await {
        match rpc {
            "PublishEvent" | "PublishEvents" => assert_eq!(code, Code::Ok, "{rpc}"),
            "GetEvent" => assert_eq!(code, Code::NotFound, "{rpc}"),
            _ => assert_eq!(code, Code::PermissionDenied, "{rpc} is beyond a publish key"),
        }
    }
    cp.stop().await;
}

async fn workspaces_are_isolated(backend: Backend) {
    let (cp, db) = start(backend).await;
    let other = new_key();
    let store = Store::new(db.connect().await, cp.config.secret_key.clone());
    store.put_api_key("ws_other", &other, Scope::Admin).await.unwrap();

    let mine = cp
        .webhooks()
        .create_webhook(proto::CreateWebhookRequest { webhook: Some(webhook("mine", "https://example.com/a", &["*"])) })
        .await
        .unwrap()
        .into_inner();
    let mut e = event("task.started", r#"{"who":"me"}"#);
    e.id = "shared-id".into();
    let my_event = cp.events().publish_event(proto::PublishEventRequest { event: Some(e.clone()) }).await.unwrap();
    assert_eq!(my_event.into_inner().deliveries.len(), 1);

    let before = db.snapshot().await;
    let mut theirs = cp.webhooks_as(Some(&other));
    let not_found = |r: Result<tonic::Response<proto::Webhook>, Status>| r.unwrap_err().code() == Code::NotFound;
    assert!(not_found(theirs.get_webhook(proto::GetWebhookRequest { id: mine.id.clone() }).await));
    let change = Webhook { id: mine.id.clone(), name: "stolen".into(), ..Default::default() };
    let mask = Some(FieldMask { paths: vec!["name".into()] });
    assert!(not_found(
        theirs.update_webhook(proto::UpdateWebhookRequest { webhook: Some(change), update_mask: mask }).await
    ));
    assert!(not_found(
        theirs
            .rotate_webhook_secret(proto::RotateWebhookSecretRequest { id: mine.id.clone(), secret: String::new() })
            .await
    ));
    let del = theirs.delete_webhook(proto::DeleteWebhookRequest { id: mine.id.clone() }).await.unwrap_err();
    assert_eq!(del.code(), Code::NotFound);
    let listed = theirs.list_webhooks(proto::ListWebhooksRequest::default()).await.unwrap().into_inner();
    assert!(listed.webhooks.is_empty(), "another workspace's webhooks are invisible");
    let get = cp.events_as(Some(&other)).get_event(proto::GetEventRequest { id: "shared-id".into() }).await;
    assert_eq!(get.unwrap_err().code(), Code::NotFound);
    assert_eq!(db.snapshot().await, before, "nothing of the other workspace changed");

    // The same event id is free in another workspace, and fans out only there.
    let mut their_event = e.clone();
    their_event.data_json = r#"{"who":"them"}"#.into();
    let stored = cp
        .events_as(Some(&other))
        .publish_event(proto::PublishEventRequest { event: Some(their_event) })
        .await
        .expect("ids are unique per workspace")
        .into_inner();
    assert_eq!(stored.workspace_id, "ws_other");
    assert!(stored.deliveries.is_empty(), "my webhook does not get their events");
    let mine_again =
        cp.events().get_event(proto::GetEventRequest { id: "shared-id".into() }).await.unwrap().into_inner();
    assert_eq!(mine_again.data_json, r#"{"who":"me"}"#);
    cp.stop().await;
}

async fn data_survives_restart(backend: Backend) {
    let (cp, db) = start(backend).await;
    let key = cp.api_key.clone();
    let config = cp.config.clone();
    let hook = cp
        .webhooks()
        .create_webhook(proto::CreateWebhookRequest { webhook: Some(webhook("kept", "https://example.com/a", &["*"])) })
        .await
        .unwrap()
        .into_inner();
    let e = cp
        .events()
        .publish_event(proto::PublishEventRequest { event: Some(event("task.started", r#"{"n":1}"#)) })
        .await
        .unwrap()
        .into_inner();
    let before = db.snapshot().await;
    cp.stop().await;

    let cp = ControlPlane::start(config).await;
    assert_eq!(cp.api_key, key);
    assert_eq!(db.snapshot().await, before, "a restart changes nothing");
    let got = cp.webhooks().get_webhook(proto::GetWebhookRequest { id: hook.id.clone() }).await.unwrap().into_inner();
    assert_eq!(got.name, "kept");
    let again = cp.events().get_event(proto::GetEventRequest { id: e.id.clone() }).await.unwrap().into_inner();
    assert_eq!(again.data_json, r#"{"n":1}"#);
    assert_eq!(again.deliveries.len(), 1);
    assert_eq!(again.status, proto::EventStatus::Pending as i32, "its delivery is still pending");
    cp.stop().await;
}
