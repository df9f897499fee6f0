//! The delivery queue at the storage layer, with injected time: fenced leases, results, the retry
//! schedule, lost leases and the operational failure event. The agent session and dispatcher that
//! drive it in production arrive with the delivery pipeline.

use herald_control_plane::db::entity::{attempt, delivery, event};
use herald_control_plane::store::Store;
use herald_control_plane::store::queue::{
    Applied, AttemptReport, Claimed, FULL_SCAN_EVERY_MS, Filter, QueuePolicy, policy_from,
};
use herald_shared::proto::{self, ErrorKind};
use herald_tests::{Backend, ControlPlane, TestDb, webhook};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, QueryTrait, Statement,
    TransactionTrait,
};
use std::time::Duration;

use crate::support::start;

both_databases!(
    claims_are_leased_per_zone,
    claims_take_the_oldest_due_first,
    rows_due_behind_the_claim_floor_are_claimed_in_time,
    results_are_fenced_and_final,
    one_batch_settles_each_report_in_order,
    failures_follow_the_schedule_then_notify_once,
    lost_leases_cost_no_attempt_until_the_fourth,
    retry_after_and_pause,
    a_webhooks_open_rows_follow_its_pause_zone_and_deletion,
    migration_9_moves_open_rows_into_their_webhooks_zone,
    queue_reads_use_their_partial_indexes,
    event_lookups_probe_the_primary_key,
    hot_path_inserts_store_every_value_as_given,
    retention_passes_over_events_kept_open,
    watchers_hear_of_pauses_deletions_and_replays,
);

const MIN: i64 = 60_000;

fn policy() -> QueuePolicy {
    policy_from("0s,1m,5m,30m,2h,8h".parse().unwrap(), Duration::from_secs(10), Duration::from_secs(3600), 16)
}

async fn setup(backend: Backend) -> (ControlPlane, TestDb, Store) {
    let (cp, db) = start(backend).await;
    let store = Store::new(db.connect().await, cp.config.secret_key.clone());
    (cp, db, store)
}

async fn hook(cp: &ControlPlane, w: proto::Webhook) -> proto::Webhook {
    cp.webhooks().create_webhook(proto::CreateWebhookRequest { webhook: Some(w) }).await.unwrap().into_inner()
}

async fn publish(cp: &ControlPlane, event_type: &str) -> proto::Event {
    let e = herald_tests::event(event_type, r#"{"title":"DB down"}"#);
    cp.events().publish_event(proto::PublishEventRequest { event: Some(e) }).await.unwrap().into_inner()
}

async fn row(db: &TestDb, id: &str) -> delivery::Model {
    let conn = db.connect().await;
    let d = delivery::Entity::find_by_id(id.to_owned()).one(&conn).await.unwrap().expect("delivery row");
    conn.close().await.ok();
    d
}

async fn attempts(db: &TestDb, id: &str) -> Vec<attempt::Model> {
    let conn = db.connect().await;
    let a = attempt::Entity::find()
        .filter(attempt::Column::DeliveryId.eq(id))
        .order_by_asc(attempt::Column::Id)
        .all(&conn)
        .await
        .unwrap();
    conn.close().await.ok();
    a
}

fn report(c: &Claimed, status: u32, now: i64) -> AttemptReport {
    AttemptReport {
        lease_id: c.lease_id.clone(),
        delivery_id: c.delivery.id.clone(),
        agent_id: c.delivery.lease_agent.clone().unwrap(),
        zone: c.delivery.zone.clone(),
        started_at: now,
        duration_ms: 12,
        status,
        error_kind: if (200..300).contains(&status) { ErrorKind::Unspecified } else { ErrorKind::HttpStatus },
        response_body: b"a response body longer than sixteen bytes".to_vec(),
        ..Default::default()
    }
}

/// "Now" for the queue: a fixed point after every row's creation, so that time is compressed.
fn t0() -> i64 {
    chrono::Utc::now().timestamp_millis() + 1_000
}

async fn claims_are_leased_per_zone(backend: Backend) {
    let (cp, db, store) = setup(backend).await;
    let mut w = webhook("eu", "https://example.com/hook", &["incident.*"]);
    w.zone = "eu".into();
    w.timeout = Some(prost_types::Duration { seconds: 5, nanos: 0 });
    hook(&cp, w).await;
    for _ in 0..3 {
        publish(&cp, "incident.created").await;
    }
    let now = t0();
    assert!(store.claim("us", "agent-us", 10, now, &policy()).await.unwrap().is_empty(), "only the zone's rows");
    let first = store.claim("eu", "agent-1", 2, now, &policy()).await.unwrap();
    assert_eq!(first.len(), 2);
    assert_ne!(first[0].lease_id, first[1].lease_id, "each delivery gets its own lease");
    for c in &first {
        assert_eq!(c.attempt, 1);
        assert_eq!(c.lease_expires_at, now + 5_000 + 10_000, "timeout + lease grace");
        let stored = row(&db, &c.delivery.id).await;
        assert_eq!(stored.status, delivery::status::IN_FLIGHT);
        assert_eq!(stored.lease_id.as_deref(), Some(c.lease_id.as_str()));
        assert_eq!(stored.lease_agent.as_deref(), Some("agent-1"));
    }
    let second = store.claim("eu", "agent-2", 10, now, &policy()).await.unwrap();
    assert_eq!(second.len(), 1, "claimed rows are not claimed again");
    assert!(store.claim("eu", "agent-2", 10, now, &policy()).await.unwrap().is_empty());
    cp.stop().await;
}

/// A claim takes the oldest due rows first, each leased for its own webhook's timeout: when every
/// row is of a webhook without limits (which SQLite claims in one statement) and when a webhook
/// with a limit is among them (the claim then weighs row by row).
async fn claims_take_the_oldest_due_first(backend: Backend) {
    use herald_control_plane::store::queue::due_rows;
    let (cp, db, store) = setup(backend).await;
    let in_eu = |name: &str, types: &[&str], timeout_s: i64| {
        let mut w = webhook(name, "https://example.com/hook", types);
        w.zone = "eu".into();
        w.timeout = Some(prost_types::Duration { seconds: timeout_s, nanos: 0 });
        w
    };
    hook(&cp, in_eu("quick", &["incident.*"], 5)).await;
    for _ in 0..5 {
        publish(&cp, "incident.created").await;
    }
    let now = t0();
    let conn = db.connect().await;
    let due = |conn| async move {
        let rows = due_rows("eu", now).all(conn).await.unwrap();
        rows.into_iter().map(|d| (d.id, d.webhook_id)).collect::<Vec<_>>()
    };
    let order = due(&conn).await;
    assert_eq!(order.len(), 5);
    let mut claimed = Vec::new();
    for want in [2, 2, 2] {
        for c in store.claim("eu", "agent-1", want, now, &policy()).await.unwrap() {
            assert_eq!(c.lease_expires_at, now + 5_000 + 10_000, "the webhook's timeout + lease grace");
            assert_eq!(c.lease_id, row(&db, &c.delivery.id).await.lease_id.unwrap());
            claimed.push((c.delivery.id, c.delivery.webhook_id));
        }
    }
    assert_eq!(claimed, order, "claimed in due order, each once");

    // A webhook with a limit among the due rows: the rows are weighed one by one. Turned down, its
    // rows stay pending and the others are still claimed in due order.
    let mut limited = in_eu("limited", &["task.*"], 7);
    limited.max_in_flight = Some(10);
    let limited = hook(&cp, limited).await;
    for event_type in ["task.started", "incident.created", "task.started", "incident.created"] {
        publish(&cp, event_type).await;
    }
    let now = t0();
    let order = due(&conn).await;
    assert_eq!(order.len(), 4);
    let (held, others): (Vec<_>, Vec<_>) = order.iter().cloned().partition(|(_, w)| *w == limited.id);
    assert_eq!(held.len(), 2);
    let refused = limited.id.clone();
    let filter = Filter {
        allow: Some(Box::new(move |d, limits| {
            assert_eq!(limits.max_in_flight.is_some(), d.webhook_id == refused, "each row with its webhook's limits");
            d.webhook_id != refused
        })),
        ..Default::default()
    };
    let claimed = store.claim_where("eu", "agent-2", 10, now, &policy(), filter).await.unwrap();
    for c in &claimed {
        assert_eq!(c.lease_expires_at, now + 5_000 + 10_000);
    }
    let claimed: Vec<(String, String)> = claimed.into_iter().map(|c| (c.delivery.id, c.delivery.webhook_id)).collect();
    assert_eq!(claimed, others, "the unlimited webhook's rows, in due order");
    for (id, _) in &held {
        assert_eq!(row(&db, id).await.status, delivery::status::PENDING, "a row turned down stays pending");
    }
    // Claimed without the filter, the limited webhook's rows are leased for its own timeout.
    let claimed = store.claim("eu", "agent-3", 10, now, &policy()).await.unwrap();
    let claimed: Vec<(String, String, i64)> = claimed
        .into_iter()
        .map(|c| (c.delivery.id, c.delivery.webhook_id, c.lease_expires_at - now - 10_000))
        .collect();
    let expected: Vec<(String, String, i64)> = held.into_iter().map(|(id, w)| (id, w, 7_000)).collect();
    assert_eq!(claimed, expected);
    conn.close().await.ok();
    cp.stop().await;
}

/// On PostgreSQL a zone's claims start past the last row leased (the claim floor), not at the
/// start of `deliveries_due`, where the entries of leased rows wait for VACUUM. A row that is due
/// again behind the floor (here: put back as a replica's released lease would be) is still
/// claimed: at once when the rows past the floor cannot fill the claim, and otherwise by the
/// first claim `FULL_SCAN_EVERY_MS` after the last read from the start. SQLite has no floor: its
/// claims take the oldest due row first every time.
async fn rows_due_behind_the_claim_floor_are_claimed_in_time(backend: Backend) {
    use herald_control_plane::store::queue::due_rows;
    let (cp, db, store) = setup(backend).await;
    hook(&cp, webhook("a", "https://example.com/hook", &["*"])).await;
    for _ in 0..7 {
        publish(&cp, "task.completed").await;
    }
    let now = t0();
    let conn = db.connect().await;
    let order: Vec<String> = due_rows("default", now).all(&conn).await.unwrap().into_iter().map(|d| d.id).collect();
    assert_eq!(order.len(), 7);
    let ids = |claimed: Vec<Claimed>| claimed.into_iter().map(|c| c.delivery.id).collect::<Vec<_>>();
    let put_back = |id: String| {
        let conn = &conn;
        async move {
            let sql = "UPDATE deliveries SET status = 1, lease_id = NULL, lease_agent = NULL, lease_expires_at = NULL \
                       WHERE id = ";
            let sql = match backend {
                Backend::Postgres => format!("{sql}$1"),
                Backend::Sqlite => format!("{sql}?"),
            };
            let done = conn
                .execute_raw(Statement::from_sql_and_values(conn.get_database_backend(), sql, [id.into()]))
                .await
                .unwrap();
            assert_eq!(done.rows_affected(), 1);
        }
    };

    assert_eq!(ids(store.claim("default", "agent-1", 2, now, &policy()).await.unwrap()), order[0..2]);
    // The oldest row is due again, behind the floor, and the rows past it fill the next claim.
    put_back(order[0].clone()).await;
    let second = ids(store.claim("default", "agent-1", 2, now + 1, &policy()).await.unwrap());
    let third = ids(store.claim("default", "agent-1", 2, now + FULL_SCAN_EVERY_MS, &policy()).await.unwrap());
    match backend {
        Backend::Postgres => {
            assert_eq!(second, order[2..4], "claims start past the floor");
            assert_eq!(third, [order[0].clone(), order[4].clone()], "and read from the start in time");
        }
        Backend::Sqlite => {
            assert_eq!(second, [order[0].clone(), order[2].clone()], "the oldest first");
            assert_eq!(third, order[3..5]);
        }
    }
    // Due again behind the floor when what lies past it cannot fill the claim: claimed at once.
    put_back(order[1].clone()).await;
    let rest = ids(store.claim("default", "agent-1", 10, now + FULL_SCAN_EVERY_MS + 1, &policy()).await.unwrap());
    assert_eq!(rest, [order[1].clone(), order[5].clone(), order[6].clone()], "in due order");
    assert!(store.claim("default", "agent-1", 10, now + FULL_SCAN_EVERY_MS + 2, &policy()).await.unwrap().is_empty());

    // Three rows due again behind the floor and two new ones past it, claimed four at a time: the
    // claim takes the two past the floor, then two from the start, and leaves the third behind
    // the floor it sets, which the next claim takes before a newer row past the floor.
    for id in &order[0..3] {
        put_back(id.clone()).await;
    }
    let pending = |conn| async move {
        due_rows("default", now + FULL_SCAN_EVERY_MS)
            .all(conn)
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.id)
            .collect::<Vec<_>>()
    };
    publish(&cp, "task.completed").await;
    publish(&cp, "task.completed").await;
    let new: Vec<String> = pending(&conn).await.into_iter().filter(|id| !order.contains(id)).collect();
    assert_eq!(new.len(), 2);
    let four = ids(store.claim("default", "agent-1", 4, now + FULL_SCAN_EVERY_MS + 3, &policy()).await.unwrap());
    publish(&cp, "task.completed").await;
    let newest: Vec<String> =
        pending(&conn).await.into_iter().filter(|id| !order.contains(id) && !new.contains(id)).collect();
    assert_eq!(newest.len(), 1);
    let one = ids(store.claim("default", "agent-1", 1, now + FULL_SCAN_EVERY_MS + 4, &policy()).await.unwrap());
    match backend {
        Backend::Postgres => {
            assert_eq!(four, [order[0].clone(), order[1].clone(), new[0].clone(), new[1].clone()]);
            assert_eq!(one, [order[2].clone()], "the row left behind is not passed over");
        }
        Backend::Sqlite => {
            assert_eq!(four, [order[0].clone(), order[1].clone(), order[2].clone(), new[0].clone()]);
            assert_eq!(one, [new[1].clone()]);
        }
    }
    assert_eq!(store.claim("default", "agent-1", 10, now + FULL_SCAN_EVERY_MS + 5, &policy()).await.unwrap().len(), 1);

    // PostgreSQL: a claim that turns a row down leaves no floor. The row is the next claim's,
    // although a newer row lies past the floor before. (SQLite asks `allow` only of rows of
    // webhooks with limits; this one has none.)
    if backend == Backend::Postgres {
        put_back(order[0].clone()).await;
        publish(&cp, "task.completed").await;
        let refused = order[0].clone();
        let filter = Filter { allow: Some(Box::new(move |d, _| d.id != refused)), ..Default::default() };
        // Time to read from the start, where the row is.
        let at = now + 3 * FULL_SCAN_EVERY_MS;
        let turned_down = store.claim_where("default", "agent-1", 1, at, &policy(), filter).await.unwrap();
        assert!(turned_down.is_empty(), "its webhook is left out once a row of it is turned down");
        let next = ids(store.claim("default", "agent-1", 1, at + 1, &policy()).await.unwrap());
        assert_eq!(next, [order[0].clone()]);
    }
    conn.close().await.ok();
    cp.stop().await;
}

