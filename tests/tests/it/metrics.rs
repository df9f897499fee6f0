//! `/metrics` of the control plane and the agent, scraped while real deliveries succeed, fail,
//! wait, and lose their lease.

use std::collections::BTreeMap;
use std::time::Duration;

use herald_tests::procs::{AgentProcess, ControlPlaneProcess, signal};
use herald_tests::receiver::{Receiver, Reply};
use herald_tests::tls::TestCa;
use herald_tests::{Backend, TestDb, http_get, parse_metrics, webhook};

use herald_control_plane::db::entity::delivery;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

use crate::pipeline::{WAIT, create, publish};

async fn scrape(port: u16) -> BTreeMap<String, f64> {
    let (status, body) = http_get(port, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    parse_metrics(&body)
}

/// Scrapes until `ok` holds of the samples.
async fn scrape_until(port: u16, what: &str, ok: impl Fn(&BTreeMap<String, f64>) -> bool) -> BTreeMap<String, f64> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let m = scrape(port).await;
        if ok(&m) {
            return m;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {m:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_processes_export_what_happened() {
    let ca = TestCa::new();
    let db = TestDb::new(Backend::Sqlite).await;
    let cp = ControlPlaneProcess::start(&db.url, &["--retry-schedule", "0s,50ms", "--lease-grace", "300ms"]).await;
    let agent = AgentProcess::start(&cp.url(), "default", "agent-1", Some(&ca.path), &[]);
    cp.wait_agents(&["agent-1"]).await;
    let (ok, failing) = (Receiver::https(&ca).await, Receiver::https(&ca).await);
    failing.always(Reply::status(500));
    let good = create(&cp, webhook("good", &ok.url("/"), &["incident.created"])).await;
    let bad = create(&cp, webhook("bad", &failing.url("/"), &["incident.created"])).await;
    // Deliveries for a zone without agents wait: the queue and its oldest entry show them.
    let mut elsewhere = webhook("elsewhere", &ok.url("/nowhere"), &["incident.created"]);
    elsewhere.zone = "nowhere".into();
    create(&cp, elsewhere).await;

    for i in 0..3 {
        publish(&cp, "incident.created", &format!(r#"{{"n":{i}}}"#)).await;
    }
    // The `nowhere` deliveries stay pending; the other six settle.
    let deadline = tokio::time::Instant::now() + WAIT;
    let conn = db.connect().await;
    loop {
        let settled = delivery::Entity::find()
            .filter(delivery::Column::Status.is_in([delivery::status::SUCCEEDED, delivery::status::FAILED]))
            .all(&conn)
            .await
            .unwrap();
        if settled.len() == 6 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{settled:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    conn.close().await.ok();

    // The waiting deliveries are due: once a second has passed, the oldest one's age shows it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let m = scrape(cp.http_port).await;
    let at = |k: &str| m.get(k).copied().unwrap_or_else(|| panic!("no series {k} in {m:#?}"));
    assert_eq!(at("herald_events_published_total"), 3.0);
    assert_eq!(at(r#"herald_deliveries_total{outcome="succeeded"}"#), 3.0);
    assert_eq!(at(r#"herald_deliveries_total{outcome="retrying"}"#), 3.0, "the first of two attempts");
    assert_eq!(at(r#"herald_deliveries_total{outcome="failed"}"#), 3.0);
    assert_eq!(at(&format!(r#"herald_attempts_total{{webhook="{}",class="2xx"}}"#, good.id)), 3.0);
    assert_eq!(at(&format!(r#"herald_attempts_total{{webhook="{}",class="5xx"}}"#, bad.id)), 6.0);
    assert_eq!(at("herald_attempt_duration_seconds_count"), 9.0);
    assert_eq!(at(r#"herald_agents_connected{zone="default"}"#), 1.0);
    assert_eq!(at(r#"herald_queue_depth{status="pending"}"#), 3.0);
    assert_eq!(at(r#"herald_queue_depth{status="in_flight"}"#), 0.0, "an empty status shows as 0");
    assert_eq!(at(r#"herald_queue_depth{status="paused"}"#), 0.0);
    assert!(at("herald_oldest_pending_age_seconds") >= 1.0, "the nowhere deliveries have waited");
    assert_eq!(at(r#"herald_agents_connected{zone="nowhere"}"#), 0.0, "a zone without agents shows as 0");
    for (port, path, want) in [
        (cp.http_port, "/healthz", 200),
        (cp.http_port, "/readyz", 200),
        (agent.http_port, "/healthz", 200),
        (agent.http_port, "/readyz", 200),
    ] {
        assert_eq!(http_get(port, path).await.0, want, "{path} on {port}");
    }
    assert_eq!(at(r#"herald_leases_reclaimed_total{reason="expired"}"#), 0.0);

    let a = scrape(agent.http_port).await;
    let at = |k: &str| a.get(k).copied().unwrap_or_else(|| panic!("no series {k} in {a:#?}"));
    assert_eq!(at(r#"herald_agent_attempts_total{class="2xx"}"#), 3.0);
    assert_eq!(at(r#"herald_agent_attempts_total{class="5xx"}"#), 6.0);
    assert_eq!(at("herald_agent_attempt_duration_seconds_count"), 9.0);
    assert_eq!(at("herald_agent_connected"), 1.0);
    assert_eq!(at("herald_agent_in_flight"), 0.0);

    // An agent that freezes mid-attempt: its lease expires and is counted.
    let slow = Receiver::https(&ca).await;
    slow.always(Reply::Hang(Duration::from_secs(60)));
    let mut hook = webhook("slow", &slow.url("/"), &["task.failed"]);
    hook.timeout = Some(prost_types::Duration { seconds: 0, nanos: 500_000_000 });
    create(&cp, hook).await;
    publish(&cp, "task.failed", "{}").await;
    slow.wait_for(1, WAIT).await;
    let frozen = scrape(agent.http_port).await;
    assert_eq!(frozen["herald_agent_in_flight"], 1.0);
    signal(&agent.child, "STOP");
    scrape_until(cp.http_port, "the frozen agent's lease expires", |m| {
        m.get(r#"herald_leases_reclaimed_total{reason="expired"}"#).is_some_and(|v| *v >= 1.0)
    })
    .await;
    signal(&agent.child, "KILL");
    scrape_until(cp.http_port, "the killed agent is no longer counted", |m| {
        m.get(r#"herald_agents_connected{zone="default"}"#) == Some(&0.0)
    })
    .await;
}
