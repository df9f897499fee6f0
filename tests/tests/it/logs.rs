//! Pause, test events and the delivery log (list, get, retry, replay, watch), end to end with
//! the real binaries.

use std::time::Duration;

use herald_control_plane::db::entity::delivery;
use herald_shared::proto::{self, DeliveryStatus, ErrorKind};
use herald_tests::receiver::{Receiver, Reply};
use herald_tests::{TestDb, webhook};
use prost_types::FieldMask;
use sea_orm::EntityTrait;

use crate::pipeline::{WAIT, attempts_of, create, expected_signature, publish, settled, single_zone};

async fn row(db: &TestDb, id: &str) -> delivery::Model {
    let conn = db.connect().await;
    let d = delivery::Entity::find_by_id(id.to_owned()).one(&conn).await.unwrap().unwrap();
    conn.close().await.ok();
    d
}

async fn until(db: &TestDb, id: &str, what: &str, ok: impl Fn(&delivery::Model) -> bool) -> delivery::Model {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let d = row(db, id).await;
        if ok(&d) {
            return d;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {d:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn set_active(id: &str, active: bool) -> proto::UpdateWebhookRequest {
    proto::UpdateWebhookRequest {
        webhook: Some(proto::Webhook { id: id.into(), active: Some(active), ..Default::default() }),
        update_mask: Some(FieldMask { paths: vec!["active".into()] }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_webhooks_queue_nothing_and_their_retries_wait() {
    let (ca, db, cp, _agent) = single_zone(&["--retry-schedule", "0s,300ms"]).await;
    let r = Receiver::https(&ca).await;
    r.script([Reply::status(500)]);
    let hook = create(&cp, webhook("p", &r.url("/"), &["incident.*"])).await;
    let e = publish(&cp, "incident.created", "{}").await;
    let id = e.deliveries[0].id.clone();
    until(&db, &id, "first attempt recorded", |d| d.attempt_count == 1).await;
    cp.webhooks().update_webhook(set_active(&hook.id, false)).await.unwrap();
    let parked = until(&db, &id, "retry parked", |d| d.status == delivery::status::PARKED).await;
    assert_eq!(parked.attempt_count, 1);
    let during = publish(&cp, "incident.updated", "{}").await;
    assert!(during.deliveries.is_empty(), "events during the pause are not queued");
    let listed = cp.deliveries().get_delivery(proto::GetDeliveryRequest { id: id.clone() }).await.unwrap().into_inner();
    assert!(listed.paused && listed.status == DeliveryStatus::Pending as i32, "shown as pending, paused");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(r.requests().len(), 1, "the due retry waits while paused");
    cp.webhooks().update_webhook(set_active(&hook.id, true)).await.unwrap();
    r.wait_for(2, WAIT).await;
    let d = settled(&db, &e.id).await.remove(0);
    assert_eq!((d.status, d.attempt_count), (delivery::status::SUCCEEDED, 2));
    assert_eq!(r.requests().len(), 2, "nothing was queued for the event published during the pause");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_events_and_the_delivery_log() {
    let (ca, db, cp, _agent) = single_zone(&["--retry-schedule", "0s,50ms"]).await;
    let good = Receiver::https(&ca).await;
    let bad = Receiver::https(&ca).await;
    bad.always(Reply::Status(500, vec![("x-reason", "db down".into())]));
    let mut w = webhook("good", &good.url("/hook"), &["incident.*"]);
    w.headers.insert("Authorization".into(), "Bearer very-secret".into());
    let g = create(&cp, w).await;
    let b = create(&cp, webhook("bad", &bad.url("/hook"), &["task.*"])).await;

    // A test event goes through the real pipeline to that one webhook.
    let sent = cp
        .webhooks()
        .send_test_event(proto::SendTestEventRequest { webhook_id: g.id.clone(), event_type: String::new() })
        .await
        .unwrap()
        .into_inner();
    let got = good.wait_for(1, WAIT).await;
    let body: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!((body["type"].as_str(), body["data"]["test"].as_bool()), (Some("webhook.test"), Some(true)));
    assert_eq!(got[0].header("x-cloudthinker-signature"), expected_signature(&g.secret, &got[0].body));
    let test_delivery = settled(&db, &sent.event_id).await.remove(0);
    assert!(test_delivery.test);
    assert_eq!(test_delivery.id, sent.delivery_id);

    let inc = publish(&cp, "incident.created", r#"{"title":"x"}"#).await;
    let task = publish(&cp, "task.failed", "{}").await;
    settled(&db, &inc.id).await;
    let failed = settled(&db, &task.id).await.remove(0);
    assert_eq!(failed.status, delivery::status::FAILED);

    // GetDelivery: every attempt with its request and response.
    let mut log = cp.deliveries();
    let detail = log.get_delivery(proto::GetDeliveryRequest { id: failed.id.clone() }).await.unwrap().into_inner();
    assert_eq!(detail.attempts.len(), 2);
    let a = &detail.attempts[0];
    assert_eq!((a.number, a.response_status, a.error_kind), (1, 500, ErrorKind::HttpStatus as i32));
    assert_eq!((a.agent_id.as_str(), a.zone.as_str()), ("agent-1", "default"));
    assert_eq!(a.response_body, "received");
    assert_eq!(a.response_headers.get("x-reason").map(String::as_str), Some("db down"));
    assert!(a.started_at.is_some() && a.duration.is_some());
    assert_eq!(a.request_headers.get("x-cloudthinker-event").map(String::as_str), Some("task.failed"));
    let good_delivery = inc.deliveries[0].id.clone();
    let ok = log.get_delivery(proto::GetDeliveryRequest { id: good_delivery.clone() }).await.unwrap().into_inner();
    assert_eq!(ok.attempts[0].request_headers.get("authorization").map(String::as_str), Some("***"));

    // ListDeliveries: every filter, and pages.
    let list = |req: proto::ListDeliveriesRequest| {
        let mut log = cp.deliveries();
        async move { log.list_deliveries(req).await.unwrap().into_inner().deliveries }
    };
    let ids = |ds: Vec<proto::Delivery>| ds.into_iter().map(|d| d.id).collect::<Vec<_>>();
    assert_eq!(ids(list(proto::ListDeliveriesRequest::default()).await).len(), 3);
    assert_eq!(
        ids(list(proto::ListDeliveriesRequest { webhook_id: b.id.clone(), ..Default::default() }).await),
        [failed.id.as_str()]
    );
    let by_status = proto::ListDeliveriesRequest { status: DeliveryStatus::Failed as i32, ..Default::default() };
    assert_eq!(ids(list(by_status).await), [failed.id.as_str()]);
    let by_type = proto::ListDeliveriesRequest { event_type: "incident.created".into(), ..Default::default() };
    assert_eq!(ids(list(by_type).await), [good_delivery.as_str()]);
    let created = row(&db, &good_delivery).await.created_at;
    let ts = |ms: i64| Some(prost_types::Timestamp { seconds: ms / 1000, nanos: ((ms % 1000) * 1_000_000) as i32 });
    let window = proto::ListDeliveriesRequest {
        created_after: ts(created),
        created_before: ts(created + 1),
        ..Default::default()
    };
    assert!(ids(list(window).await).contains(&good_delivery));
    let later = proto::ListDeliveriesRequest { created_after: ts(created + 60_000), ..Default::default() };
    assert!(list(later).await.is_empty());
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = log
            .list_deliveries(proto::ListDeliveriesRequest {
                page_size: 1,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages.extend(ids(page.deliveries));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages.len(), 3, "newest first, one per page: {pages:?}");
    assert!(pages.windows(2).all(|w| w[0] > w[1]));

    // RetryDelivery: one manual attempt; when it fails, the delivery is failed again and nothing
    // more is scheduled.
    let retried = log.retry_delivery(proto::RetryDeliveryRequest { id: failed.id.clone() }).await.unwrap().into_inner();
    assert_eq!(retried.status, DeliveryStatus::Pending as i32);
    bad.wait_for(3, WAIT).await;
    let back = until(&db, &failed.id, "manual attempt recorded", |d| d.attempt_count == 3).await;
    assert_eq!(back.status, delivery::status::FAILED);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(bad.requests().len(), 3, "a failed manual attempt schedules nothing");
    let attempts = attempts_of(&db, &failed.id).await;
    assert!(attempts[2].manual && !attempts[1].manual);

    // ReplayWebhook re-opens the failed deliveries with a fresh schedule, durably.
    bad.always(Reply::ok());
    let replay = log
        .replay_webhook(proto::ReplayWebhookRequest {
            webhook_id: b.id.clone(),
            created_after: Some(prost_types::Timestamp { seconds: 0, nanos: 0 }),
            created_before: None,
            include_all: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replay.queued, 1);
    let done = until(&db, &failed.id, "replayed delivery succeeds", |d| d.status == delivery::status::SUCCEEDED).await;
    assert_eq!(done.attempt_count, 1, "a replay starts a fresh schedule");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_deliveries_follows_them_to_the_end() {
    let (ca, _db, cp, _agent) = single_zone(&[]).await;
    let r = Receiver::https(&ca).await;
    let hook = create(&cp, webhook("w", &r.url("/"), &["*"])).await;
    let other = create(&cp, webhook("other", &r.url("/other"), &["task.*"])).await;
    // Filtered by the time range too, as `ListDeliveries` is: one watcher of deliveries created
    // in the last hour, one of deliveries created before it.
    let hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    let hour_ago = Some(prost_types::Timestamp { seconds: hour_ago.timestamp(), nanos: 0 });
    let watch = |created_after, created_before| proto::WatchDeliveriesRequest {
        webhook_id: hook.id.clone(),
        created_after,
        created_before,
        ..Default::default()
    };
    let mut stream = cp.deliveries().watch_deliveries(watch(hour_ago, None)).await.unwrap().into_inner();
    let mut older = cp.deliveries().watch_deliveries(watch(None, hour_ago)).await.unwrap().into_inner();
    let e = publish(&cp, "task.started", "{}").await;
    let mine = e.deliveries.iter().find(|d| d.webhook_id == hook.id).unwrap().id.clone();
    let mut seen = Vec::new();
    let outcome = tokio::time::timeout(WAIT, async {
        while let Some(change) = stream.message().await.unwrap() {
            let d = change.delivery.unwrap();
            assert_eq!(d.webhook_id, hook.id, "only the filtered webhook: not {}", other.id);
            seen.push(d.status);
            if d.id == mine && d.status == DeliveryStatus::Succeeded as i32 {
                return;
            }
        }
    })
    .await;
    assert!(outcome.is_ok(), "the watcher saw the delivery succeed; saw {seen:?}");
    // Every change was broadcast to both watchers before the last one reached the first.
    let none = tokio::time::timeout(Duration::from_millis(500), older.message()).await;
    assert!(none.is_err(), "a delivery created now is not one created over an hour ago: {none:?}");
}

/// Agents told `headers_json` report headers as JSON objects, which are logged as they came;
/// an older agent's maps are logged as the same sorted object; a JSON text that is not an object
/// of strings is not logged as if it were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempt_headers_are_logged_from_json_and_from_older_agents_maps() {
    use herald_shared::proto::{agent_message, control_message};
    const TOKEN: &str = "agent-token-for-the-header-forms-0";
    let (cp, db) = crate::support::start_for_agent_token(TOKEN).await;
    // The endpoint is never called: this agent answers by itself.
    let w = webhook("forms", "https://receiver.invalid/hook", &["incident.*"]);
    cp.webhooks().create_webhook(proto::CreateWebhookRequest { webhook: Some(w) }).await.unwrap();
    let mut events = Vec::new();
    for _ in 0..3 {
        let e = herald_tests::event("incident.created", "{}");
        events
            .push(cp.events().publish_event(proto::PublishEventRequest { event: Some(e) }).await.unwrap().into_inner());
    }

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let send = |m: agent_message::Msg| tx.send(proto::AgentMessage { msg: Some(m) }).unwrap();
    send(agent_message::Msg::Hello(proto::Hello {
        agent_id: "by-hand".into(),
        zone: "default".into(),
        version: "test".into(),
        capacity: 3,
        ..Default::default()
    }));
    send(agent_message::Msg::Credit(proto::Credit { jobs: 3 }));
    let outbound = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut inbound = cp.agents_as(Some(TOKEN)).session(outbound).await.unwrap().into_inner();
    let mut jobs = Vec::new();
    while jobs.len() < 3 {
        match tokio::time::timeout(WAIT, inbound.message()).await.expect("jobs arrive").unwrap().unwrap().msg {
            Some(control_message::Msg::Welcome(w)) => assert!(w.headers_json, "this control plane reads JSON headers"),
            Some(control_message::Msg::Job(j)) => jobs.push(j),
            _ => {}
        }
    }
    jobs.sort_by(|a, b| a.delivery_id.cmp(&b.delivery_id));
    let answered = |j: &proto::Job| proto::AttemptResult {
        lease_id: j.lease_id.clone(),
        delivery_id: j.delivery_id.clone(),
        attempt: j.attempt,
        started_at: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 0 }),
        duration: Some(prost_types::Duration { seconds: 0, nanos: 5_000_000 }),
        status: 200,
        ..Default::default()
    };
    let map = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    let results = [
        // A current agent: JSON objects.
        proto::AttemptResult {
            request_headers_json: r#"{"authorization":"***","content-type":"application/json"}"#.into(),
            response_headers_json: r#"{"server":"json \"quoted\""}"#.into(),
            ..answered(&jobs[0])
        },
        // An older agent: maps.
        proto::AttemptResult {
            request_headers: map(&[("x-cloudthinker-event", "incident.created"), ("content-type", "application/json")]),
            response_headers: map(&[("server", "maps")]),
            ..answered(&jobs[1])
        },
        // Broken JSON: the map beside it is logged instead, or nothing.
        proto::AttemptResult {
            request_headers_json: r#"{"content-type":1}"#.into(),
            request_headers: map(&[("content-type", "application/json")]),
            response_headers_json: "not json".into(),
            ..answered(&jobs[2])
        },
    ];
    for r in results {
        send(agent_message::Msg::Result(r));
    }
    for e in &events {
        assert_eq!(settled(&db, &e.id).await[0].status, delivery::status::SUCCEEDED);
    }

    let logged = |i: usize| {
        let mut log = cp.deliveries_as(Some(&cp.api_key));
        let id = jobs[i].delivery_id.clone();
        async move {
            let d = log.get_delivery(proto::GetDeliveryRequest { id }).await.unwrap().into_inner();
            assert_eq!(d.attempts.len(), 1);
            d.attempts.into_iter().next().unwrap()
        }
    };
    let (json, maps, broken) = (logged(0).await, logged(1).await, logged(2).await);
    assert_eq!(json.request_headers, map(&[("authorization", "***"), ("content-type", "application/json")]));
    assert_eq!(json.response_headers, map(&[("server", "json \"quoted\"")]));
    assert_eq!(
        maps.request_headers,
        map(&[("content-type", "application/json"), ("x-cloudthinker-event", "incident.created")])
    );
    assert_eq!(maps.response_headers, map(&[("server", "maps")]));
    assert_eq!(broken.request_headers, map(&[("content-type", "application/json")]));
    assert!(broken.response_headers.is_empty(), "{:?}", broken.response_headers);
    // As stored: the older agent's map became the same sorted object a current agent sends.
    let stored = attempts_of(&db, &jobs[1].delivery_id).await.remove(0);
    assert_eq!(
        stored.request_headers,
        r#"{"content-type":"application/json","x-cloudthinker-event":"incident.created"}"#
    );
    assert_eq!(attempts_of(&db, &jobs[2].delivery_id).await[0].response_headers, "{}");
    cp.stop().await;
}

/// A delivery whose zone has no agent connected waits, and says so (`waiting_for_agent`, and
/// `pending (no agent in zone …)` in the CLI's tables): on GetDelivery, ListDeliveries and
/// WatchDeliveries, until an agent of its zone connects; another zone's agent changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_with_no_agent_in_its_zone_says_so() {
    const TOKEN: &str = "agent-token-for-the-waiting-zone-0";
    let (cp, _db) = crate::support::start_for_agent_token(TOKEN).await;
    let create = |w: proto::Webhook| {
        let mut client = cp.webhooks();
        async move { client.create_webhook(proto::CreateWebhookRequest { webhook: Some(w) }).await.unwrap().into_inner() }
    };
    let deliveries = || cp.deliveries_as(Some(&cp.api_key));
    let here = create(webhook("here", "https://receiver.invalid/here", &["incident.*"])).await;
    let mut far = webhook("far", "https://receiver.invalid/far", &["incident.*"]);
    far.zone = "eu-west".into();
    let far = create(far).await;
    let mut watch = deliveries().watch_deliveries(proto::WatchDeliveriesRequest::default()).await.unwrap();
    let e = herald_tests::event("incident.created", "{}");
    let e = cp.events().publish_event(proto::PublishEventRequest { event: Some(e) }).await.unwrap().into_inner();
    let id_of = |hook: &proto::Webhook| e.deliveries.iter().find(|d| d.webhook_id == hook.id).unwrap().id.clone();
    let (mine, theirs) = (id_of(&here), id_of(&far));
    let get = |id: String| {
        let mut client = deliveries();
        async move { client.get_delivery(proto::GetDeliveryRequest { id }).await.unwrap().into_inner() }
    };
    let listed = || {
        let (mut client, mine, theirs) = (deliveries(), mine.clone(), theirs.clone());
        async move {
            let all = client.list_deliveries(proto::ListDeliveriesRequest::default()).await.unwrap().into_inner();
            let waiting = |id: &str| all.deliveries.iter().find(|d| d.id == id).unwrap().waiting_for_agent;
            (waiting(&mine), waiting(&theirs))
        }
    };

    // No agent at all: both wait, and say so.
    let d = get(mine.clone()).await;
    assert_eq!((d.status, d.waiting_for_agent), (DeliveryStatus::Pending as i32, true));
    assert!(get(theirs.clone()).await.waiting_for_agent);
    assert_eq!(listed().await, (true, true));
    let change = tokio::time::timeout(WAIT, watch.get_mut().message()).await.unwrap().unwrap().unwrap();
    assert!(change.delivery.unwrap().waiting_for_agent, "the watcher is told too");

    // An agent of zone `default` connects (with no credit, so nothing is sent yet).
    let _agent = crate::support::HandAgent::open(&cp, TOKEN, 1, Vec::new()).await;
    let d = get(mine.clone()).await;
    assert_eq!((d.status, d.waiting_for_agent), (DeliveryStatus::Pending as i32, false));
    assert!(get(theirs.clone()).await.waiting_for_agent, "eu-west still has no agent");
    assert_eq!(listed().await, (false, true));

    // The CLI shows it, in the table and in JSON.
    let herald = |args: &[&str]| {
        tokio::process::Command::new(herald_tests::bin("herald"))
            .args(args)
            .env("HERALD_ADDR", format!("http://{}", cp.addr))
            .env("HERALD_API_KEY", &cp.api_key)
            .output()
    };
    let table = herald(&["deliveries", "get", &theirs]).await.unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains("pending (no agent in zone eu-west)"), "{table:?}");
    let json = herald(&["deliveries", "get", &mine, "--json"]).await.unwrap();
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!((json["status"].as_str(), json["waiting_for_agent"].as_bool()), (Some("pending"), Some(false)));
    cp.stop().await;
}