async fn results_are_fenced_and_final(backend: Backend) {
    let (cp, db, store) = setup(backend).await;
    hook(&cp, webhook("a", "https://example.com/hook", &["*"])).await;
    publish(&cp, "task.completed").await;
    let now = t0();
    let c = store.claim("default", "agent-1", 1, now, &policy()).await.unwrap().remove(0);

    let forged = AttemptReport { lease_id: "lse_forged".into(), ..report(&c, 200, now) };
    assert_eq!(store.record_results(vec![forged], now, &policy()).await.unwrap(), [Applied::Stale]);
    assert_eq!(row(&db, &c.delivery.id).await.status, delivery::status::IN_FLIGHT, "a stale result changes nothing");

    let applied = store.record_results(vec![report(&c, 204, now + 5)], now + 5, &policy()).await.unwrap();
    assert_eq!(applied, [Applied::Succeeded]);
    let done = row(&db, &c.delivery.id).await;
    assert_eq!(done.status, delivery::status::SUCCEEDED);
    assert_eq!(done.attempt_count, 1);
    assert!(done.lease_id.is_none());

    // The same lease reporting again (a duplicate, or a late failure) cannot undo success.
    let late = store.record_results(vec![report(&c, 500, now + 9)], now + 9, &policy()).await.unwrap();
    assert_eq!(late, [Applied::Stale]);
    assert_eq!(row(&db, &c.delivery.id).await.status, delivery::status::SUCCEEDED, "final states stay final");
    let logged = attempts(&db, &c.delivery.id).await;
    assert_eq!(logged.len(), 3, "every report is logged");
    assert_eq!(logged.iter().filter(|a| a.stale).count(), 2);
    let real = logged.iter().find(|a| !a.stale).unwrap();
    assert_eq!((real.number, real.response_status, real.duration_ms), (1, 204, 12));
    assert_eq!(real.response_body.len(), 16, "bodies are truncated to the limit");
    cp.stop().await;
}

