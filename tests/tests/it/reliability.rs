//! Operating guarantees: a SQLite database serves one control plane at a time (while admin
//! commands work beside it), and retention prunes old events in the background while deliveries
//! go on, never touching an event whose delivery is still open.

use std::collections::BTreeSet;
use std::time::Duration;

use herald_control_plane::db::entity::{attempt, delivery, event};
use herald_shared::proto;
use herald_tests::procs::{AgentProcess, ControlPlaneProcess, SECRET_KEY};
use herald_tests::receiver::Receiver;
use herald_tests::tls::TestCa;
use herald_tests::{Backend, TestDb, bin, webhook};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};

use crate::pipeline::{WAIT, create, publish};

both_databases!(retention_prunes_old_events_while_deliveries_go_on);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_serves_one_control_plane_but_admin_commands_work_beside_it() {
    let db = TestDb::new(Backend::Sqlite).await;
    let cp = ControlPlaneProcess::start(&db.url, &[]).await;

    let second = tokio::process::Command::new(bin("herald"))
        .args(["serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--database-url", &db.url])
        .args(["--secret-key", SECRET_KEY])
        .output();
    let second = tokio::time::timeout(WAIT, second).await.expect("the second control plane exits").unwrap();
    assert!(!second.status.success());
    let why = String::from_utf8_lossy(&second.stderr);
    assert!(why.contains("another control plane is already serving"), "a clear reason: {why}");

    let migrate = tokio::process::Command::new(bin("herald")).args(["migrate", "--database-url", &db.url]).output();
    assert!(migrate.await.unwrap().status.success(), "migrate works beside the running control plane");
    let keys = tokio::process::Command::new(bin("herald"))
        .args(["keys", "create", "--workspace", "ws_beside", "--scope", "admin", "--database-url", &db.url])
        .output()
        .await
        .unwrap();
    assert!(keys.status.success(), "{}", String::from_utf8_lossy(&keys.stderr));
    let key = String::from_utf8_lossy(&keys.stdout).trim().to_owned();
    // The running control plane accepts the key made beside it.
    let listed = cp.webhooks_as(&key).list_webhooks(proto::ListWebhooksRequest::default()).await;
    assert!(listed.is_ok(), "{listed:?}");
}

async fn retention_prunes_old_events_while_deliveries_go_on(backend: Backend) {
    let ca = TestCa::new();
    let db = TestDb::new(backend).await;
    let cp = ControlPlaneProcess::start(&db.url, &["--retention", "3s"]).await;
    let _agent = AgentProcess::start(&cp.url(), "default", "agent-1", Some(&ca.path), &[]);
    cp.wait_agents(&["agent-1"]).await;
    let receiver = Receiver::https(&ca).await;
    receiver.count_only();
    create(&cp, webhook("steady", &receiver.url("/"), &["incident.created"])).await;
    // A zone no agent serves: this delivery stays open, and its event must stay with it.
    let mut parked = webhook("parked", &receiver.url("/never"), &["task.failed"]);
    parked.zone = "nowhere".into();
    create(&cp, parked).await;
    let waiting = publish(&cp, "task.failed", "{}").await;

    let mut first = Vec::new();
    for i in 0..20 {
        first.push(publish(&cp, "incident.created", &format!(r#"{{"wave":1,"n":{i}}}"#)).await.id);
    }
    // All delivered, well within the retention period.
    receiver.wait_for(20, WAIT).await;
    let conn = db.connect().await;
    let count = || async { event::Entity::find().count(&conn).await.unwrap() };
    let peak = count().await;
    assert_eq!(peak, 21);

    // A second wave while the first ages out, one event at a time until the first wave is gone,
    // then one more published after the prune: every one of them is delivered.
    let mut second = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let n = second.len();
        second.push(publish(&cp, "incident.created", &format!(r#"{{"wave":2,"n":{n}}}"#)).await.id);
        let left = event::Entity::find().filter(event::Column::Id.is_in(first.clone())).count(&conn).await.unwrap();
        if left == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{left} first-wave events are still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    second.push(publish(&cp, "incident.created", r#"{"wave":2,"after":"prune"}"#).await.id);
    let total = first.len() + second.len();
    receiver.wait_for(total, WAIT).await;
    assert_eq!(receiver.count(), total, "every event of both waves was delivered once");
    let gone: BTreeSet<String> = first.iter().cloned().collect();
    let orphans = delivery::Entity::find().filter(delivery::Column::EventId.is_in(gone)).count(&conn).await.unwrap();
    assert_eq!(orphans, 0, "pruned events take their deliveries along");
    let kept = event::Entity::find().filter(event::Column::Id.eq(&waiting.id)).count(&conn).await.unwrap();
    assert_eq!(kept, 1, "an event with an open delivery is kept however old");
    let open = delivery::Entity::find().filter(delivery::Column::EventId.eq(&waiting.id)).one(&conn).await.unwrap();
    assert_eq!(open.unwrap().status, delivery::status::PENDING);
    let attempts_left = attempt::Entity::find().count(&conn).await.unwrap();
    assert!(
        attempts_left <= second.len() as u64,
        "attempts of pruned deliveries are gone too ({attempts_left} left, {} second-wave deliveries)",
        second.len()
    );
    conn.close().await.ok();
}
