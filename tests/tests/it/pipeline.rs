//! The delivery pipeline end to end: the real `herald` and `herald-agent` binaries, HTTPS
//! receivers on loopback with a CA made at test time, signatures checked independently.

use std::time::Duration;

use herald_control_plane::db::entity::{attempt, delivery, event};
use herald_shared::proto::{self, ErrorKind};
use herald_tests::procs::{AgentProcess, ControlPlaneProcess, signal};
use herald_tests::receiver::{Received, Receiver, Reply};
use herald_tests::tls::TestCa;
use herald_tests::{Backend, TestDb, webhook};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder};

both_databases!(
    one_event_reaches_three_webhooks_in_two_zones,
    nothing_is_lost_across_a_control_plane_crash,
    published_deliveries_go_straight_to_a_waiting_agent,
    a_delivery_in_flight_when_acknowledged_survives_a_crash
);

pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// HMAC-SHA256 computed here with ring, independently of `herald-shared`.
pub(crate) fn expected_signature(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!("sha256={}", hex::encode(ring::hmac::sign(&key, body).as_ref()))
}

pub(crate) async fn create(cp: &ControlPlaneProcess, w: proto::Webhook) -> proto::Webhook {
    cp.webhooks().create_webhook(proto::CreateWebhookRequest { webhook: Some(w) }).await.expect("create").into_inner()
}

pub(crate) async fn publish(cp: &ControlPlaneProcess, event_type: &str, data_json: &str) -> proto::Event {
    let e = herald_tests::event(event_type, data_json);
    cp.events().publish_event(proto::PublishEventRequest { event: Some(e) }).await.expect("publish").into_inner()
}

fn in_zone(mut w: proto::Webhook, zone: &str) -> proto::Webhook {
    w.zone = zone.into();
    w
}

/// Waits until every delivery of `event_id` is in a final state; returns them.
pub(crate) async fn settled(db: &TestDb, event_id: &str) -> Vec<delivery::Model> {
    settled_where(db, event_id, |_| true).await
}