/// One batch mixing what agents report: successes with two status codes (settled together, one
/// statement per status code), a repeat of one of them, a forged lease reported before the real
/// one, real leases reported under another delivery's id (two deliveries with each other's
/// leases, and a settled delivery with another's), and a failure. Each report is applied in
/// order, each delivery is settled once and only by its own lease, and every report is logged.
async fn one_batch_settles_each_report_in_order(backend: Backend) {
    let (cp, db, store) = setup(backend).await;
    hook(&cp, webhook("a", "https://example.com/hook", &["*"])).await;
    for _ in 0..6 {
        publish(&cp, "task.completed").await;
    }
    let now = t0();
    let claimed = store.claim("default", "agent-1", 6, now, &policy()).await.unwrap();
    let [a, b, c, d, e, f] = &claimed[..] else { panic!("six claims: {claimed:?}") };
    let crossed = |x: &Claimed, y: &Claimed| AttemptReport { lease_id: y.lease_id.clone(), ..report(x, 200, now) };
    let forged_d = AttemptReport { lease_id: "lse_forged".into(), ..report(d, 200, now) };
    let swapped = AttemptReport { lease_id: a.lease_id.clone(), ..report(b, 200, now) };
    let batch = vec![
        forged_d,
        report(a, 200, now),
        report(b, 204, now),
        report(d, 200, now),
        report(a, 200, now),
        swapped,
        crossed(e, f),
        crossed(f, e),
        report(c, 500, now),
    ];
    let applied = store.record_results(batch, now, &policy()).await.unwrap();
    use Applied::*;
    assert_eq!(applied, [Stale, Succeeded, Succeeded, Succeeded, Stale, Stale, Stale, Stale, Retry { at: now + MIN }]);
    for x in [e, f] {
        let untouched = row(&db, &x.delivery.id).await;
        assert_eq!(untouched.status, delivery::status::IN_FLIGHT, "another delivery's lease settles nothing");
        assert_eq!(untouched.lease_id.as_deref(), Some(x.lease_id.as_str()));
    }
    for (x, code) in [(a, 200), (b, 204), (d, 200)] {
        let done = row(&db, &x.delivery.id).await;
        assert_eq!((done.status, done.attempt_count, done.last_status), (delivery::status::SUCCEEDED, 1, Some(code)));
        assert!(done.lease_id.is_none() && done.lease_agent.is_none() && done.lease_expires_at.is_none());
        assert!(done.last_error.is_none());
        let logged = attempts(&db, &x.delivery.id).await;
        assert_eq!(logged.len(), 2, "the real attempt and the stale one are both logged");
        let real: Vec<_> = logged.iter().filter(|x| !x.stale).collect();
        assert_eq!(real.len(), 1, "settled once");
        assert_eq!((real[0].number, real[0].response_status), (1, code));
        assert_eq!(real[0].workspace_id, x.delivery.workspace_id);
    }
    let retried = row(&db, &c.delivery.id).await;
    assert_eq!((retried.status, retried.attempt_count), (delivery::status::PENDING, 1));
    assert_eq!(retried.next_attempt_at, now + MIN);
    assert_eq!(attempts(&db, &c.delivery.id).await.len(), 1);
    cp.stop().await;
}

