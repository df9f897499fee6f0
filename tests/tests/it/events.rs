//! EventService: the envelope, idempotency, batches, fan-out, and survival across restarts.

use herald_control_plane::db::entity::delivery;
use herald_shared::proto::{self, Webhook};
use herald_tests::{Backend, ControlPlane, bad_field, event, webhook};
use prost_types::FieldMask;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use tonic::Code;

use crate::support::{start, start_with};

both_databases!(
    publish_and_get,
    idempotent_publish,
    batch_is_all_or_nothing,
    fan_out_matches_active_subscribers,
    pause_parks_and_resume_releases,
    delete_cancels_open_deliveries,
    star_never_matches_operational_events,
    concurrent_publishes_fail_alone,
    concurrent_repeats_of_a_new_id,
);

async fn create(cp: &ControlPlane, w: Webhook) -> Webhook {
    cp.webhooks().create_webhook(proto::CreateWebhookRequest { webhook: Some(w) }).await.expect("create").into_inner()
}

async fn publish(cp: &ControlPlane, e: proto::Event) -> Result<proto::Event, tonic::Status> {
    cp.events().publish_event(proto::PublishEventRequest { event: Some(e) }).await.map(|r| r.into_inner())
}

async fn deliveries_of(db: &herald_tests::TestDb, event_id: &str) -> Vec<delivery::Model> {
    let conn = db.connect().await;
    let rows = delivery::Entity::find().filter(delivery::Column::EventId.eq(event_id)).all(&conn).await.unwrap();
    conn.close().await.ok();
    rows
}

