//! `herald-bench`: runs the real release binaries (a control plane and one agent) against a fast
//! local receiver and measures end-to-end delivery.
//!
//! Today it has one scenario, `quick`: one webhook, `--events` events published in batches of
//! 1000 by four concurrent publishers; the run ends when every delivery row is `succeeded` in the
//! database. It prints a table and, with `--json FILE`, writes the numbers. With `--dev` it runs
//! `herald dev` (control plane and embedded agent in one process, SQLite) instead of `herald serve`
//! and a separate `herald-agent`.

use std::time::{Duration, Instant};

use herald_control_plane::db::entity::delivery;
use herald_shared::proto;
use herald_tests::procs::{AgentProcess, ControlPlaneProcess};
use herald_tests::receiver::Receiver;
use herald_tests::{Backend, TestDb};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};

struct Options {
    scenario: String,
    events: usize,
    backend: Backend,
    json: Option<String>,
    dev: bool,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options { scenario: "quick".into(), events: 20_000, backend: Backend::Sqlite, json: None, dev: false };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow::anyhow!("{a} needs a value"));
        match a.as_str() {
            "--scenario" => o.scenario = value()?,
            "--events" => o.events = value()?.parse()?,
            "--database" => {
                o.backend = match value()?.as_str() {
                    "sqlite" => Backend::Sqlite,
                    "postgres" => Backend::Postgres,
                    other => anyhow::bail!("--database sqlite|postgres, not {other}"),
                }
            }
            "--json" => o.json = Some(value()?),
            "--dev" => o.dev = true,
            "--help" | "-h" => {
                println!(
                    "herald-bench [--scenario quick] [--events N] [--database sqlite|postgres] [--dev] [--json FILE]"
                );
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(o.scenario == "quick", "only the `quick` scenario exists so far");
    Ok(o)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = options()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let db = TestDb::new(o.backend).await;
    let dev_dir = tempfile::tempdir()?;
    let (cp, _agent, _dev, db_url) = if o.dev {
        let (cp, child) = ControlPlaneProcess::dev(dev_dir.path()).await;
        cp.wait_agents(&["dev-agent"]).await;
        let url = format!("sqlite://{}", dev_dir.path().join("herald.db").display());
        (cp, None, Some(child), url)
    } else {
        let cp = ControlPlaneProcess::start(&db.url, &["--allow-http"]).await;
        let agent =
            AgentProcess::start(&cp.url(), "default", "bench-agent", None, &["--allow-http", "--max-in-flight", "512"]);
        cp.wait_agents(&["bench-agent"]).await;
        let url = db.url.clone();
        (cp, Some(agent), None, url)
    };
    let receiver = Receiver::http().await;
    receiver.count_only();
    let hook = proto::Webhook {
        name: "bench".into(),
        url: receiver.url("/hook"),
        events: vec!["*".into()],
        ..Default::default()
    };
    cp.webhooks().create_webhook(proto::CreateWebhookRequest { webhook: Some(hook) }).await?;

    let data = format!(r#"{{"title":"{}","potential_savings":150.00,"status":"pending"}}"#, "x".repeat(230));
    let started = Instant::now();
    let batches = o.events.div_ceil(1000);
    let mut publishers = Vec::new();
    for p in 0..4 {
        let mut events = cp.events();
        let data = data.clone();
        let total = o.events;
        publishers.push(tokio::spawn(async move {
            let mut b = p;
            while b < batches {
                let n = (total - b * 1000).min(1000);
                let batch = (0..n).map(|_| herald_tests::event("incident.created", &data)).collect();
                events.publish_events(proto::PublishEventsRequest { events: batch }).await?;
                b += 4;
            }
            anyhow::Ok(())
        }));
    }
    for p in publishers {
        p.await??;
    }
    let published = started.elapsed();
    receiver.wait_for(o.events, Duration::from_secs(600)).await;
    let received = started.elapsed();
    let conn = herald_control_plane::db::connect(&db_url).await?;
    loop {
        let open = delivery::Entity::find()
            .filter(delivery::Column::Status.ne(delivery::status::SUCCEEDED))
            .count(&conn)
            .await?;
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let done = started.elapsed();
    let sync = herald_control_plane::db::sync_setting(&conn).await.unwrap_or_default();
    let rate = |d: Duration| o.events as f64 / d.as_secs_f64();
    println!("scenario  database  events  publish/s  received/s  succeeded/s  sync");
    println!(
        "{:<9} {:<9} {:<7} {:<10.0} {:<11.0} {:<12.0} {}",
        o.scenario,
        if o.dev { "dev".to_owned() } else { format!("{:?}", o.backend).to_lowercase() },
        o.events,
        rate(published),
        rate(received),
        rate(done),
        sync
    );
    if let Some(path) = o.json {
        let out = serde_json::json!({
            "scenario": o.scenario,
            "database": format!("{:?}", o.backend).to_lowercase(),
            "events": o.events,
            "events_per_second_acknowledged": rate(published),
            "deliveries_per_second_received": rate(received),
            "deliveries_per_second_succeeded": rate(done),
            "sync": sync,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}