async fn failures_follow_the_schedule_then_notify_once(backend: Backend) {
    let (cp, db, store) = setup(backend).await;
    let failing = hook(&cp, webhook("failing", "https://a.example.com/hook", &["*"])).await;
    let notify = hook(&cp, webhook("notify", "https://b.example.com/hook", &["webhook.delivery.failed"])).await;
    hook(&cp, webhook("star", "https://c.example.com/hook", &["*"])).await;
    let e = publish(&cp, "incident.created").await;
    let target = e.deliveries.iter().find(|d| d.webhook_id == failing.id).unwrap().id.clone();
    let other_star = e.deliveries.iter().find(|d| d.webhook_id != failing.id).unwrap().id.clone();

    // Attempt 1 is due at once; the other `*` webhook's delivery succeeds and is out of the way.
    let mut now = t0();
    let claimed = store.claim("default", "agent-1", 10, now, &policy()).await.unwrap();
    assert_eq!(claimed.len(), 2);
    let other = claimed.iter().find(|c| c.delivery.id == other_star).unwrap();
    store.record_results(vec![report(other, 200, now)], now, &policy()).await.unwrap();
    let mut c = claimed.into_iter().find(|c| c.delivery.id == target).unwrap();
    let delays = [MIN, 5 * MIN, 30 * MIN, 120 * MIN, 480 * MIN];
    for n in 1..=6u32 {
        assert_eq!(c.attempt, n);
        let applied = store.record_results(vec![report(&c, 500, now)], now, &policy()).await.unwrap();
        if n == 6 {
            assert_eq!(applied, [Applied::Failed]);
            break;
        }
        let due = now + delays[n as usize - 1];
        assert_eq!(applied, [Applied::Retry { at: due }], "attempt {n}");
        assert!(
            store.claim("default", "agent-1", 10, due - 1, &policy()).await.unwrap().is_empty(),
            "attempt {} is not due before the schedule allows",
            n + 1
        );
        now = due;
        c = store.claim("default", "agent-1", 10, now, &policy()).await.unwrap().pop().expect("due on schedule");
    }
    let failed = row(&db, &target).await;
    assert_eq!((failed.status, failed.attempt_count), (delivery::status::FAILED, 6));
    assert_eq!(attempts(&db, &target).await.len(), 6);

    // Exactly one operational event, delivered only to the explicit subscriber.
    let conn = db.connect().await;
    let ops =
        event::Entity::find().filter(event::Column::EventType.eq("webhook.delivery.failed")).all(&conn).await.unwrap();
    assert_eq!(ops.len(), 1);
    let data: serde_json::Value = serde_json::from_str(&ops[0].data).unwrap();
    assert_eq!(data["delivery_id"], target.as_str());
    assert_eq!(data["webhook_name"], "failing");
    assert_eq!(data["attempts"], 6);
    assert_eq!(data["last_status"], 500);
    let op_rows = delivery::Entity::find().filter(delivery::Column::EventId.eq(&ops[0].id)).all(&conn).await.unwrap();
    assert_eq!(op_rows.len(), 1);
    assert_eq!(op_rows[0].webhook_id, notify.id, "never to `*`, never to the failing webhook");

    // The notification webhook fails every attempt too: still exactly one operational event.
    let op_delivery = op_rows[0].id.clone();
    let mut due = now;
    loop {
        let claimed = store.claim("default", "agent-1", 10, due, &policy()).await.unwrap();
        let Some(c) = claimed.into_iter().find(|c| c.delivery.id == op_delivery) else { break };
        match store.record_results(vec![report(&c, 503, due)], due, &policy()).await.unwrap()[0] {
            Applied::Retry { at } => due = at,
            Applied::Failed => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(row(&db, &op_delivery).await.status, delivery::status::FAILED);
    let ops =
        event::Entity::find().filter(event::Column::EventType.eq("webhook.delivery.failed")).all(&conn).await.unwrap();
    assert_eq!(ops.len(), 1, "a failed webhook.* delivery publishes nothing");
    conn.close().await.ok();
    cp.stop().await;
}

async fn lost_leases_cost_no_attempt_until_the_fourth(backend: Backend) {
    let (cp, db, store) = setup(backend).await;
    hook(&cp, webhook("a", "https://example.com/hook", &["*"])).await;
    let e = publish(&cp, "task.failed").await;
    let id = e.deliveries[0].id.clone();
    let mut now = t0();
    let first = store.claim("default", "agent-1", 1, now, &policy()).await.unwrap().remove(0);
    assert_eq!(
        store.reclaim_leases(None, first.lease_expires_at - 1, &policy()).await.unwrap().leases.len(),
        0,
        "not yet expired"
    );
    for lost in 1..=3 {
        let c = store.claim("default", "agent-1", 1, now, &policy()).await.unwrap();
        let c = if lost == 1 { first.clone() } else { c.into_iter().next().expect("due again at once") };
        now = c.lease_expires_at + 1;
        assert_eq!(store.reclaim_leases(None, now, &policy()).await.unwrap().leases.len(), 1);
        let d = row(&db, &id).await;
        assert_eq!(
            (d.status, d.attempt_count, d.lost_leases),
            (delivery::status::PENDING, 0, lost),
            "loss {lost} is free"
        );
        assert_eq!(d.next_attempt_at, now, "re-dispatched at once");
        // A result for the expired lease changes nothing.
        assert_eq!(store.record_results(vec![report(&c, 200, now)], now, &policy()).await.unwrap(), [Applied::Stale]);
        assert_eq!(row(&db, &id).await.status, delivery::status::PENDING);
    }
    // The fourth loss in a row counts as a failed attempt, through the agent-disconnect path.
    let c = store.claim("default", "agent-9", 1, now, &policy()).await.unwrap().remove(0);
    let reclaimed = store.reclaim_leases(Some("agent-9"), now, &policy()).await.unwrap();
    assert_eq!(reclaimed.leases.len(), 1);
    assert_eq!(reclaimed.applied, [Applied::Retry { at: now + MIN }], "the lost-lease attempt is reported");
    let d = row(&db, &id).await;
    assert_eq!((d.status, d.attempt_count, d.lost_leases), (delivery::status::PENDING, 1, 0));
    assert_eq!(d.next_attempt_at, now + MIN, "scheduled like any failed attempt");
    let logged = attempts(&db, &id).await;
    assert_eq!(logged.len(), 4, "three stale results and the lease_lost attempt");
    let lease_lost = logged.iter().find(|a| !a.stale).unwrap();
    assert_eq!(lease_lost.error_kind, ErrorKind::LeaseLost as i32);
    assert_eq!(lease_lost.agent_id, "agent-9");
    let _ = c;
    cp.stop().await;
}

async fn retry_after_and_pause(backend: Backend) {
    let (cp, db, store) = setup(backend).await;
    let w = hook(&cp, webhook("a", "https://example.com/hook", &["*"])).await;
    publish(&cp, "task.failed").await;
    let now = t0();
    let c = store.claim("default", "agent-1", 1, now, &policy()).await.unwrap().remove(0);
    let busy = AttemptReport { retry_after_ms: Some(10 * MIN), ..report(&c, 429, now) };
    assert_eq!(
        store.record_results(vec![busy], now, &policy()).await.unwrap(),
        [Applied::Retry { at: now + 10 * MIN }]
    );
    // Drained before sending: released at once, no attempt used.
    let later = now + 10 * MIN;
    let c = store.claim("default", "agent-1", 1, later, &policy()).await.unwrap().remove(0);
    assert_eq!(c.attempt, 2);
    let drained = AttemptReport { not_sent: true, ..report(&c, 0, later) };
    assert_eq!(store.record_results(vec![drained], later, &policy()).await.unwrap(), [Applied::Released]);
    let d = row(&db, &c.delivery.id).await;
    assert_eq!((d.status, d.attempt_count, d.lost_leases), (delivery::status::PENDING, 1, 0));
    // Pausing while in flight: the attempt finishes and is recorded; its retry waits, parked.
    let c = store.claim("default", "agent-1", 1, later, &policy()).await.unwrap().remove(0);
    let change = proto::Webhook { id: w.id.clone(), active: Some(false), ..Default::default() };
    cp.webhooks()
        .update_webhook(proto::UpdateWebhookRequest {
            webhook: Some(change),
            update_mask: Some(prost_types::FieldMask { paths: vec!["active".into()] }),
        })
        .await
        .unwrap();
    store.record_results(vec![report(&c, 500, later)], later, &policy()).await.unwrap();
    let d = row(&db, &c.delivery.id).await;
    assert_eq!((d.status, d.attempt_count), (delivery::status::PARKED, 2));
    assert!(store.claim("default", "agent-1", 10, later + 24 * 60 * MIN, &policy()).await.unwrap().is_empty());
    cp.stop().await;
}

/// Pausing parks a webhook's pending rows, re-activating releases them, a new zone moves its open
/// rows and deletion cancels them: rows in flight included, finished rows and other webhooks'
/// rows untouched. (The statements find those rows through the partial index of each status;
/// `queue_reads_use_their_partial_indexes` checks the plans.)
async fn a_webhooks_open_rows_follow_its_pause_zone_and_deletion(backend: Backend) {
    let (cp, db, store) = setup(backend).await;
    let in_eu = |name: &str, types: &[&str]| {
        let mut w = webhook(name, "https://example.com/hook", types);
        w.zone = "eu".into();
        w
    };
    let a = hook(&cp, in_eu("a", &["incident.*"])).await;
    let b = hook(&cp, in_eu("b", &["task.*"])).await;
    let mut rows_of_a = Vec::new();
    for _ in 0..4 {
        rows_of_a.push(publish(&cp, "incident.created").await.deliveries[0].id.clone());
    }
    let row_of_b = publish(&cp, "task.started").await.deliveries[0].id.clone();
    // The oldest of a's rows goes in flight; the newest is finished, as history is.
    let claimed = store.claim("eu", "agent-1", 1, t0(), &policy()).await.unwrap();
    assert_eq!(claimed.iter().map(|c| &c.delivery.id).collect::<Vec<_>>(), [&rows_of_a[0]]);
    let conn = db.connect().await;
    let finish = Statement::from_sql_and_values(
        conn.get_database_backend(),
        match backend {
            Backend::Sqlite => "UPDATE deliveries SET status = 3 WHERE id = ?",
            Backend::Postgres => "UPDATE deliveries SET status = 3 WHERE id = $1",
        },
        [rows_of_a[3].clone().into()],
    );
    conn.execute_raw(finish).await.unwrap();
    conn.close().await.ok();
    let states = |ids: Vec<String>| {
        let db = &db;
        async move {
            let mut out = Vec::new();
            for id in ids {
                let d = row(db, &id).await;
                out.push((d.status, d.zone));
            }
            out
        }
    };
    let all = || {
        let mut ids = rows_of_a.clone();
        ids.push(row_of_b.clone());
        ids
    };
    let update = |mask: &str, change: proto::Webhook| {
        let request = proto::UpdateWebhookRequest {
            webhook: Some(proto::Webhook { id: a.id.clone(), ..change }),
            update_mask: Some(prost_types::FieldMask { paths: vec![mask.into()] }),
        };
        let mut webhooks = cp.webhooks();
        async move { webhooks.update_webhook(request).await.unwrap() }
    };
    use delivery::status::{CANCELLED, IN_FLIGHT, PARKED, PENDING, SUCCEEDED};
    let eu = || "eu".to_owned();
    let us = || "us".to_owned();
    update("active", proto::Webhook { active: Some(false), ..Default::default() }).await;
    assert_eq!(
        states(all()).await,
        [(IN_FLIGHT, eu()), (PARKED, eu()), (PARKED, eu()), (SUCCEEDED, eu()), (PENDING, eu())],
        "paused"
    );
    update("zone", proto::Webhook { zone: "us".into(), ..Default::default() }).await;
    assert_eq!(
        states(all()).await,
        [(IN_FLIGHT, us()), (PARKED, us()), (PARKED, us()), (SUCCEEDED, eu()), (PENDING, eu())],
        "moved to another zone"
    );
    // A finished row reopened after the zone change queues in the webhook's zone now, parked.
    let replay = proto::ReplayWebhookRequest {
        webhook_id: a.id.clone(),
        created_after: Some(prost_types::Timestamp { seconds: 0, nanos: 0 }),
        created_before: None,
        include_all: true,
    };
    let mut deliveries = cp.deliveries_as(Some(&cp.api_key));
    assert_eq!(deliveries.replay_webhook(replay).await.unwrap().into_inner().queued, 1);
    assert_eq!(
        states(all()).await,
        [(IN_FLIGHT, us()), (PARKED, us()), (PARKED, us()), (PARKED, us()), (PENDING, eu())],
        "replayed"
    );
    update("active", proto::Webhook { active: Some(true), ..Default::default() }).await;
    assert_eq!(
        states(all()).await,
        [(IN_FLIGHT, us()), (PENDING, us()), (PENDING, us()), (PENDING, us()), (PENDING, eu())],
        "re-activated"
    );
    let deleted = cp.webhooks().delete_webhook(proto::DeleteWebhookRequest { id: a.id.clone() }).await.unwrap();
    assert_eq!(deleted.into_inner().cancelled_deliveries, 4);
    assert_eq!(
        states(all()).await,
        [(CANCELLED, us()), (CANCELLED, us()), (CANCELLED, us()), (CANCELLED, us()), (PENDING, eu())],
        "deleted"
    );
    assert_eq!(row(&db, &row_of_b).await.webhook_id, b.id);
    cp.stop().await;
}

/// Retries and replays before migration 9 reopened a finished delivery in the zone it was made
/// in, even after its webhook had moved; what finds a webhook's open rows now looks in its zone.
/// The migration moves such rows (here made by hand, and the migration run again) into it.
async fn migration_9_moves_open_rows_into_their_webhooks_zone(backend: Backend) {
    let (cp, db, _store) = setup(backend).await;
    let mut w = webhook("moved", "https://example.com/hook", &["incident.*"]);
    w.zone = "us".into();
    hook(&cp, w).await;
    let open = publish(&cp, "incident.created").await.deliveries[0].id.clone();
    let finished = publish(&cp, "incident.created").await.deliveries[0].id.clone();
    let conn = db.connect().await;
    let sql = |text: &str| Statement::from_string(conn.get_database_backend(), text);
    for (status, id) in [(1, &open), (3, &finished)] {
        let set = format!("UPDATE deliveries SET zone = 'eu', status = {status} WHERE id = '{id}'");
        conn.execute_raw(sql(&set)).await.unwrap();
    }
    let undo = "DELETE FROM seaql_migrations WHERE version = 'm20261130_000009_webhook_index_without_status'";
    conn.execute_raw(sql(undo)).await.unwrap();
    herald_control_plane::db::migrate(&conn).await.unwrap();
    conn.close().await.ok();
    assert_eq!(row(&db, &open).await.zone, "us", "an open row moves into its webhook's zone");
    assert_eq!(row(&db, &finished).await.zone, "eu", "a finished row stays where it was sent");
    cp.stop().await;
}

/// The claim and the lease reclaims read the small partial indexes of migration 7, which hold
/// only pending or only in-flight rows, rather than scanning `deliveries`. The plans are asked
/// of each database for the very statements the queue builds; on PostgreSQL with sequential
/// scans priced out, since an empty table would otherwise be scanned whatever its indexes.
async fn queue_reads_use_their_partial_indexes(backend: Backend) {
    use herald_control_plane::store::deliveries::replay_update;
    use herald_control_plane::store::queue::{
        claim_unlimited_sql, due_rows, leased_rows, past_floor, settle_successes_sql, status_is,
    };
    use herald_control_plane::store::webhooks::open_rows_updates;
    let db = TestDb::new(backend).await;
    let setup = db.connect().await;
    herald_control_plane::db::migrate(&setup).await.unwrap();
    setup.close().await.ok();
    // Asked on connections opened after the migrations: SQLite plans an `EXPLAIN` with the schema
    // its connection last read, without checking it first (a statement that runs would notice a
    // change and be planned again), so a pooled connection opened before migration 7 explained
    // plans with the indexes migration 7 drops.
    let conn = db.connect().await;
    let now = t0();
    let db_backend = conn.get_database_backend();
    let reads = [
        ("claim page", due_rows("eu-west", now).limit(256), "deliveries_due"),
        (
            "claim page past the floor",
            due_rows("eu-west", now).filter(past_floor(db_backend, now - 5, "dlv_x")).limit(256),
            "deliveries_due",
        ),
        ("expired leases", leased_rows(None, now).limit(10_000), "deliveries_leased"),
        ("an agent's leases", leased_rows(Some("agent-1@7"), now).limit(10_000), "deliveries_leased"),
        ("paused count", delivery::Entity::find().filter(status_is(delivery::status::PARKED)), "deliveries_parked"),
    ];
    let mut statements: Vec<(&str, Statement, &str)> =
        reads.into_iter().map(|(what, query, index)| (what, query.build(db_backend), index)).collect();
    // SQLite's one-statement claim of webhooks without limits reads its rows off the same index.
    if backend == Backend::Sqlite {
        let values: [sea_orm::Value; 7] = [
            "eu-west".into(),
            now.into(),
            256_i64.into(),
            "lse_x.".into(),
            "agent-1@7".into(),
            (now + 10_000).into(),
            now.into(),
        ];
        let claim = Statement::from_sql_and_values(db_backend, claim_unlimited_sql(), values);
        statements.push(("one-statement claim", claim, "deliveries_due"));
    }
    // Successes are settled by primary key alone, never through `deliveries_leased`, whose dead
    // entries (settled rows, until VACUUM) a bitmap of it would read too.
    let pairs = 300;
    let mut values: Vec<sea_orm::Value> = vec![200_i32.into(), now.into()];
    values.extend((0..pairs).map(|i| format!("dlv_{i}").into()));
    values.extend((0..pairs).map(|i| format!("lse_x.dlv_{i}").into()));
    let settle = Statement::from_sql_and_values(db_backend, settle_successes_sql(db_backend, pairs), values);
    let primary_key = match backend {
        Backend::Sqlite => "sqlite_autoindex_deliveries_1",
        Backend::Postgres => "deliveries_pkey",
    };
    statements.push(("settling successes", settle, primary_key));
    // On SQLite a webhook's open rows (pausing, re-activating, a new zone, deletion) are found
    // through the partial index of their status, not through every delivery the webhook had
    // (`deliveries_by_webhook` holds no status there).
    if backend == Backend::Sqlite {
        let update = || {
            delivery::Entity::update_many().col_expr(delivery::Column::UpdatedAt, sea_orm::sea_query::Expr::value(now))
        };
        let open = delivery::status::OPEN;
        let updates = open_rows_updates(db_backend, update, "wh_x", "eu-west", &open);
        let indexes = ["deliveries_due", "deliveries_leased", "deliveries_parked"];
        assert_eq!(open, [delivery::status::PENDING, delivery::status::IN_FLIGHT, delivery::status::PARKED]);
        statements.extend(
            updates.into_iter().zip(indexes).map(|(statement, index)| ("a webhook's open rows", statement, index)),
        );
    }
    // A replay reads the webhook's failed rows (on SQLite off a partial index of failed rows,
    // not every delivery the webhook had); replaying every finished row reads the webhook's.
    for (include_all, index) in [(false, "deliveries_failed"), (true, "deliveries_by_webhook")] {
        let index = if backend == Backend::Postgres { "deliveries_by_webhook" } else { index };
        let reopen =
            delivery::Entity::update_many().col_expr(delivery::Column::UpdatedAt, sea_orm::sea_query::Expr::value(now));
        let replay = replay_update(db_backend, reopen, "wh_x", now - 60_000, now, include_all);
        statements.push((if include_all { "replaying all" } else { "replaying failures" }, replay, index));
    }
    let txn = conn.begin().await.unwrap();
    if backend == Backend::Postgres {
        txn.execute_unprepared("SET LOCAL enable_seqscan = off").await.unwrap();
    }
    for (what, stmt, index) in statements {
        let explain = match backend {
            Backend::Sqlite => "EXPLAIN QUERY PLAN",
            Backend::Postgres => "EXPLAIN",
        };
        let values = stmt.values.map(|v| v.0).unwrap_or_default();
        let plan = Statement::from_sql_and_values(stmt.db_backend, format!("{explain} {}", stmt.sql), values);
        let rows = txn.query_all_raw(plan).await.unwrap();
        let column = if backend == Backend::Sqlite { 3 } else { 0 };
        let plan: Vec<String> = rows.iter().map(|r| r.try_get_by_index::<String>(column).unwrap()).collect();
        let plan = plan.join("\n");
        assert!(plan.contains(index), "{what}: expected a plan using {index}, got:\n{plan}");
        if what == "claim page past the floor" && backend == Backend::Postgres {
            // Read from the floor on, not filtered row by row from the start of the index.
            let starts_at_floor =
                |l: &str| l.contains("Index Cond") && l.contains("ROW(next_attempt_at, (id)::text) > ROW(");
            assert!(
                plan.lines().any(starts_at_floor),
                "{what}: expected the floor in the index condition, got:\n{plan}"
            );
        }
        if what == "settling successes" {
            assert!(!plan.contains("deliveries_leased"), "{what}: expected the primary key alone, got:\n{plan}");
        }
        let full_scan = |l: &str| l.trim() == "SCAN deliveries" || l.contains("Seq Scan on deliveries");
        assert!(!plan.lines().any(full_scan), "{what}: expected no scan of the whole table, got:\n{plan}");
    }
    txn.rollback().await.unwrap();
    conn.close().await.ok();
}

/// Events `from..to` of `workspace`, ids `e-<n>`, written straight to the table.
async fn insert_events(conn: &impl ConnectionTrait, workspace: &str, from: usize, to: usize) {
    let rows: Vec<event::ActiveModel> = (from..to)
        .map(|n| {
            event::ActiveModel::from(event::Model {
                workspace_id: workspace.to_owned(),
                id: format!("e-{n}"),
                event_type: "task.failed".into(),
                timestamp: "2026-11-28T00:00:00Z".into(),
                timestamp_supplied: false,
                data: r#"{"n":1}"#.into(),
                test: false,
                created_at: n as i64,
                trace_context: None,
            })
        })
        .collect();
    for chunk in rows.chunks(1000) {
        event::Entity::insert_many(chunk.to_vec()).exec_without_returning(conn).await.unwrap();
    }
}

/// Publishing (the idempotency check) and dispatch read events by the primary key
/// `(workspace_id, id)`. On PostgreSQL each id is one probe of `events_pkey` whatever the table's
/// statistics say: the statistics here are gathered at 300 events and the table then grows to
/// 20,300, the lag a fast-growing table has between two auto-analyzes. With `id IN (…)` such
/// statistics had PostgreSQL read every event of the workspace and test each against the list.
async fn event_lookups_probe_the_primary_key(backend: Backend) {
    use herald_control_plane::store::events::{events_by_id, postgres_events_by_id};
    let db = TestDb::new(backend).await;
    let conn = db.connect().await;
    herald_control_plane::db::migrate(&conn).await.unwrap();
    insert_events(&conn, "ws_a", 0, 300).await;
    insert_events(&conn, "ws_b", 0, 10).await;
    if backend == Backend::Postgres {
        conn.execute_unprepared("ANALYZE events").await.unwrap();
    }
    insert_events(&conn, "ws_a", 300, 20_300).await;

    let ids = |rows: Vec<event::Model>| {
        let mut ids: Vec<(String, String)> = rows.into_iter().map(|e| (e.workspace_id, e.id)).collect();
        ids.sort();
        ids
    };
    let pair = |w: &str, id: &str| (w.to_owned(), id.to_owned());
    // A repeated id comes back once.
    let wanted = ["e-5", "e-20000", "missing", "e-5"];
    assert_eq!(
        ids(events_by_id(&conn, "ws_a", &wanted).await.unwrap()),
        [pair("ws_a", "e-20000"), pair("ws_a", "e-5")]
    );
    assert_eq!(ids(events_by_id(&conn, "ws_b", &wanted).await.unwrap()), [pair("ws_b", "e-5")]);
    assert!(events_by_id(&conn, "ws_a", &[]).await.unwrap().is_empty());
    // Ids that need escaping in JSON travel intact.
    let odd = event::Model {
        workspace_id: "ws_c".into(),
        id: r#"a"b\c,{d}"#.into(),
        event_type: "task.failed".into(),
        timestamp: "2026-11-28T00:00:00Z".into(),
        timestamp_supplied: false,
        data: "{}".into(),
        test: false,
        created_at: 0,
        trace_context: None,
    };
    event::Entity::insert(event::ActiveModel::from(odd.clone())).exec_without_returning(&conn).await.unwrap();
    assert_eq!(events_by_id(&conn, "ws_c", &[odd.id.as_str()]).await.unwrap(), [odd]);

    if backend == Backend::Postgres {
        let many: Vec<String> = (0..1000).map(|n| format!("e-{}", n * 20)).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let stmt = postgres_events_by_id("ws_a", &many);
        let values = stmt.values.map(|v| v.0).unwrap_or_default();
        let explain = Statement::from_sql_and_values(stmt.db_backend, format!("EXPLAIN {}", stmt.sql), values);
        let rows = conn.query_all_raw(explain).await.unwrap();
        let plan: Vec<String> = rows.iter().map(|r| r.try_get_by_index::<String>(0).unwrap()).collect();
        let plan = plan.join("\n");
        assert!(plan.contains("Index Scan using events_pkey"), "expected a probe of events_pkey per id, got:\n{plan}");
        assert!(!plan.contains("Bitmap") && !plan.contains("Seq Scan on events"), "a scan of events:\n{plan}");
        assert_eq!(events_by_id(&conn, "ws_a", &many).await.unwrap().len(), 1000);
    }
    conn.close().await.ok();
}

/// `SHOW synchronous_commit`, read from inside the batch's own transaction.
fn postgres_level(
    txn: &sea_orm::DatabaseTransaction,
) -> futures::future::BoxFuture<'_, Result<String, herald_control_plane::store::StoreError>> {
    Box::pin(async move {
        let row = txn
            .query_one_raw(Statement::from_string(sea_orm::DbBackend::Postgres, "SHOW synchronous_commit"))
            .await?
            .expect("a row");
        row.try_get_by_index::<String>(0).map_err(|e| herald_control_plane::store::StoreError::Internal(e.to_string()))
    })
}

/// On PostgreSQL a writer keeps the sync level on its own session between batches (a relaxed
/// batch after a relaxed one sets nothing), and yet every batch commits at its own level: a
/// durable batch at the server's `synchronous_commit` (`on` here), a relaxed one at `off`,
/// whatever order they come in, and after the writer's connection was cut and opened again (the
/// new session starts at the server's level, whatever the writer set on the old one).
#[tokio::test]
async fn postgres_writers_commit_each_batch_at_its_own_sync_level() {
    use herald_control_plane::store::StoreError;
    use herald_control_plane::store::writer::{WRITE_TIMEOUT, Writer};
    let db = TestDb::new(Backend::Postgres).await;
    let writer = Writer::spawn(db.connect().await, WRITE_TIMEOUT);
    let level = async |durable: bool| {
        // A batch on a connection that was just cut fails once; the next opens a new one.
        for _ in 0..5 {
            let read =
                if durable { writer.write(postgres_level).await } else { writer.write_relaxed(postgres_level).await };
            if let Ok(level) = read {
                return level;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the writer did not recover its connection");
    };
    for durable in [true, false, false, true, true, false, true] {
        assert_eq!(level(durable).await, if durable { "on" } else { "off" }, "durable: {durable}");
    }
    for durable in [false, true] {
        // Leave the session at the level of the other kind, then cut it.
        level(!durable).await;
        let pid = writer
            .write_relaxed(|txn| {
                Box::pin(async move {
                    let row = txn
                        .query_one_raw(Statement::from_string(sea_orm::DbBackend::Postgres, "SELECT pg_backend_pid()"))
                        .await?
                        .expect("a row");
                    row.try_get_by_index::<i32>(0).map_err(|e| StoreError::Internal(e.to_string()))
                })
            })
            .await
            .unwrap();
        let admin = db.connect().await;
        admin
            .execute_unprepared(&format!("SELECT pg_terminate_backend({pid})"))
            .await
            .expect("terminate the writer's session");
        admin.close().await.ok();
        assert_eq!(
            level(durable).await,
            if durable { "on" } else { "off" },
            "after a reconnection, durable: {durable}"
        );
    }
}

/// A claim's size is asked of its `reserve` when the claim runs, not when it is asked for: credit
/// an agent gives back while the claim waits behind another write (here a result held up by a
/// row lock another session keeps) is used by this claim. A reserve of nothing leases nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_is_sized_by_its_reserve_when_it_runs() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let (cp, db, store) = setup(Backend::Postgres).await;
    let mut w = webhook("eu", "https://example.com/hook", &["incident.*"]);
    w.zone = "eu".into();
    hook(&cp, w).await;
    for _ in 0..6 {
        publish(&cp, "incident.created").await;
    }
    let now = t0();
    let first = store.claim("eu", "agent-1", 1, now, &policy()).await.unwrap().remove(0);
    // Another session locks the claimed row: the result for it waits in the dispatch writer.
    let conn = db.connect().await;
    let holder = conn.begin().await.unwrap();
    let lock = format!("SELECT id FROM deliveries WHERE id = '{}' FOR UPDATE", first.delivery.id);
    holder.execute_unprepared(&lock).await.unwrap();
    let pid = holder.query_one_raw(Statement::from_string(conn.get_database_backend(), "SELECT pg_backend_pid()"));
    let pid: i32 = pid.await.unwrap().unwrap().try_get_by_index(0).unwrap();
    let result = tokio::spawn({
        let (store, report) = (store.clone(), report(&first, 200, now));
        async move { store.record_results(vec![report], now, &policy()).await }
    });
    let blocked = format!("SELECT count(*) FROM pg_stat_activity WHERE {pid} = ANY(pg_blocking_pids(pid))");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n = conn.query_one_raw(Statement::from_string(conn.get_database_backend(), blocked.clone())).await;
        if n.unwrap().unwrap().try_get_by_index::<i64>(0).unwrap() > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the result never waited for the row");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The claim queues behind the held result, with no credit yet.
    let credit = Arc::new(AtomicU64::new(0));
    let asked = Arc::new(AtomicBool::new(false));
    let reserve = {
        let (credit, asked) = (credit.clone(), asked.clone());
        Box::new(move |limit: u64| {
            assert_eq!(limit, 10, "asked with the claim's limit");
            asked.store(true, Ordering::SeqCst);
            credit.load(Ordering::SeqCst).min(limit)
        })
    };
    let claim = tokio::spawn({
        let store = store.clone();
        let filter = Filter { reserve: Some(reserve), ..Default::default() };
        async move { store.claim_where("eu", "agent-2", 10, now, &policy(), filter).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!asked.load(Ordering::SeqCst), "the claim has not run: the writer is held");
    // Credit comes back while it waits.
    credit.store(3, Ordering::SeqCst);
    holder.rollback().await.unwrap();
    assert_eq!(result.await.unwrap().unwrap().len(), 1);
    let claimed = claim.await.unwrap().unwrap();
    assert!(asked.load(Ordering::SeqCst));
    assert_eq!(claimed.len(), 3, "the credit there was when the claim ran");
    let nothing = Filter { reserve: Some(Box::new(|_| 0)), ..Default::default() };
    assert!(store.claim_where("eu", "agent-2", 10, now, &policy(), nothing).await.unwrap().is_empty());
    assert_eq!(store.claim("eu", "agent-3", 10, now, &policy()).await.unwrap().len(), 2, "the rest, untouched");
    conn.close().await.ok();
    cp.stop().await;
}

/// On PostgreSQL every identifier column (every `varchar` of Herald's tables) compares bytewise,
/// `COLLATE "C"` (migration 10), so that the indexes on them never call the C library's
/// collation; free text keeps the database's default. A column added later without it would
/// be compared with the other identifiers in `C`, which its own index cannot serve.
#[tokio::test]
async fn postgres_identifiers_compare_bytewise() {
    use sea_orm_migration::MigratorTrait as _;
    let db = TestDb::new(Backend::Postgres).await;
    let conn = db.connect().await;
    herald_control_plane::db::migrate(&conn).await.unwrap();
    // (table, column, data type, collation) of every string column; "" for the default.
    let columns = async || -> Vec<[String; 4]> {
        let rows = conn
            .query_all_raw(Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT table_name::text, column_name::text, data_type::text, COALESCE(collation_name::text, '') \
                 FROM information_schema.columns WHERE table_schema = current_schema() \
                 AND table_name <> 'seaql_migrations' AND data_type IN ('character varying', 'text') \
                 ORDER BY 1, 2",
            ))
            .await
            .unwrap();
        rows.iter().map(|row| std::array::from_fn(|i| row.try_get_by_index::<String>(i).unwrap())).collect()
    };
    let check = |columns: &[[String; 4]], identifier_collation: &str| {
        let mut identifiers = 0;
        for [table, column, kind, collation] in columns {
            let expected = if kind == "character varying" { identifier_collation } else { "" };
            assert_eq!(collation, expected, "{table}.{column} ({kind})");
            identifiers += usize::from(kind == "character varying");
        }
        assert!(identifiers >= 30, "only {identifiers} identifier columns found");
        assert!(columns.len() > identifiers, "free-text columns are checked too");
    };
    check(&columns().await, "C");
    // Migration 10 undone (with the SQLite-only one after it) and done again, with a row in
    // `workspaces`: a table with rows is analyzed anew (its identifiers' statistics went with
    // their type), an empty one is left never analyzed.
    herald_control_plane::db::migration::Migrator::down(&conn, Some(2)).await.unwrap();
    check(&columns().await, "");
    conn.execute_unprepared("INSERT INTO workspaces (id, created_at) VALUES ('ws_analyzed', 0)").await.unwrap();
    herald_control_plane::db::migrate(&conn).await.unwrap();
    check(&columns().await, "C");
    let id_statistics = async |table: &str| {
        let sql = format!(
            "SELECT count(*) FROM pg_stats WHERE schemaname = current_schema() AND tablename = '{table}' AND attname = 'id'"
        );
        let row = conn.query_one_raw(Statement::from_string(sea_orm::DbBackend::Postgres, sql)).await.unwrap();
        row.unwrap().try_get_by_index::<i64>(0).unwrap()
    };
    assert_eq!(id_statistics("workspaces").await, 1, "workspaces analyzed");
    assert_eq!(id_statistics("deliveries").await, 0, "deliveries, empty, left as it was");
    conn.close().await.ok();
}

/// The hot paths' inserts (arrays per column on PostgreSQL, `VALUES` rows on SQLite) store every
/// value as given: NULL as NULL beside values in the same column, an empty string as an empty
/// string, quotes and non-ASCII text byte for byte, extreme integers, across more rows than one
/// statement holds.
async fn hot_path_inserts_store_every_value_as_given(backend: Backend) {
    use herald_control_plane::store::insert::insert_rows;
    let db = TestDb::new(backend).await;
    let conn = db.connect().await;
    herald_control_plane::db::migrate(&conn).await.unwrap();
    let text = ["", "it's \"quoted\"", "ünïcødé ✓", "NULL", "line\nbreak"];
    let rows: Vec<delivery::Model> = (0..10_050_usize)
        .map(|i| delivery::Model {
            id: format!("dlv_{i:08}"),
            workspace_id: "ws".to_owned(),
            event_id: format!("e{i}"),
            webhook_id: "wh".to_owned(),
            event_type: text[i % text.len()].to_owned(),
            zone: "default".to_owned(),
            status: (i % 6) as i16 + 1,
            test: i % 2 == 0,
            attempt_count: i as i32,
            lost_leases: if i == 1 { i32::MIN } else { 0 },
            next_attempt_at: if i == 2 { i64::MAX } else { i as i64 },
            lease_id: (i % 3 == 0).then(|| format!("lse_{i}")),
            lease_agent: (i % 3 == 1).then(|| text[i % text.len()].to_owned()),
            lease_expires_at: (i % 4 == 0).then_some(-(i as i64)),
            last_status: (i % 5 == 0).then_some(i as i32),
            last_error: (i % 2 == 1).then(|| text[(i / 2) % text.len()].to_owned()),
            created_at: i as i64,
            updated_at: i64::MIN,
            manual_from: (i % 7 == 0).then_some(i16::MAX),
        })
        .collect();
    let txn = conn.begin().await.unwrap();
    insert_rows::<delivery::Model, _>(&txn, &rows).await.unwrap();
    txn.commit().await.unwrap();
    let stored = delivery::Entity::find().order_by_asc(delivery::Column::Id).all(&conn).await.unwrap();
    assert_eq!(stored.len(), rows.len());
    for (stored, given) in stored.iter().zip(&rows) {
        assert_eq!(stored, given);
    }
    // A table with columns of other types, and a NULL in the first row only.
    let attempts: Vec<attempt::Model> = (0..3)
        .map(|i| attempt::Model {
            id: format!("att_{i}"),
            delivery_id: "dlv_00000000".to_owned(),
            workspace_id: "ws".to_owned(),
            number: i + 1,
            agent_id: "agent".to_owned(),
            zone: "default".to_owned(),
            started_at: 1,
            duration_ms: 2,
            request_headers: "{}".to_owned(),
            request_body: (i > 0).then(|| text[i as usize].to_owned()),
            response_status: 200,
            response_headers: String::new(),
            response_body: "ok".to_owned(),
            error_kind: 0,
            error_message: String::new(),
            stale: i == 2,
            manual: i == 1,
        })
        .collect();
    insert_rows::<attempt::Model, _>(&conn, &attempts).await.unwrap();
    let stored = attempt::Entity::find().order_by_asc(attempt::Column::Id).all(&conn).await.unwrap();
    assert_eq!(stored, attempts);
    // Statements of other shapes: a column the same in every row (bound once on PostgreSQL),
    // NULL in every row, the same but for one row, varying without a NULL; one row alone.
    let shaped = |i: usize| delivery::Model {
        id: format!("dlv_shape_{i:03}"),
        lease_id: None,
        lease_agent: Some("agent".to_owned()),
        lease_expires_at: (i == 2).then_some(7),
        last_status: Some(i as i32),
        last_error: Some("same".to_owned()),
        manual_from: (i != 1).then_some(3),
        ..rows[i].clone()
    };
    let batch: Vec<delivery::Model> = (0..3).map(shaped).collect();
    insert_rows::<delivery::Model, _>(&conn, &batch).await.unwrap();
    let alone = [delivery::Model { id: "dlv_shape_alone".to_owned(), ..shaped(0) }];
    insert_rows::<delivery::Model, _>(&conn, &alone).await.unwrap();
    let stored = delivery::Entity::find()
        .filter(delivery::Column::Id.starts_with("dlv_shape_"))
        .order_by_asc(delivery::Column::Id)
        .all(&conn)
        .await
        .unwrap();
    let given: Vec<&delivery::Model> = batch.iter().chain(&alone).collect();
    assert_eq!(stored.iter().collect::<Vec<_>>(), given);
    conn.close().await.ok();
}

/// Retention passes over old events kept for an open delivery (a paused webhook's backlog, a
/// zone no agent serves): with more of them than one transaction looks at, the final ones behind
/// them still go. (Before, each pass looked at the same oldest events again, found nothing to
/// delete, and stopped: nothing was pruned again.)
async fn retention_passes_over_events_kept_open(backend: Backend) {
    use sea_orm::sea_query::Expr;
    let (cp, db, store) = setup(backend).await;
    let mut waiting = webhook("unserved", "https://example.com/hook", &["incident.*"]);
    waiting.zone = "unserved".into();
    hook(&cp, waiting).await;
    hook(&cp, webhook("done", "https://example.com/done", &["task.*"])).await;
    let mut kept = Vec::new();
    for _ in 0..10 {
        kept.push(publish(&cp, "incident.created").await.id);
    }
    let mut finished = Vec::new();
    for _ in 0..3 {
        finished.push(publish(&cp, "task.completed").await.id);
    }
    let conn = db.connect().await;
    delivery::Entity::update_many()
        .col_expr(delivery::Column::Status, Expr::value(delivery::status::SUCCEEDED))
        .filter(delivery::Column::EventId.is_in(finished.clone()))
        .exec(&conn)
        .await
        .unwrap();
    // Two events a transaction, each looking at eight: the first eight are all kept.
    let stop = tokio_util::sync::CancellationToken::new();
    let pruned = store.prune_all(t0(), 2, Duration::ZERO, &stop).await.unwrap();
    assert_eq!(pruned, 3, "the final events behind the kept ones went");
    let mut left: Vec<String> = event::Entity::find().all(&conn).await.unwrap().into_iter().map(|e| e.id).collect();
    left.sort();
    kept.sort();
    assert_eq!(left, kept, "the events with an open delivery stay");
    let open = delivery::Entity::find().all(&conn).await.unwrap();
    assert_eq!(open.len(), 10);
    assert!(open.iter().all(|d| d.status == delivery::status::PENDING), "{open:?}");
    // A pass with nothing left to delete looks at every old event once and stops.
    assert_eq!(store.prune_all(t0(), 2, Duration::ZERO, &stop).await.unwrap(), 0);
    conn.close().await.ok();
    cp.stop().await;
}

/// On PostgreSQL the deliveries retention deletes are locked and looked at again, in chunks: a
/// transaction's 500 events with 140 webhooks each are 70,000 deliveries, past the 65,535
/// parameters one statement may bind (before, that one lock read failed, and since every pass
/// starts at the oldest events, nothing was pruned again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_events_of_a_wide_fan_out() {
    use sea_orm::PaginatorTrait as _;
    use sea_orm::sea_query::Expr;
    let (cp, db, store) = setup(Backend::Postgres).await;
    for i in 0..140 {
        hook(&cp, webhook(&format!("wide-{i}"), "https://example.com/hook", &["incident.*"])).await;
    }
    for _ in 0..5 {
        let batch = (0..100).map(|_| herald_tests::event("incident.created", "{}")).collect();
        cp.events().publish_events(proto::PublishEventsRequest { events: batch }).await.unwrap();
    }
    let conn = db.connect().await;
    delivery::Entity::update_many()
        .col_expr(delivery::Column::Status, Expr::value(delivery::status::SUCCEEDED))
        .exec(&conn)
        .await
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let pruned = store.prune_all(t0(), 500, Duration::ZERO, &stop).await.expect("the pass prunes");
    assert_eq!(pruned, 500);
    assert_eq!(delivery::Entity::find().count(&conn).await.unwrap(), 0);
    conn.close().await.ok();
    cp.stop().await;
}

/// The next `n` changes a watch hears, each within a deadline.
async fn changes(stream: &mut tonic::Streaming<proto::DeliveryChange>, n: usize) -> Vec<proto::Delivery> {
    let mut seen = Vec::new();
    while seen.len() < n {
        let change = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap_or_else(|_| panic!("a change within 10 s; heard {} of {n}: {seen:?}", seen.len()))
            .expect("the watch goes on")
            .expect("the watch stays open");
        seen.push(change.delivery.expect("a delivery"));
    }
    seen
}

/// `WatchDeliveries` hears what a pause, a re-activation, a replay and a deletion do to a
/// webhook's deliveries, row by row. (They were not heard at all: those paths changed many rows
/// at once and told no watcher.) Past `Changed::LISTED` rows at once, a watcher of that webhook,
/// or of every webhook, is told how many changed and to list, as one that fell behind is; a
/// watcher of another webhook goes on.
async fn watchers_hear_of_pauses_deletions_and_replays(backend: Backend) {
    use herald_control_plane::store::webhooks::Changed;
    use proto::DeliveryStatus::{Cancelled, Pending};
    let (cp, db) = start(backend).await;
    // No agent: deliveries stay open.
    let a = hook(&cp, webhook("a", "https://example.com/a", &["incident.*"])).await;
    let watch =
        |webhook_id: &str| proto::WatchDeliveriesRequest { webhook_id: webhook_id.into(), ..Default::default() };
    let mut all = cp.deliveries_as(Some(&cp.api_key)).watch_deliveries(watch("")).await.unwrap().into_inner();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(publish(&cp, "incident.created").await.deliveries[0].id.clone());
    }
    ids.sort();
    let sorted = |mut seen: Vec<proto::Delivery>| {
        seen.sort_by(|x, y| x.id.cmp(&y.id));
        seen
    };
    let published = sorted(changes(&mut all, 3).await);
    assert_eq!(published.iter().map(|d| &d.id).collect::<Vec<_>>(), ids.iter().collect::<Vec<_>>());

    let set_active = |active: bool| proto::UpdateWebhookRequest {
        webhook: Some(proto::Webhook { id: a.id.clone(), active: Some(active), ..Default::default() }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["active".into()] }),
    };
    cp.webhooks().update_webhook(set_active(false)).await.unwrap();
    let paused = sorted(changes(&mut all, 3).await);
    assert!(paused.iter().zip(&ids).all(|(d, id)| d.id == *id && d.paused && d.status == Pending as i32), "{paused:?}");
    cp.webhooks().update_webhook(set_active(true)).await.unwrap();
    let resumed = sorted(changes(&mut all, 3).await);
    assert!(resumed.iter().zip(&ids).all(|(d, id)| d.id == *id && !d.paused), "{resumed:?}");
    // A pause and a new zone in one update: each row heard in the new zone, paused.
    let moved = proto::UpdateWebhookRequest {
        webhook: Some(proto::Webhook {
            id: a.id.clone(),
            active: Some(false),
            zone: "elsewhere".into(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["active".into(), "zone".into()] }),
    };
    cp.webhooks().update_webhook(moved).await.unwrap();
    let moved = sorted(changes(&mut all, 3).await);
    assert!(moved.iter().zip(&ids).all(|(d, id)| d.id == *id && d.paused && d.zone == "elsewhere"), "{moved:?}");
    cp.webhooks().update_webhook(set_active(true)).await.unwrap();
    assert!(changes(&mut all, 3).await.iter().all(|d| !d.paused && d.zone == "elsewhere"));

    // A replay reopens the failed one.
    let conn = db.connect().await;
    delivery::Entity::update_many()
        .col_expr(delivery::Column::Status, sea_orm::sea_query::Expr::value(delivery::status::FAILED))
        .filter(delivery::Column::Id.eq(&ids[1]))
        .exec(&conn)
        .await
        .unwrap();
    conn.close().await.ok();
    let replay = proto::ReplayWebhookRequest {
        webhook_id: a.id.clone(),
        created_after: Some(prost_types::Timestamp { seconds: 0, nanos: 0 }),
        ..Default::default()
    };
    assert_eq!(cp.deliveries_as(Some(&cp.api_key)).replay_webhook(replay).await.unwrap().into_inner().queued, 1);
    let replayed = changes(&mut all, 1).await;
    assert_eq!((replayed[0].id.as_str(), replayed[0].status), (ids[1].as_str(), Pending as i32));

    let deleted = cp.webhooks().delete_webhook(proto::DeleteWebhookRequest { id: a.id.clone() }).await.unwrap();
    assert_eq!(deleted.into_inner().cancelled_deliveries, 3);
    let cancelled = sorted(changes(&mut all, 3).await);
    assert!(cancelled.iter().zip(&ids).all(|(d, id)| d.id == *id && d.status == Cancelled as i32), "{cancelled:?}");

    // More than a watch is sent one by one.
    let many = hook(&cp, webhook("many", "https://example.com/many", &["incident.*"])).await;
    let other = hook(&cp, webhook("other", "https://example.com/other", &["task.*"])).await;
    let mut of_many = cp.deliveries_as(Some(&cp.api_key)).watch_deliveries(watch(&many.id)).await.unwrap().into_inner();
    let mut of_other =
        cp.deliveries_as(Some(&cp.api_key)).watch_deliveries(watch(&other.id)).await.unwrap().into_inner();
    let count = Changed::LISTED + 1;
    for n in [count / 2, count - count / 2] {
        let events = (0..n).map(|_| herald_tests::event("incident.created", "{}")).collect();
        cp.events().publish_events(proto::PublishEventsRequest { events }).await.unwrap();
    }
    assert_eq!(changes(&mut all, count).await.len(), count);
    assert_eq!(changes(&mut of_many, count).await.len(), count);
    let deleted = cp.webhooks().delete_webhook(proto::DeleteWebhookRequest { id: many.id.clone() }).await.unwrap();
    assert_eq!(deleted.into_inner().cancelled_deliveries, count as u64);
    for stream in [&mut all, &mut of_many] {
        let told = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("told within 10 s");
        let status = told.expect_err("told to list");
        assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
        assert!(status.message().contains(&format!("{count} deliveries of webhook {}", many.id)), "{status:?}");
    }
    let e = publish(&cp, "task.started").await;
    let heard = changes(&mut of_other, 1).await;
    assert_eq!(heard[0].event_id, e.id, "the watch of another webhook goes on");
}