async fn publish_and_get(backend: Backend) {
    let (cp, _db) = start(backend).await;
    let hook = create(&cp, webhook("all", "https://example.com/hook", &["recommendation.*"])).await;
    let data = r#"{"id": "rec_def456", "potential_savings": 150.00, "title": "Right-size"}"#;
    let published = publish(&cp, event("recommendation.created", data)).await.expect("publish");
    assert!(published.id.starts_with("evt_"), "{}", published.id);
    assert_eq!(published.workspace_id, "ws_default");
    assert!(published.data_json.is_empty() && published.data.is_none(), "answers do not echo the payload");
    assert_eq!(published.status, proto::EventStatus::Pending as i32);
    assert_eq!(published.deliveries.len(), 1);
    assert_eq!(published.deliveries[0].webhook_id, hook.id);

    let got = cp.events().get_event(proto::GetEventRequest { id: published.id.clone() }).await.unwrap().into_inner();
    assert_eq!(got.data_json, data, "data is kept byte for byte");
    assert_eq!(got.r#type, "recommendation.created");
    let fields = &got.data.as_ref().expect("data is filled on reads").fields;
    assert!(matches!(fields["potential_savings"].kind, Some(prost_types::value::Kind::NumberValue(n)) if n == 150.0));
    assert_eq!(got.timestamp, published.timestamp);
    assert_eq!(got.deliveries[0].status, proto::DeliveryStatus::Pending as i32);

    // A supplied timestamp is kept (in UTC), and `data` as a Struct is accepted.
    let mut e = event("incident.created", "");
    e.id = "inc-42".into();
    e.timestamp = Some(prost_types::Timestamp { seconds: 1_705_314_600, nanos: 0 });
    e.data = Some(prost_types::Struct {
        fields: [(
            "title".to_owned(),
            prost_types::Value { kind: Some(prost_types::value::Kind::StringValue("DB down".into())) },
        )]
        .into(),
    });
    let with_time = publish(&cp, e.clone()).await.unwrap();
    assert_eq!(with_time.id, "inc-42");
    assert_eq!(with_time.timestamp.map(|t| t.seconds), Some(1_705_314_600));
    let again = publish(&cp, e).await.expect("the same supplied timestamp is the same event");
    assert_eq!(again.timestamp, with_time.timestamp);
    let stored = cp.events().get_event(proto::GetEventRequest { id: "inc-42".into() }).await.unwrap().into_inner();
    assert_eq!(stored.data_json, r#"{"title":"DB down"}"#);
    assert!(with_time.deliveries.is_empty(), "no webhook subscribes to incidents");
    assert_eq!(with_time.status, proto::EventStatus::Delivered as i32, "nothing to deliver");

    // A batch answers in request order.
    let batch: Vec<proto::Event> = (0..3)
        .map(|i| proto::Event {
            id: format!("batch-{i}"),
            ..event("recommendation.updated", &format!(r#"{{"n":{i}}}"#))
        })
        .collect();
    let answer = cp.events().publish_events(proto::PublishEventsRequest { events: batch }).await.unwrap().into_inner();
    let ids: Vec<&str> = answer.events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["batch-0", "batch-1", "batch-2"]);
    assert!(answer.events.iter().all(|e| e.deliveries.len() == 1));
    // A full batch of 1000, fanned out to two webhooks: 2000 delivery rows in multi-row inserts.
    create(&cp, webhook("tasks", "https://example.com/tasks", &["task.*"])).await;
    create(&cp, webhook("tasks-2", "https://example.com/tasks2", &["task.started"])).await;
    let full: Vec<proto::Event> = (0..1000).map(|i| event("task.started", &format!(r#"{{"i":{i}}}"#))).collect();
    let answer = cp.events().publish_events(proto::PublishEventsRequest { events: full }).await.unwrap().into_inner();
    assert_eq!(answer.events.len(), 1000);
    assert!(answer.events.iter().all(|e| e.deliveries.len() == 2));
    let last = cp.events().get_event(proto::GetEventRequest { id: answer.events[999].id.clone() }).await.unwrap();
    assert_eq!(last.into_inner().data_json, r#"{"i":999}"#);

    let missing = cp.events().get_event(proto::GetEventRequest { id: "evt_nothere".into() }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    cp.stop().await;
}

async fn idempotent_publish(backend: Backend) {
    let (cp, db) = start(backend).await;
    create(&cp, webhook("all", "https://example.com/hook", &["*"])).await;
    let mut first = event("recommendation.created", r#"{"title": "Right-size", "savings": 150.00}"#);
    first.id = "rec-1".into();
    let stored = publish(&cp, first.clone()).await.unwrap();
    assert_eq!(stored.deliveries.len(), 1);

    let again = publish(&cp, first.clone()).await.expect("same id and payload");
    assert_eq!(again.id, stored.id);
    assert_eq!(again.timestamp, stored.timestamp, "the stored event is returned");
    assert_eq!(again.deliveries.len(), 1);
    assert_eq!(again.deliveries[0].id, stored.deliveries[0].id, "no second delivery");

    // The same payload as a Struct, keys in another order, 150 instead of 150.00.
    let num = |n: f64| prost_types::Value { kind: Some(prost_types::value::Kind::NumberValue(n)) };
    let text = |s: &str| prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(s.into())) };
    let as_struct = proto::Event {
        id: "rec-1".into(),
        r#type: "recommendation.created".into(),
        data: Some(prost_types::Struct {
            fields: [("savings".to_owned(), num(150.0)), ("title".to_owned(), text("Right-size"))].into(),
        }),
        ..Default::default()
    };
    let same = publish(&cp, as_struct).await.expect("same payload as data");
    assert_eq!(same.timestamp, stored.timestamp, "the stored event is returned");
    let kept = cp.events().get_event(proto::GetEventRequest { id: "rec-1".into() }).await.unwrap().into_inner();
    assert_eq!(kept.data_json, first.data_json, "the original bytes are kept");

    let snapshot = db.snapshot().await;
    let conflicts = [
        proto::Event { data_json: r#"{"title": "Other", "savings": 150.00}"#.into(), ..first.clone() },
        proto::Event { r#type: "recommendation.updated".into(), ..first.clone() },
        proto::Event { timestamp: Some(prost_types::Timestamp { seconds: 1, nanos: 0 }), ..first.clone() },
    ];
    for c in conflicts {
        let err = publish(&cp, c).await.unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
        assert_eq!(bad_field(&err).as_deref(), Some("event.id"));
    }
    assert_eq!(db.snapshot().await, snapshot, "conflicts write nothing");
    assert_eq!(deliveries_of(&db, "rec-1").await.len(), 1);
    cp.stop().await;
}

async fn batch_is_all_or_nothing(backend: Backend) {
    let (cp, db) = start(backend).await;
    create(&cp, webhook("all", "https://example.com/hook", &["*"])).await;
    let mut existing = event("task.failed", r#"{"task":"backup"}"#);
    existing.id = "task-7".into();
    publish(&cp, existing.clone()).await.unwrap();
    let before = db.snapshot().await;

    let mut a = event("task.started", "{}");
    a.id = "new-a".into();
    let mut b = event("task.started", "{}");
    b.id = "new-b".into();
    let conflicting = proto::Event { data_json: r#"{"task":"restore"}"#.into(), ..existing.clone() };
    let mut events = cp.events();
    let err = events
        .publish_events(proto::PublishEventsRequest { events: vec![a.clone(), conflicting, b.clone()] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(bad_field(&err).as_deref(), Some("events[1].id"));
    assert_eq!(db.snapshot().await, before, "a failed batch stores nothing");
    for id in ["new-a", "new-b"] {
        let e = events.get_event(proto::GetEventRequest { id: id.into() }).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{id}");
    }

    let dup = events.publish_events(proto::PublishEventsRequest { events: vec![a.clone(), b, a] }).await.unwrap_err();
    assert_eq!(dup.code(), Code::InvalidArgument);
    assert_eq!(bad_field(&dup).as_deref(), Some("events[2].id"));
    assert_eq!(db.snapshot().await, before);

    // A batch that repeats a stored event unchanged is fine: it returns the stored one.
    let mut c = event("task.started", "{}");
    c.id = "new-c".into();
    let ok =
        events.publish_events(proto::PublishEventsRequest { events: vec![existing, c] }).await.unwrap().into_inner();
    assert_eq!(ok.events[0].id, "task-7");
    assert_eq!(ok.events[1].id, "new-c");
    assert_eq!(deliveries_of(&db, "task-7").await.len(), 1);
    cp.stop().await;
}

async fn fan_out_matches_active_subscribers(backend: Backend) {
    let (cp, db) = start(backend).await;
    let exact = create(&cp, webhook("exact", "https://a.example.com/hook", &["incident.created"])).await;
    let mut w = webhook("group", "https://b.example.com/hook", &["incident.*"]);
    w.zone = "eu-west".into();
    let group = create(&cp, w).await;
    let star = create(&cp, webhook("star", "https://c.example.com/hook", &["*"])).await;
    let mut paused = webhook("paused", "https://d.example.com/hook", &["incident.created"]);
    paused.active = Some(false);
    let paused = create(&cp, paused).await;
    let other = create(&cp, webhook("other", "https://e.example.com/hook", &["task.failed"])).await;

    let e = publish(&cp, event("incident.created", r#"{"title":"DB down"}"#)).await.unwrap();
    assert_eq!(e.deliveries.len(), 3);
    let rows = deliveries_of(&db, &e.id).await;
    assert_eq!(rows.len(), 3, "exactly one row per matching active webhook");
    let mut hooks: Vec<&str> = rows.iter().map(|d| d.webhook_id.as_str()).collect();
    hooks.sort();
    let mut expected = vec![exact.id.as_str(), group.id.as_str(), star.id.as_str()];
    expected.sort();
    assert_eq!(hooks, expected);
    assert!(!hooks.contains(&paused.id.as_str()) && !hooks.contains(&other.id.as_str()));
    let zone = rows.iter().find(|d| d.webhook_id == group.id).unwrap();
    assert_eq!(zone.zone, "eu-west", "rows carry their webhook's zone");
    assert!(rows.iter().all(|d| d.status == delivery::status::PENDING && d.attempt_count == 0));
    cp.stop().await;
}

async fn pause_parks_and_resume_releases(backend: Backend) {
    let (cp, db) = start(backend).await;
    let hook = create(&cp, webhook("p", "https://example.com/hook", &["incident.*"])).await;
    let before_pause = publish(&cp, event("incident.created", "{}")).await.unwrap();
    let set_active = |active: bool| {
        let change = Webhook { id: hook.id.clone(), active: Some(active), ..Default::default() };
        proto::UpdateWebhookRequest {
            webhook: Some(change),
            update_mask: Some(FieldMask { paths: vec!["active".into()] }),
        }
    };
    cp.webhooks().update_webhook(set_active(false)).await.unwrap();
    let parked = deliveries_of(&db, &before_pause.id).await;
    assert_eq!(parked[0].status, delivery::status::PARKED, "scheduled deliveries are parked while paused");
    let during = publish(&cp, event("incident.updated", "{}")).await.unwrap();
    assert!(during.deliveries.is_empty(), "events during a pause are not queued for the webhook");
    assert!(deliveries_of(&db, &during.id).await.is_empty());
    cp.webhooks().update_webhook(set_active(true)).await.unwrap();
    let resumed = deliveries_of(&db, &before_pause.id).await;
    assert_eq!(resumed[0].status, delivery::status::PENDING, "re-activation makes them claimable again");
    assert!(deliveries_of(&db, &during.id).await.is_empty(), "nothing is back-filled for the pause");
    cp.stop().await;
}

async fn delete_cancels_open_deliveries(backend: Backend) {
    let (cp, db) = start(backend).await;
    let hook = create(&cp, webhook("d", "https://example.com/hook", &["*"])).await;
    let keep = create(&cp, webhook("k", "https://example.com/other", &["*"])).await;
    let e = publish(&cp, event("task.completed", "{}")).await.unwrap();
    let answer = cp.webhooks().delete_webhook(proto::DeleteWebhookRequest { id: hook.id.clone() }).await.unwrap();
    assert_eq!(answer.into_inner().cancelled_deliveries, 1);
    let rows = deliveries_of(&db, &e.id).await;
    let of = |id: &str| rows.iter().find(|d| d.webhook_id == id).unwrap().status;
    assert_eq!(of(&hook.id), delivery::status::CANCELLED);
    assert_eq!(of(&keep.id), delivery::status::PENDING);
    let after = publish(&cp, event("task.completed", "{}")).await.unwrap();
    assert_eq!(after.deliveries.len(), 1, "a deleted webhook gets nothing new");
    cp.stop().await;
}

/// `*` never matches Herald's own `webhook.*` events; only explicit subscriptions get them. The
/// API refuses to publish such types, so this drives the store directly, as the pipeline will.
async fn star_never_matches_operational_events(backend: Backend) {
    let (cp, db) = start_with(backend, |_| {}).await;
    let star = create(&cp, webhook("star", "https://a.example.com/hook", &["*"])).await;
    let explicit = create(&cp, webhook("ops", "https://b.example.com/hook", &["webhook.delivery.failed"])).await;
    let group = create(&cp, webhook("ops-all", "https://c.example.com/hook", &["webhook.*"])).await;
    let store = herald_control_plane::store::Store::new(db.connect().await, cp.config.secret_key.clone());
    let e = herald_control_plane::store::events::NewEvent {
        id: "op-1".into(),
        event_type: "webhook.delivery.failed".into(),
        timestamp: "2026-01-01T00:00:00Z".into(),
        timestamp_supplied: false,
        data: "{}".into(),
        trace_context: None,
    };
    let stored = store.publish("ws_default", vec![e], false, 0, std::time::Duration::from_secs(5)).await.unwrap();
    let mut got: Vec<&str> = stored[0].deliveries.iter().map(|d| d.webhook_id.as_str()).collect();
    got.sort();
    let mut want = vec![explicit.id.as_str(), group.id.as_str()];
    want.sort();
    assert_eq!(got, want);
    assert!(!got.contains(&star.id.as_str()));
    cp.stop().await;
}

/// Concurrent publishes share commits (group commit), and one that fails inside a shared batch
/// fails alone: the others are stored, it writes nothing.
async fn concurrent_publishes_fail_alone(backend: Backend) {
    let (cp, db) = start(backend).await;
    create(&cp, webhook("all", "https://example.com/hook", &["*"])).await;
    let mut taken = event("task.failed", r#"{"v":1}"#);
    taken.id = "taken".into();
    publish(&cp, taken.clone()).await.unwrap();
    let mut calls = Vec::new();
    for i in 0..60 {
        let cp_events = cp.events();
        let e = if i % 10 == 0 {
            proto::Event { data_json: format!(r#"{{"v":{}}}"#, i + 2), ..taken.clone() }
        } else {
            proto::Event { id: format!("c-{i}"), ..event("task.started", &format!(r#"{{"i":{i}}}"#)) }
        };
        calls.push(tokio::spawn(async move {
            let mut client = cp_events;
            client.publish_event(proto::PublishEventRequest { event: Some(e) }).await
        }));
    }
    let mut ok = 0;
    for (i, call) in calls.into_iter().enumerate() {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => {
                assert_eq!(i % 10, 0, "only the conflicting publishes fail: {status:?}");
                assert_eq!(status.code(), Code::AlreadyExists);
            }
        }
    }
    assert_eq!(ok, 54);
    for i in (0..60).filter(|i| i % 10 != 0) {
        assert_eq!(deliveries_of(&db, &format!("c-{i}")).await.len(), 1, "c-{i} and its delivery are stored");
    }
    assert_eq!(deliveries_of(&db, "taken").await.len(), 1);
    let kept = cp.events().get_event(proto::GetEventRequest { id: "taken".into() }).await.unwrap().into_inner();
    assert_eq!(kept.data_json, r#"{"v":1}"#);
    cp.stop().await;
}

/// Calls publishing the same new id at once, merged into one write or not, behave as if one
/// after another: with the same content every call gets the one stored event and its one
/// delivery; with different contents exactly one call stores its event and the others conflict.
async fn concurrent_repeats_of_a_new_id(backend: Backend) {
    let (cp, db) = start(backend).await;
    create(&cp, webhook("all", "https://example.com/hook", &["*"])).await;
    let same = |id: &str, v: usize| proto::Event { id: id.into(), ..event("task.started", &format!(r#"{{"v":{v}}}"#)) };
    let mut calls = Vec::new();
    for i in 0..40 {
        let mut client = cp.events();
        // Even calls repeat "twin" with one content; odd calls race for "rival" with their own.
        let e = if i % 2 == 0 { same("twin", 0) } else { same("rival", i) };
        calls.push(tokio::spawn(async move {
            client.publish_event(proto::PublishEventRequest { event: Some(e) }).await.map(|r| r.into_inner())
        }));
    }
    let (mut twin_deliveries, mut rival_ok, mut rival_conflicts) = (Vec::new(), Vec::new(), 0);
    for (i, call) in calls.into_iter().enumerate() {
        match (i % 2, call.await.unwrap()) {
            (0, Ok(e)) => {
                assert_eq!(e.deliveries.len(), 1, "{e:?}");
                twin_deliveries.push(e.deliveries[0].id.clone());
            }
            (0, Err(status)) => panic!("a repeat with the same content failed: {status:?}"),
            (_, Ok(_)) => rival_ok.push(format!(r#"{{"v":{i}}}"#)),
            (_, Err(status)) => {
                assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
                rival_conflicts += 1;
            }
        }
    }
    twin_deliveries.dedup();
    assert_eq!(twin_deliveries.len(), 1, "every repeat answers with the same delivery");
    assert_eq!(deliveries_of(&db, "twin").await.len(), 1);
    assert_eq!(rival_ok.len(), 1, "exactly one content is stored: {rival_ok:?}");
    assert_eq!(rival_conflicts, 19);
    assert_eq!(deliveries_of(&db, "rival").await.len(), 1);
    let kept = cp.events().get_event(proto::GetEventRequest { id: "rival".into() }).await.unwrap().into_inner();
    assert_eq!(kept.data_json, rival_ok[0], "the stored content is the one acknowledged");
    cp.stop().await;
}

/// `--publish-timeout` bounds a publish waiting on a write that does not move, and
/// `--write-timeout` the writer's batch, not the work of a large one: a call whose 1,000 events go
/// to 250 webhooks each (250,000 deliveries in one transaction) takes several times both timeouts
/// here and is still answered with every delivery. The timeouts have to outlast the longest
/// single step: on PostgreSQL a statement of 10,000 rows (0.25–0.45 s each on a slow host, a
/// debug build) or the commit (0.16 s); on SQLite the commit, which also checkpoints the write's
/// WAL (about 1 s for this write on that host).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_write_that_keeps_moving_outlasts_the_publish_and_write_timeouts() {
    a_large_write_outlasts(Backend::Postgres, std::time::Duration::from_secs(2)).await;
}

/// The same on SQLite, where one writer takes every write (dispatch's too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_a_large_write_that_keeps_moving_outlasts_the_publish_and_write_timeouts() {
    a_large_write_outlasts(Backend::Sqlite, std::time::Duration::from_millis(1500)).await;
}

async fn a_large_write_outlasts(backend: Backend, timeout: std::time::Duration) {
    let (cp, db) = start_with(backend, |c| {
        c.publish_timeout = timeout;
        c.write_timeout = timeout;
    })
    .await;
    for i in 0..250 {
        create(&cp, webhook(&format!("hook-{i}"), "https://example.com/hook", &["incident.*"])).await;
    }
    let events: Vec<proto::Event> = (0..1000)
        .map(|i| proto::Event { id: format!("big-{i}"), ..event("incident.created", r#"{"severity":"high"}"#) })
        .collect();
    let started = std::time::Instant::now();
    let answer = cp.events().publish_events(proto::PublishEventsRequest { events }).await;
    let took = started.elapsed();
    let answer = answer.expect("a write that keeps moving is waited for").into_inner();
    println!("publish of 1,000 events x 250 webhooks: {took:?} with publish and write timeouts of {timeout:?}");
    assert!(took > timeout, "the write took {took:?}, too little to show that the bound moves with it");
    assert_eq!(answer.events.len(), 1000);
    assert!(answer.events.iter().all(|e| e.deliveries.len() == 250), "every event has its 250 deliveries");
    let conn = db.connect().await;
    let stored = delivery::Entity::find().filter(delivery::Column::EventId.starts_with("big-")).count(&conn).await;
    assert_eq!(stored.unwrap(), 250_000);
    conn.close().await.ok();
    cp.stop().await;
}

/// A publish whose write cannot move (the `events` table locked by another session) is answered
/// `UNAVAILABLE` once `--publish-timeout` passes without progress, long before the lock goes;
/// published again with the same id afterwards, the event is stored once with one delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_write_is_refused_after_the_publish_timeout() {
    use sea_orm::{ConnectionTrait as _, TransactionTrait as _};
    let timeout = std::time::Duration::from_millis(200);
    let (cp, db) = start_with(Backend::Postgres, |c| c.publish_timeout = timeout).await;
    create(&cp, webhook("stalled", "https://example.com/hook", &["incident.*"])).await;
    let conn = db.connect().await;
    let lock = conn.begin().await.unwrap();
    lock.execute_unprepared("LOCK TABLE events IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let e = proto::Event { id: "stalled-1".into(), ..event("incident.created", "{}") };
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(20), publish(&cp, e.clone())).await;
    let took = started.elapsed();
    lock.commit().await.unwrap();
    let refused = answer.expect("a stalled publish is answered while the lock is held").expect_err("and refused");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("publish it again with the same id"), "{refused:?}");
    assert!(took >= timeout, "refused after {took:?}, before the timeout");
    assert!(took < timeout + std::time::Duration::from_secs(3), "refused only after {took:?}");
    let again = publish(&cp, e).await.expect("published again once the table is free");
    assert_eq!(again.id, "stalled-1");
    assert_eq!(again.deliveries.len(), 1);
    assert_eq!(deliveries_of(&db, "stalled-1").await.len(), 1, "stored once");
    conn.close().await.ok();
    cp.stop().await;
}

/// A publish made again while its first attempt's write is stuck (another session holds an
/// uncommitted row with its id, so the insert waits for it) is set aside until that write ends:
/// it does not hold up other publishes, which are stored meanwhile. Once the row goes, the id is
/// stored once. (Before, the loop that took the second attempt waited for the first write while
/// holding the queue, and every publish was refused after `--publish-timeout`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_repeated_while_its_first_write_is_stuck_holds_up_no_other() {
    use herald_control_plane::db::entity::event as stored;
    use sea_orm::{ActiveValue::Set, ConnectionTrait as _, Statement, TransactionTrait as _};
    let (cp, db) = start_with(Backend::Postgres, |c| c.publish_timeout = std::time::Duration::from_secs(1)).await;
    create(&cp, webhook("stuck", "https://example.com/hook", &["incident.*"])).await;
    let conn = db.connect().await;
    let holder = conn.begin().await.unwrap();
    let row = stored::ActiveModel {
        workspace_id: Set("ws_default".into()),
        id: Set("stuck-1".into()),
        event_type: Set("incident.created".into()),
        timestamp: Set("2026-01-01T00:00:00Z".into()),
        timestamp_supplied: Set(false),
        data: Set("{}".into()),
        test: Set(false),
        created_at: Set(0),
        trace_context: Set(None),
    };
    stored::Entity::insert(row).exec(&holder).await.unwrap();
    let pid = holder.query_one_raw(Statement::from_string(conn.get_database_backend(), "SELECT pg_backend_pid()"));
    let pid: i32 = pid.await.unwrap().unwrap().try_get_by_index(0).unwrap();
    let stuck = proto::Event { id: "stuck-1".into(), ..event("incident.created", "{}") };
    let attempt = |e: proto::Event| {
        let mut events = cp.events();
        tokio::spawn(async move { events.publish_event(proto::PublishEventRequest { event: Some(e) }).await })
    };
    // The first attempt's write waits for the holder's row.
    let first = attempt(stuck.clone());
    let blocked = format!("SELECT count(*) FROM pg_stat_activity WHERE {pid} = ANY(pg_blocking_pids(pid))");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let n = conn.query_one_raw(Statement::from_string(conn.get_database_backend(), blocked.clone())).await;
        if n.unwrap().unwrap().try_get_by_index::<i64>(0).unwrap() > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the first attempt's insert never waited for the row");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // The second attempt goes to the other publish loop, which sets it aside.
    let second = attempt(stuck.clone());
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let other = proto::Event { id: "free-1".into(), ..event("incident.created", "{}") };
    let answer = tokio::time::timeout(std::time::Duration::from_secs(20), publish(&cp, other)).await;
    let stored_meanwhile = answer.expect("answered").expect("stored while the first write is stuck");
    assert_eq!(stored_meanwhile.deliveries.len(), 1);
    holder.rollback().await.unwrap();
    // The stuck attempts were answered one way or the other (refused after the publish timeout,
    // or stored once the row went); published again, the event is there once.
    for attempt in [first, second] {
        if let Err(refused) = attempt.await.unwrap() {
            assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
        }
    }
    let again = publish(&cp, stuck).await.expect("published again once the row is gone");
    assert_eq!(again.deliveries.len(), 1);
    assert_eq!(deliveries_of(&db, "stuck-1").await.len(), 1, "stored once");
    assert_eq!(deliveries_of(&db, "free-1").await.len(), 1);
    conn.close().await.ok();
    cp.stop().await;
}