/// Waits until there are deliveries of `event_id` and those `counted` picks are final; returns
/// them all.
async fn settled_where(
    db: &TestDb,
    event_id: &str,
    counted: impl Fn(&delivery::Model) -> bool,
) -> Vec<delivery::Model> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let conn = db.connect().await;
    loop {
        let rows = delivery::Entity::find().filter(delivery::Column::EventId.eq(event_id)).all(&conn).await.unwrap();
        if !rows.is_empty() && rows.iter().filter(|d| counted(d)).all(|d| [3, 4, 5].contains(&d.status)) {
            conn.close().await.ok();
            return rows;
        }
        assert!(tokio::time::Instant::now() < deadline, "deliveries of {event_id} did not settle: {rows:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) async fn attempts_of(db: &TestDb, delivery_id: &str) -> Vec<attempt::Model> {
    let conn = db.connect().await;
    let rows = attempt::Entity::find()
        .filter(attempt::Column::DeliveryId.eq(delivery_id))
        .order_by_asc(attempt::Column::Id)
        .all(&conn)
        .await
        .unwrap();
    conn.close().await.ok();
    rows
}

/// The envelope as the documentation promises it, built here from the stored event's fields.
fn envelope_of(e: &proto::Event, timestamp: &str) -> String {
    format!(
        r#"{{"id":"{}","type":"{}","timestamp":"{}","workspace_id":"{}","data":{}}}"#,
        e.id, e.r#type, timestamp, e.workspace_id, e.data_json
    )
}

async fn stored_timestamp(db: &TestDb, event_id: &str) -> String {
    let conn = db.connect().await;
    let e = event::Entity::find().filter(event::Column::Id.eq(event_id)).one(&conn).await.unwrap().unwrap();
    conn.close().await.ok();
    e.timestamp
}

fn assert_documented_headers(r: &Received, event: &proto::Event, attempt: u32) {
    assert_eq!(r.header("content-type"), "application/json");
    assert!(r.header("user-agent").starts_with("Herald/"), "{}", r.header("user-agent"));
    assert_eq!(r.header("x-cloudthinker-event"), event.r#type);
    assert_eq!(r.header("x-cloudthinker-event-id"), event.id);
    assert!(r.header("x-cloudthinker-delivery").starts_with("dlv_"));
    assert_eq!(r.header("x-cloudthinker-attempt"), attempt.to_string());
    let tp = r.header("traceparent");
    let parts: Vec<&str> = tp.split('-').collect();
    assert!(parts.len() == 4 && parts[1].len() == 32 && parts[2].len() == 16, "traceparent {tp:?}");
}

async fn one_event_reaches_three_webhooks_in_two_zones(backend: Backend) {
    let ca = TestCa::new();
    let db = TestDb::new(backend).await;
    let cp = ControlPlaneProcess::start(&db.url, &[]).await;
    let _eu = AgentProcess::start(&cp.url(), "eu", "agent-eu", Some(&ca.path), &[]);
    let _us = AgentProcess::start(&cp.url(), "us", "agent-us", Some(&ca.path), &[]);
    cp.wait_agents(&["agent-eu", "agent-us"]).await;
    let (r1, r2, r3) = (Receiver::https(&ca).await, Receiver::https(&ca).await, Receiver::https(&ca).await);
    let w1 = create(&cp, in_zone(webhook("eu-one", &r1.url("/a"), &["incident.*"]), "eu")).await;
    let mut custom = in_zone(webhook("eu-two", &r2.url("/b"), &["*"]), "eu");
    custom.headers.insert("Authorization".into(), "Bearer customer-token".into());
    let w2 = create(&cp, custom).await;
    let mut std_hook = in_zone(webhook("us", &r3.url("/c"), &["incident.created"]), "us");
    std_hook.signature_scheme = proto::SignatureScheme::StandardWebhooks as i32;
    let w3 = create(&cp, std_hook).await;
    create(&cp, in_zone(webhook("not-subscribed", &r1.url("/never"), &["task.failed"]), "eu")).await;

    let data = r#"{"title":"DB down","potential_savings":150.00}"#;
    let e = publish(&cp, "incident.created", data).await;
    let deliveries = settled(&db, &e.id).await;
    assert_eq!(deliveries.len(), 3);
    assert!(deliveries.iter().all(|d| d.status == delivery::status::SUCCEEDED && d.attempt_count == 1));

    let timestamp = stored_timestamp(&db, &e.id).await;
    let body = envelope_of(&proto::Event { data_json: data.into(), ..e.clone() }, &timestamp);
    for (receiver, hook, zone, agent) in
        [(&r1, &w1, "eu", "agent-eu"), (&r2, &w2, "eu", "agent-eu"), (&r3, &w3, "us", "agent-us")]
    {
        let got = receiver.requests();
        assert_eq!(got.len(), 1, "{}: exactly one POST", hook.name);
        let r = &got[0];
        assert_eq!(std::str::from_utf8(&r.body).unwrap(), body, "the body is the envelope, data byte for byte");
        assert_eq!(r.header("x-cloudthinker-signature"), expected_signature(&hook.secret, &r.body));
        assert_documented_headers(r, &e, 1);
        let d = deliveries.iter().find(|d| d.webhook_id == hook.id).unwrap();
        assert_eq!(r.header("x-cloudthinker-delivery"), d.id);
        let log = attempts_of(&db, &d.id).await;
        assert_eq!((log[0].agent_id.as_str(), log[0].zone.as_str()), (agent, zone), "sent by an agent of its zone");
        assert_eq!(log[0].response_status, 200);
    }
    assert_eq!(r2.requests()[0].header("authorization"), "Bearer customer-token", "custom headers are sent");
    let log = attempts_of(&db, &deliveries.iter().find(|d| d.webhook_id == w2.id).unwrap().id).await;
    assert!(log[0].request_headers.contains(r#""authorization":"***""#), "custom values are masked in the log");
    assert!(!log[0].request_headers.contains("customer-token"));

    // Standard Webhooks, verified by the reference crate.
    let r = &r3.requests()[0];
    let verifier = standardwebhooks::Webhook::new(&w3.secret).unwrap();
    verifier.verify(&r.body, &r.headers).expect("the Standard Webhooks signature verifies");
    assert_eq!(r.header("webhook-id"), e.id);
}

/// A control plane for one zone-`default` agent on SQLite, with a compressed schedule.
pub(crate) async fn single_zone(extra: &[&str]) -> (TestCa, TestDb, ControlPlaneProcess, AgentProcess) {
    single_zone_on(Backend::Sqlite, extra).await
}

/// [`single_zone`] on `backend`.
pub(crate) async fn single_zone_on(
    backend: Backend,
    extra: &[&str],
) -> (TestCa, TestDb, ControlPlaneProcess, AgentProcess) {
    let ca = TestCa::new();
    let db = TestDb::new(backend).await;
    let cp = ControlPlaneProcess::start(&db.url, extra).await;
    let agent = AgentProcess::start(&cp.url(), "default", "agent-1", Some(&ca.path), &[]);
    cp.wait_agents(&["agent-1"]).await;
    (ca, db, cp, agent)
}

fn with_timeout(mut w: proto::Webhook, ms: i64) -> proto::Webhook {
    w.timeout = Some(prost_types::Duration { seconds: ms / 1000, nanos: ((ms % 1000) * 1_000_000) as i32 });
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attempts_are_retried_on_schedule() {
    let (ca, db, cp, _agent) = single_zone(&["--retry-schedule", "0s,400ms,800ms", "--lease-grace", "5s"]).await;
    let r = Receiver::https(&ca).await;
    r.script([Reply::status(500), Reply::Hang(Duration::from_secs(3))]);
    let hook = create(&cp, with_timeout(webhook("flaky", &r.url("/"), &["*"]), 500)).await;
    let e = publish(&cp, "task.failed", "{}").await;
    let d = settled(&db, &e.id).await.remove(0);
    assert_eq!((d.status, d.attempt_count), (delivery::status::SUCCEEDED, 3));
    let log = attempts_of(&db, &d.id).await;
    let kinds: Vec<(i32, i32, i32)> = log.iter().map(|a| (a.number, a.response_status, a.error_kind)).collect();
    assert_eq!(
        kinds,
        [
            (1, 500, ErrorKind::HttpStatus as i32),
            (2, 0, ErrorKind::Timeout as i32),
            (3, 200, ErrorKind::Unspecified as i32)
        ]
    );
    assert!(
        log[1].duration_ms >= 450 && log[1].duration_ms < 2900,
        "the 500 ms timeout is enforced against a 3 s hang: {}",
        log[1].duration_ms
    );
    // Each attempt starts no earlier than the schedule allows after the previous one ended.
    for (prev, next, delay) in [(&log[0], &log[1], 400), (&log[1], &log[2], 800)] {
        let earliest = prev.started_at + prev.duration_ms + delay;
        assert!(next.started_at >= earliest - 5, "attempt {} at {} before {earliest}", next.number, next.started_at);
    }
    let got = r.requests();
    assert_eq!(got.len(), 3);
    for (i, req) in got.iter().enumerate() {
        assert_eq!(req.header("x-cloudthinker-attempt"), (i + 1).to_string());
        assert_eq!(req.header("x-cloudthinker-signature"), expected_signature(&hook.secret, &req.body));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_deliveries_fail_and_notify_exactly_once() {
    let (ca, db, cp, _agent) = single_zone(&["--retry-schedule", "0s,50ms,50ms,50ms,50ms,50ms"]).await;
    let failing = Receiver::https(&ca).await;
    failing.always(Reply::status(500));
    let ops = Receiver::https(&ca).await;
    ops.always(Reply::status(503));
    let hook = create(&cp, webhook("down", &failing.url("/"), &["*"])).await;
    let notify = create(&cp, webhook("ops", &ops.url("/"), &["webhook.delivery.failed"])).await;
    let e = publish(&cp, "incident.created", r#"{"title":"DB down"}"#).await;
    let d = settled(&db, &e.id).await.remove(0);
    assert_eq!((d.status, d.attempt_count), (delivery::status::FAILED, 6));
    assert_eq!(failing.requests().len(), 6, "six attempts");

    let conn = db.connect().await;
    let op_events =
        event::Entity::find().filter(event::Column::EventType.eq("webhook.delivery.failed")).all(&conn).await.unwrap();
    assert_eq!(op_events.len(), 1);
    let op = settled(&db, &op_events[0].id).await;
    assert_eq!(op.len(), 1, "only the explicit subscriber");
    assert_eq!((op[0].webhook_id.as_str(), op[0].status), (notify.id.as_str(), delivery::status::FAILED));
    let got = ops.requests();
    assert_eq!(got.len(), 6, "the notification is retried like any delivery");
    let payload: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(payload["type"], "webhook.delivery.failed");
    assert_eq!(payload["data"]["webhook_id"], hook.id.as_str());
    assert_eq!(payload["data"]["event_id"], e.id.as_str());
    assert_eq!(payload["data"]["attempts"], 6);
    assert_eq!(payload["data"]["last_status"], 500);
    // Its own failure publishes nothing more.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again =
        event::Entity::find().filter(event::Column::EventType.eq("webhook.delivery.failed")).all(&conn).await.unwrap();
    assert_eq!(again.len(), 1, "still exactly one operational event");
    conn.close().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_failures_and_retry_after_is_honoured() {
    let (ca, db, cp, _agent) = single_zone(&["--retry-schedule", "0s,100ms,100ms"]).await;
    let r = Receiver::https(&ca).await;
    let elsewhere = Receiver::https(&ca).await;
    r.script([
        Reply::Status(302, vec![("location", elsewhere.url("/stolen"))]),
        Reply::Status(429, vec![("retry-after", "1".into())]),
    ]);
    create(&cp, webhook("redirecting", &r.url("/"), &["*"])).await;
    let e = publish(&cp, "task.failed", "{}").await;
    let d = settled(&db, &e.id).await.remove(0);
    assert_eq!((d.status, d.attempt_count), (delivery::status::SUCCEEDED, 3));
    assert!(elsewhere.requests().is_empty(), "the redirect was not followed");
    let log = attempts_of(&db, &d.id).await;
    assert_eq!((log[0].response_status, log[0].error_kind), (302, ErrorKind::HttpStatus as i32));
    assert_eq!(log[1].response_status, 429);
    let waited = log[2].started_at - (log[1].started_at + log[1].duration_ms);
    assert!(waited >= 990, "Retry-After: 1 moved the attempt 100ms -> 1s later, waited {waited}ms");
}

/// A `Retry-After` of any size is capped at `--retry-after-max` (before, a number of seconds
/// past about 9 × 10¹⁵ overflowed where the control plane turned it into milliseconds: its
/// result loop panicked and no result was recorded again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_retry_after_is_capped() {
    let (ca, db, cp, _agent) = single_zone(&["--retry-schedule", "0s,100ms", "--retry-after-max", "1s"]).await;
    let r = Receiver::https(&ca).await;
    r.script([Reply::Status(429, vec![("retry-after", "99999999999999999".into())])]);
    create(&cp, webhook("patient", &r.url("/"), &["*"])).await;
    let e = publish(&cp, "task.failed", "{}").await;
    let d = settled(&db, &e.id).await.remove(0);
    assert_eq!((d.status, d.attempt_count), (delivery::status::SUCCEEDED, 2));
    let log = attempts_of(&db, &d.id).await;
    assert_eq!(log[0].response_status, 429);
    let waited = log[1].started_at - (log[0].started_at + log[0].duration_ms);
    assert!(waited >= 990, "pushed back to the 1s cap, not the 100ms schedule: waited {waited}ms");
    // Results after it are recorded too.
    let e = publish(&cp, "task.failed", "{}").await;
    assert_eq!(settled(&db, &e.id).await[0].status, delivery::status::SUCCEEDED);
}

/// Two agents in one zone and a receiver that hangs on the first request: the delivery is in
/// flight, held by one of them.
struct HeldLease {
    db: TestDb,
    cp: ControlPlaneProcess,
    a: AgentProcess,
    b: AgentProcess,
    r: Receiver,
    event: proto::Event,
    /// Whether agent-a holds the lease (else agent-b).
    a_holds: bool,
    ca: TestCa,
}

async fn held_lease(lease_grace: &str, hang: Duration, timeout_ms: i64) -> HeldLease {
    let ca = TestCa::new();
    let db = TestDb::new(Backend::Sqlite).await;
    let cp = ControlPlaneProcess::start(&db.url, &["--lease-grace", lease_grace]).await;
    let a = AgentProcess::start(&cp.url(), "default", "agent-a", Some(&ca.path), &[]);
    let b = AgentProcess::start(&cp.url(), "default", "agent-b", Some(&ca.path), &[]);
    cp.wait_agents(&["agent-a", "agent-b"]).await;
    let r = Receiver::https(&ca).await;
    r.script([Reply::Hang(hang)]);
    create(&cp, with_timeout(webhook("slow", &r.url("/"), &["*"]), timeout_ms)).await;
    let event = publish(&cp, "task.failed", "{}").await;
    r.wait_for(1, WAIT).await;
    // Which agent holds the lease?
    let conn = db.connect().await;
    let held =
        delivery::Entity::find().filter(delivery::Column::EventId.eq(&event.id)).one(&conn).await.unwrap().unwrap();
    conn.close().await.ok();
    assert_eq!(held.status, delivery::status::IN_FLIGHT);
    let a_holds = held.lease_agent.unwrap().starts_with("agent-a@");
    HeldLease { db, cp, a, b, r, event, a_holds, ca }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_agent_that_holds_the_lease_costs_no_attempt() {
    // Every field is bound: the control plane and CA must live as long as the test.
    let HeldLease { db, cp: _cp, mut a, mut b, r, event: e, a_holds, ca: _ca } =
        held_lease("1s", Duration::from_secs(60), 5_000).await;
    let (victim, survivor) = if a_holds { (&mut a, "agent-b") } else { (&mut b, "agent-a") };
    signal(&victim.child, "KILL");
    let _ = victim.child.wait().await;

    let got = r.wait_for(2, WAIT).await;
    assert_eq!(got[1].header("x-cloudthinker-attempt"), "1", "the lost lease did not use up an attempt");
    let d = settled(&db, &e.id).await.remove(0);
    assert_eq!((d.status, d.attempt_count, d.lost_leases), (delivery::status::SUCCEEDED, 1, 0));
    let log = attempts_of(&db, &d.id).await;
    assert_eq!(log.len(), 1, "the killed agent never reported");
    assert_eq!(log[0].agent_id, survivor);
}

async fn nothing_is_lost_across_a_control_plane_crash(backend: Backend) {
    let ca = TestCa::new();
    let db = TestDb::new(backend).await;
    let mut cp = ControlPlaneProcess::start(&db.url, &[]).await;
    let r = Receiver::https(&ca).await;
    create(&cp, webhook("all", &r.url("/"), &["*"])).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(publish(&cp, "task.completed", &format!(r#"{{"i":{i}}}"#)).await.id);
    }
    // No agent yet: everything is pending when the control plane is killed.
    cp.kill_and_restart().await;
    let _agent = AgentProcess::start(&cp.url(), "default", "agent-1", Some(&ca.path), &[]);
    let got = r.wait_for(20, WAIT).await;
    let mut seen: Vec<String> = got.iter().map(|g| g.header("x-cloudthinker-event-id")).collect();
    seen.sort();
    seen.dedup();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(seen, want, "every acknowledged event delivered");
    for id in &ids {
        assert_eq!(settled(&db, id).await[0].status, delivery::status::SUCCEEDED);
    }
}

/// The status the publish answer gives `webhook`'s delivery.
fn status_for(e: &proto::Event, webhook: &proto::Webhook) -> i32 {
    e.deliveries.iter().find(|d| d.webhook_id == webhook.id).map(|d| d.status).expect("a delivery for the webhook")
}

/// Publishes until the answer shows `webhook`'s delivery already in flight (leased to an agent
/// as it was stored); returns every event published. The dispatcher leases at publish only once
/// a claim has found the zone drained, which happens as soon as the agent's credit arrives.
async fn publish_until_leased(cp: &ControlPlaneProcess, webhook: &proto::Webhook) -> Vec<proto::Event> {
    let mut published = Vec::new();
    for i in 0..50 {
        let e = publish(cp, "task.completed", &format!(r#"{{"i":{i}}}"#)).await;
        let leased = status_for(&e, webhook) == proto::DeliveryStatus::InFlight as i32;
        published.push(e);
        if leased {
            return published;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no delivery was leased as it was published: {published:?}");
}

async fn published_deliveries_go_straight_to_a_waiting_agent(backend: Backend) {
    let ca = TestCa::new();
    let db = TestDb::new(backend).await;
    let cp = ControlPlaneProcess::start(&db.url, &[]).await;
    let _agent = AgentProcess::start(&cp.url(), "default", "agent-1", Some(&ca.path), &[]);
    cp.wait_agents(&["agent-1"]).await;
    let (fast, limited, far) = (Receiver::https(&ca).await, Receiver::https(&ca).await, Receiver::https(&ca).await);
    let hook = create(&cp, webhook("fast", &fast.url("/"), &["task.*"])).await;
    // A webhook with a limit is always claimed, where its limit is counted; a zone without an
    // agent here queues.
    let mut w = webhook("limited", &limited.url("/"), &["task.*"]);
    w.max_in_flight = Some(5);
    let limited_hook = create(&cp, w).await;
    let far_hook = create(&cp, in_zone(webhook("far", &far.url("/"), &["task.*"]), "far")).await;

    let published = publish_until_leased(&cp, &hook).await;
    for e in &published {
        assert_eq!(status_for(e, &limited_hook), proto::DeliveryStatus::Pending as i32, "{e:?}");
        assert_eq!(status_for(e, &far_hook), proto::DeliveryStatus::Pending as i32, "{e:?}");
    }
    // Each event reaches the fast and the limited webhook once, signed, on attempt 1.
    let n = published.len();
    fast.wait_for(n, WAIT).await;
    limited.wait_for(n, WAIT).await;
    // Nothing arrives twice: once every delivery is final, the receivers saw no more than that.
    for e in &published {
        settled_where(&db, &e.id, |d| d.zone != "far").await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (got, got_limited) = (fast.requests(), limited.requests());
    for (received, w) in [(&got, &hook), (&got_limited, &limited_hook)] {
        let mut ids: Vec<String> = received.iter().map(|r| r.header("x-cloudthinker-event-id")).collect();
        ids.sort();
        let mut want: Vec<String> = published.iter().map(|e| e.id.clone()).collect();
        want.sort();
        assert_eq!(ids, want, "every event once at {}", w.name);
        for r in received.iter() {
            assert_eq!(r.header("x-cloudthinker-signature"), expected_signature(&w.secret, &r.body));
            assert_eq!(r.header("x-cloudthinker-attempt"), "1");
        }
    }
    let rows = settled_where(&db, &published.last().expect("one event at least").id, |d| d.zone != "far").await;
    let row = rows.iter().find(|d| d.webhook_id == hook.id).expect("the fast delivery");
    assert_eq!((row.status, row.attempt_count), (delivery::status::SUCCEEDED, 1));
    let attempts = attempts_of(&db, &row.id).await;
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!((attempts[0].agent_id.as_str(), attempts[0].response_status, attempts[0].number), ("agent-1", 200, 1));
    assert_eq!(far.count(), 0, "the far zone has no agent");
    // Operators see both ways in the metrics: the limited webhook's jobs went through claims.
    let metrics = herald_tests::parse_metrics(&herald_tests::http_get(cp.http_port, "/metrics").await.1);
    let sent = |via: &str| metrics.get(&format!(r#"herald_jobs_sent_total{{via="{via}"}}"#)).copied();
    assert!(sent("publish").is_some_and(|n| n >= 1.0), "{metrics:?}");
    assert!(sent("claim").is_some_and(|claimed| claimed >= n as f64), "{metrics:?}");
    // Just published, the envelopes came from the cache the publish filled (a claim that ran
    // between a publish's commit and its caching read the database).
    let envelopes =
        |source: &str| metrics.get(&format!(r#"herald_event_envelopes_total{{source="{source}"}}"#)).copied();
    let (cached, read) = (envelopes("cache").unwrap_or(0.0), envelopes("database").unwrap_or(0.0));
    assert!(cached >= n as f64 && cached + read >= 2.0 * n as f64, "{metrics:?}");
    // Every job's credit came back, from leases at publish and from claims alike: the agent
    // holds nothing once its results are in (a reservation left behind would show here).
    let agents = cp.agents().list_agents(proto::ListAgentsRequest { zone: "default".into() }).await;
    let agents = agents.expect("list agents").into_inner().agents;
    assert_eq!(agents.iter().map(|a| (a.id.as_str(), a.in_flight)).collect::<Vec<_>>(), [("agent-1", 0)]);
}

/// An event acknowledged with its delivery leased, as it was stored, to an agent that never
/// takes the job (stopped), and the control plane killed: after the restart the lease expires
/// and another agent delivers it, on attempt 1, the lost lease costing no attempt.
async fn a_delivery_in_flight_when_acknowledged_survives_a_crash(backend: Backend) {
    let ca = TestCa::new();
    let db = TestDb::new(backend).await;
    let mut cp = ControlPlaneProcess::start(&db.url, &["--lease-grace", "300ms"]).await;
    let stopped = AgentProcess::start(&cp.url(), "default", "agent-1", Some(&ca.path), &[]);
    cp.wait_agents(&["agent-1"]).await;
    let r = Receiver::https(&ca).await;
    let hook = create(&cp, with_timeout(webhook("all", &r.url("/"), &["task.*"]), 1000)).await;
    // The agent stays connected as far as the control plane knows, but reads nothing more.
    signal(&stopped.child, "STOP");
    let published = publish_until_leased(&cp, &hook).await;
    cp.kill_and_restart().await;
    signal(&stopped.child, "KILL");
    let _agent = AgentProcess::start(&cp.url(), "default", "agent-2", Some(&ca.path), &[]);
    let got = r.wait_for(published.len(), WAIT).await;
    let mut seen: Vec<String> = got.iter().map(|g| g.header("x-cloudthinker-event-id")).collect();
    seen.sort();
    seen.dedup();
    let mut want: Vec<String> = published.iter().map(|e| e.id.clone()).collect();
    want.sort();
    assert_eq!(seen, want, "every acknowledged event delivered");
    let leased = published.last().expect("one event at least");
    let row = settled(&db, &leased.id).await.remove(0);
    assert_eq!((row.status, row.attempt_count), (delivery::status::SUCCEEDED, 1), "{row:?}");
    let attempts = attempts_of(&db, &row.id).await;
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0].agent_id, "agent-2");
    // The restarted control plane took the leases back when they expired.
    let metrics = herald_tests::parse_metrics(&herald_tests::http_get(cp.http_port, "/metrics").await.1);
    let reclaimed = metrics.get(r#"herald_leases_reclaimed_total{reason="expired"}"#).copied().unwrap_or(0.0);
    assert!(reclaimed >= published.len() as f64, "{reclaimed} leases reclaimed for {} events", published.len());
    // Nothing was cached in this run: the envelopes were read back.
    let read = metrics.get(r#"herald_event_envelopes_total{source="database"}"#).copied().unwrap_or(0.0);
    assert!(read >= published.len() as f64, "{read} envelopes read for {} events", published.len());
    for e in &published {
        assert_eq!(settled(&db, &e.id).await[0].status, delivery::status::SUCCEEDED);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slack_template_renders_and_is_signed() {
    let (ca, _db, cp, _agent) = single_zone(&[]).await;
    let r = Receiver::https(&ca).await;
    let templates = cp.webhooks().list_templates(proto::ListTemplatesRequest {}).await.unwrap().into_inner().templates;
    let slack = templates.into_iter().find(|t| t.id == "slack").unwrap();
    let mut w = webhook("slack", &r.url("/services/T0/B0/X"), &["incident.created"]);
    w.transform = slack.transform;
    let hook = create(&cp, w).await;
    publish(&cp, "incident.created", r#"{"title":"DB down"}"#).await;
    let got = r.wait_for(1, WAIT).await;
    let body: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(body, serde_json::json!({"text": "New incident.created: DB down"}));
    assert_eq!(got[0].header("x-cloudthinker-signature"), expected_signature(&hook.secret, &got[0].body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_and_rate_limits_hold() {
    let (ca, db, cp, _agent) = single_zone(&[]).await;
    let slow = Receiver::https(&ca).await;
    slow.always(Reply::Hang(Duration::from_millis(150)));
    let mut w = webhook("one-at-a-time", &slow.url("/"), &["task.*"]);
    w.max_in_flight = Some(1);
    create(&cp, w).await;
    let limited = Receiver::https(&ca).await;
    let mut w = webhook("five-per-second", &limited.url("/"), &["incident.*"]);
    w.rate_limit_per_second = Some(5);
    create(&cp, w).await;
    let mut last = Vec::new();
    for _ in 0..5 {
        last.push(publish(&cp, "task.started", "{}").await.id);
    }
    for _ in 0..10 {
        last.push(publish(&cp, "incident.created", "{}").await.id);
    }
    for id in &last {
        settled(&db, id).await;
    }
    assert_eq!(slow.requests().len(), 5);
    assert_eq!(slow.most_concurrent(), 1, "max_in_flight = 1 means one request at a time");
    let at: Vec<i64> = limited.requests().iter().map(|r| r.at_ms).collect();
    assert_eq!(at.len(), 10);
    // A burst of five, then one every 200 ms: ten requests take at least a second.
    assert!(at[9] - at[0] >= 900, "rate limit ignored: {:?}", at.iter().map(|t| t - at[0]).collect::<Vec<_>>());
}

/// A burst to one HTTP/1.1 receiver reuses the connections the burst before it opened: the agent
/// keeps as many idle connections per host as it may have jobs in flight, not a few. (An HTTP/2
/// receiver needs one connection anyway; over HTTP/1.1, keeping 64, a second burst of 200
/// concurrent requests opened over a hundred connections again, each a TLS handshake over HTTPS.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_to_one_receiver_reuse_its_connections() {
    const BURST: usize = 200;
    let db = TestDb::new(Backend::Sqlite).await;
    let cp = ControlPlaneProcess::start(&db.url, &["--allow-http"]).await;
    let _agent = AgentProcess::start(&cp.url(), "default", "agent-1", None, &["--allow-http"]);
    cp.wait_agents(&["agent-1"]).await;
    let r = Receiver::http().await;
    // Every request is held a little, so that a burst is answered concurrently.
    r.always(Reply::Hang(Duration::from_millis(200)));
    create(&cp, webhook("busy", &r.url("/"), &["*"])).await;
    let conn = db.connect().await;
    let succeeded =
        || delivery::Entity::find().filter(delivery::Column::Status.eq(delivery::status::SUCCEEDED)).count(&conn);
    for wave in 1..=2 {
        let events = (0..BURST).map(|_| herald_tests::event("task.started", "{}")).collect();
        cp.events().publish_events(proto::PublishEventsRequest { events }).await.expect("publish");
        let deadline = tokio::time::Instant::now() + WAIT;
        while succeeded().await.unwrap() < (wave * BURST) as u64 {
            assert!(tokio::time::Instant::now() < deadline, "burst {wave} was not delivered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (most, opened) = (r.most_concurrent(), r.connections());
    assert!(most > 64, "the bursts were not concurrent enough to tell: {most}");
    // Never more connections than were needed at once (give or take a connection racing a
    // finishing request for a job); keeping 64 idle, the second burst reopens over a hundred.
    assert!(opened <= most + 16, "{opened} connections opened for at most {most} requests at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_list_their_zone_and_egress_ips_and_drain_on_sigterm() {
    let ca = TestCa::new();
    let db = TestDb::new(Backend::Sqlite).await;
    let cp = ControlPlaneProcess::start(&db.url, &[]).await;
    let mut agent = AgentProcess::start(
        &cp.url(),
        "eu-west",
        "agent-eu",
        Some(&ca.path),
        &["--egress-ip", "203.0.113.7", "--max-in-flight", "8"],
    );
    cp.wait_agents(&["agent-eu"]).await;
    let listed =
        cp.agents().list_agents(proto::ListAgentsRequest { zone: "eu-west".into() }).await.unwrap().into_inner();
    assert_eq!(listed.agents.len(), 1);
    let a = &listed.agents[0];
    assert_eq!((a.id.as_str(), a.zone.as_str(), a.capacity), ("agent-eu", "eu-west", 8));
    assert_eq!(a.egress_ips, ["203.0.113.7"]);
    let other = cp.agents().list_agents(proto::ListAgentsRequest { zone: "us".into() }).await.unwrap().into_inner();
    assert!(other.agents.is_empty());

    // SIGTERM while a request is in flight: the agent finishes it, reports it, then exits.
    let r = Receiver::https(&ca).await;
    r.script([Reply::Hang(Duration::from_millis(800))]);
    create(&cp, in_zone(webhook("slow", &r.url("/"), &["*"]), "eu-west")).await;
    let e = publish(&cp, "task.completed", "{}").await;
    r.wait_for(1, WAIT).await;
    signal(&agent.child, "TERM");
    let status = tokio::time::timeout(WAIT, agent.child.wait()).await.expect("the agent exits after draining").unwrap();
    assert!(status.success(), "{status:?}");
    let d = settled(&db, &e.id).await.remove(0);
    assert_eq!((d.status, d.attempt_count), (delivery::status::SUCCEEDED, 1), "the in-flight attempt was reported");
    assert_eq!(r.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_for_an_expired_lease_changes_nothing() {
    // Every field is bound: the control plane and CA must live as long as the test.
    let HeldLease { db, cp: _cp, mut a, mut b, r, event: e, a_holds, ca: _ca } =
        held_lease("300ms", Duration::from_secs(3), 1_000).await;
    let (frozen, other) = if a_holds { (&mut a, "agent-b") } else { (&mut b, "agent-a") };
    // Freeze the holder: its lease (1 s timeout + 300 ms grace) expires; the other agent delivers.
    signal(&frozen.child, "STOP");
    r.wait_for(2, WAIT).await;
    let d = settled(&db, &e.id).await.remove(0);
    assert_eq!((d.status, d.attempt_count), (delivery::status::SUCCEEDED, 1));
    // Thawed, the holder reports its (timed out) attempt under the expired lease.
    signal(&frozen.child, "CONT");
    let deadline = tokio::time::Instant::now() + WAIT;
    let log = loop {
        let log = attempts_of(&db, &d.id).await;
        if log.len() == 2 {
            break log;
        }
        assert!(tokio::time::Instant::now() < deadline, "the stale result was not recorded: {log:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let fresh = log.iter().find(|x| !x.stale).expect("the applied attempt");
    let stale = log.iter().find(|x| x.stale).expect("the stale attempt");
    assert_eq!(fresh.agent_id, other);
    assert_ne!(stale.agent_id, other);
    let after = settled(&db, &e.id).await.remove(0);
    assert_eq!(
        (after.status, after.attempt_count),
        (delivery::status::SUCCEEDED, 1),
        "the stale result changed nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_dev_delivers_to_a_local_plain_http_receiver() {
    let dir = tempfile::tempdir().unwrap();
    let port = herald_tests::procs::free_port();
    let mut dev = tokio::process::Command::new(herald_tests::bin("herald"))
        .args(["dev", "--grpc-addr", &format!("127.0.0.1:{port}"), "--http-addr", "127.0.0.1:0"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt as _;
    let mut lines = tokio::io::BufReader::new(dev.stdout.take().unwrap()).lines();
    tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("Herald dev is running") {
                return;
            }
        }
    })
    .await
    .expect("herald dev prints its banner");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("herald-dev.json")).unwrap()).unwrap();
    let key = state["api_key"].as_str().unwrap().to_owned();
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect_lazy();
    let bearer = herald_tests::Bearer(Some(format!("Bearer {key}").parse().unwrap()));
    let receiver = Receiver::http().await;
    let mut hooks =
        proto::webhook_service_client::WebhookServiceClient::with_interceptor(channel.clone(), bearer.clone());
    hooks
        .create_webhook(proto::CreateWebhookRequest { webhook: Some(webhook("local", &receiver.url("/hook"), &["*"])) })
        .await
        .unwrap();
    let mut events = proto::event_service_client::EventServiceClient::with_interceptor(channel, bearer);
    let e = herald_tests::event("incident.created", r#"{"title":"DB down"}"#);
    events.publish_event(proto::PublishEventRequest { event: Some(e) }).await.unwrap();
    let got = receiver.wait_for(1, WAIT).await;
    assert!(std::str::from_utf8(&got[0].body).unwrap().contains(r#""title":"DB down""#));
    signal(&dev, "TERM");
    let status = tokio::time::timeout(WAIT, dev.wait()).await.expect("herald dev stops on SIGTERM").unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_the_agent_could_not_report_arrive_with_its_next_session() {
    let (ca, db, mut cp, _agent) = single_zone(&[]).await;
    let r = Receiver::https(&ca).await;
    r.script([Reply::Hang(Duration::from_millis(1500))]);
    create(&cp, webhook("slow", &r.url("/"), &["*"])).await;
    let e = publish(&cp, "task.completed", "{}").await;
    r.wait_for(1, WAIT).await;
    // The control plane dies while the attempt is in flight; the agent finishes it, keeps the
    // result, and reports it in the hello of its next session, under a lease still current.
    cp.kill_and_restart().await;
    let d = settled(&db, &e.id).await.remove(0);
    assert_eq!((d.status, d.attempt_count, d.lost_leases), (delivery::status::SUCCEEDED, 1, 0));
    let log = attempts_of(&db, &d.id).await;
    assert_eq!(log.len(), 1);
    assert!(!log[0].stale, "the kept result was applied, not dismissed as stale");
    assert_eq!(r.requests().len(), 1, "nothing was sent twice");
}

/// A control plane that crashes while an agent sends to a webhook with `max_in_flight = 1` comes
/// back counting that lease in the webhook's slot: the agent is still sending, so the next
/// delivery waits for its result rather than going out beside it. (Before, the restarted control
/// plane started from empty counts and sent the second request while the first was still open.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_control_plane_counts_the_leases_it_gave_out_before_in_max_in_flight() {
    let (ca, db, mut cp, _agent) = single_zone(&[]).await;
    let r = Receiver::https(&ca).await;
    // The first request is answered after 4 s, long after the control plane is back.
    r.script([Reply::Hang(Duration::from_secs(4))]);
    let mut w = webhook("one-at-a-time", &r.url("/"), &["*"]);
    w.max_in_flight = Some(1);
    create(&cp, w).await;
    let first = publish(&cp, "task.completed", "{}").await;
    r.wait_for(1, WAIT).await;
    let second = publish(&cp, "task.completed", "{}").await;
    cp.kill_and_restart().await;
    cp.wait_agents(&["agent-1"]).await;
    for e in [&first, &second] {
        let d = settled(&db, &e.id).await.remove(0);
        assert_eq!((d.status, d.attempt_count), (delivery::status::SUCCEEDED, 1), "{d:?}");
    }
    assert_eq!(r.requests().len(), 2, "each delivery sent once");
    assert_eq!(r.most_concurrent(), 1, "max_in_flight = 1 holds across the restart");
}

/// An agent asked to drain (its control plane is going away) may be sent a job after the drain
/// began, answer it unsent, and be unable to report that before the stream closes: it brings the
/// result in the hello of its next session. That result says nothing of the new session, which
/// gets work like any other. (Before, an unsent result in a hello marked the new session
/// draining: the agent, connected and ready, was sent nothing until it reconnected.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsent_result_kept_from_a_drained_session_does_not_drain_the_next() {
    use crate::support::HandAgent;
    use herald_control_plane::config::AgentToken;
    const TOKEN: &str = "agent-token-for-the-drained-agent-0";
    let (cp, db) = crate::support::start_with(Backend::Sqlite, |c| {
        c.agent_tokens = vec![AgentToken { token: TOKEN.into(), zones: None }];
    })
    .await;
    // The endpoint is never called: the agent answers by itself.
    let w = webhook("drained", "https://receiver.invalid/hook", &["*"]);
    cp.webhooks().create_webhook(proto::CreateWebhookRequest { webhook: Some(w) }).await.unwrap();
    let mut first = HandAgent::open(&cp, TOKEN, 1, Vec::new()).await;
    first.credit(1);
    let e = herald_tests::event("task.completed", "{}");
    let e = cp.events().publish_event(proto::PublishEventRequest { event: Some(e) }).await.unwrap().into_inner();
    let job = first.job(WAIT).await.expect("the first session gets the job");
    first.close();

    let unsent = proto::AttemptResult {
        lease_id: job.lease_id.clone(),
        delivery_id: job.delivery_id.clone(),
        attempt: job.attempt,
        not_sent: true,
        ..Default::default()
    };
    let mut second = HandAgent::open(&cp, TOKEN, 1, vec![unsent]).await;
    second.credit(1);
    let again = second.job(WAIT).await.expect("the next session gets work");
    assert_eq!(again.delivery_id, job.delivery_id);
    assert_ne!(again.lease_id, job.lease_id, "under a lease of its own");
    assert_eq!(again.attempt, 1, "the job answered unsent used no attempt");
    second.report(proto::AttemptResult {
        lease_id: again.lease_id.clone(),
        delivery_id: again.delivery_id.clone(),
        attempt: again.attempt,
        started_at: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 0 }),
        duration: Some(prost_types::Duration { seconds: 0, nanos: 5_000_000 }),
        status: 200,
        ..Default::default()
    });
    let d = settled(&db, &e.id).await.remove(0);
    assert_eq!((d.status, d.attempt_count), (delivery::status::SUCCEEDED, 1));
    assert_eq!(attempts_of(&db, &d.id).await.len(), 1, "the unsent answer is not an attempt");
    cp.stop().await;
}
