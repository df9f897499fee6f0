//! `herald-bench`: runs the real release binaries (a control plane and one agent) against a fast
//! local receiver and measures end-to-end delivery.
//!
//! Scenarios:
//! - `quick`: one webhook, `--events` events published in batches of 1000 by four concurrent
//!   publishers; the run ends when every delivery row is `succeeded` in the database. With
//!   `--dev` it runs `herald dev` (control plane and embedded agent in one process, SQLite)
//!   instead of `herald serve` and a separate `herald-agent`.
//! - `soak`: load for `--minutes N` (or `--seconds N`) while random faults strike (an agent
//!   SIGKILLed and restarted, the control plane SIGKILLed and restarted, the receiver hanging for
//!   a while); then it waits for the queue to drain and counts published, delivered, duplicated
//!   and lost.
//!
//! Each prints a table and, with `--json FILE`, writes the numbers.

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
    soak: Duration,
    backend: Backend,
    json: Option<String>,
    dev: bool,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        scenario: "quick".into(),
        events: 20_000,
        soak: Duration::from_secs(60),
        backend: Backend::Sqlite,
        json: None,
        dev: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow::anyhow!("{a} needs a value"));
        match a.as_str() {
            "--scenario" => o.scenario = value()?,
            "--events" => o.events = value()?.parse()?,
            "--minutes" => o.soak = Duration::from_secs(60 * value()?.parse::<u64>()?),
            "--seconds" => o.soak = Duration::from_secs(value()?.parse()?),
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
                    "herald-bench [--scenario quick|soak] [--events N] [--minutes N | --seconds N] [--database sqlite|postgres] [--dev] [--json FILE]"
                );
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(["quick", "soak"].contains(&o.scenario.as_str()), "--scenario quick|soak");
    Ok(o)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = options()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    if o.scenario == "soak" {
        return soak(&o).await;
    }
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

/// Load with random faults, then the count: every acknowledged event must be delivered.
async fn soak(o: &Options) -> anyhow::Result<()> {
    use std::sync::{Arc, Mutex};

    use herald_tests::receiver::Reply;
    use rand::Rng as _;

    let db = TestDb::new(o.backend).await;
    let mut cp = ControlPlaneProcess::start(&db.url, &["--allow-http", "--lease-grace", "500ms"]).await;
    let agent = |id: &str| AgentProcess::start(&cp.url(), "default", id, None, &["--allow-http"]);
    let mut agents = [agent("soak-a"), agent("soak-b")];
    cp.wait_agents(&["soak-a", "soak-b"]).await;
    let receiver = Receiver::http().await;
    let hook = proto::Webhook {
        name: "soak".into(),
        url: receiver.url("/hook"),
        events: vec!["*".into()],
        timeout: Some(prost_types::Duration { seconds: 2, nanos: 0 }),
        ..Default::default()
    };
    cp.webhooks().create_webhook(proto::CreateWebhookRequest { webhook: Some(hook) }).await?;

    // The publisher: batches of 50 with ids of its own, each retried until acknowledged.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let failed_calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let publisher = {
        let (acked, stop, failed_calls) = (acked.clone(), stop.clone(), failed_calls.clone());
        let channel = tonic::transport::Channel::from_shared(cp.url())?.connect_lazy();
        let bearer = herald_tests::Bearer(Some(format!("Bearer {}", cp.api_key).parse()?));
        let mut events = proto::event_service_client::EventServiceClient::with_interceptor(channel, bearer);
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.is_cancelled() {
                let ids: Vec<String> = (n..n + 50).map(|i| format!("soak-{i}")).collect();
                n += 50;
                let batch: Vec<proto::Event> = ids
                    .iter()
                    .map(|id| proto::Event { id: id.clone(), ..herald_tests::event("incident.created", "{}") })
                    .collect();
                loop {
                    match events.publish_events(proto::PublishEventsRequest { events: batch.clone() }).await {
                        Ok(_) => break,
                        Err(_) => {
                            failed_calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                acked.lock().expect("lock").extend(ids);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let started = Instant::now();
    let mut faults: Vec<String> = Vec::new();
    while started.elapsed() < o.soak {
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(1500..4000))).await;
        match rand::rng().random_range(0..3) {
            0 => {
                let i = rand::rng().random_range(0..2);
                let id = ["soak-a", "soak-b"][i];
                herald_tests::procs::signal(&agents[i].child, "KILL");
                let _ = agents[i].child.wait().await;
                agents[i] = AgentProcess::start(&cp.url(), "default", id, None, &["--allow-http"]);
                faults.push(format!("SIGKILL {id}"));
            }
            1 => {
                cp.kill_and_restart().await;
                faults.push("SIGKILL control plane".into());
            }
            _ => {
                receiver.always(Reply::Hang(Duration::from_secs(5)));
                tokio::time::sleep(Duration::from_secs(2)).await;
                receiver.always(Reply::ok());
                faults.push("receiver hung 2 s".into());
            }
        }
    }
    stop.cancel();
    publisher.await?;
    let acked = acked.lock().expect("lock").clone();
    // Drain: every acknowledged event at the receiver, and no delivery left open.
    let drain = Instant::now();
    let (mut delivered, mut duplicated) = (0, 0);
    while drain.elapsed() < Duration::from_secs(180) {
        let mut seen = std::collections::HashMap::<String, usize>::new();
        for r in receiver.requests() {
            *seen.entry(r.header("x-cloudthinker-event-id")).or_default() += 1;
        }
        delivered = acked.iter().filter(|id| seen.contains_key(*id)).count();
        duplicated = seen.values().map(|n| n - 1).sum::<usize>();
        if delivered == acked.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let conn = herald_control_plane::db::connect(&db.url).await?;
    let open_rows =
        || delivery::Entity::find().filter(delivery::Column::Status.is_in(delivery::status::OPEN)).count(&conn);
    // Leases whose results died with a killed process expire, and those deliveries settle.
    let mut open = open_rows().await?;
    while open > 0 && drain.elapsed() < Duration::from_secs(180) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        open = open_rows().await?;
    }
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for r in receiver.requests() {
        *seen.entry(r.header("x-cloudthinker-event-id")).or_default() += 1;
    }
    let duplicated = duplicated.max(seen.values().map(|n| n - 1).sum::<usize>());
    let lost = acked.len() - delivered;
    println!("scenario  database  seconds  faults  published  delivered  duplicated  lost  failed-publish-calls  open");
    println!(
        "soak      {:<9} {:<8} {:<7} {:<10} {:<10} {:<11} {:<5} {:<21} {open}",
        format!("{:?}", o.backend).to_lowercase(),
        o.soak.as_secs(),
        faults.len(),
        acked.len(),
        delivered,
        duplicated,
        lost,
        failed_calls.load(std::sync::atomic::Ordering::SeqCst)
    );
    if let Some(path) = &o.json {
        let out = serde_json::json!({
            "scenario": "soak", "database": format!("{:?}", o.backend).to_lowercase(), "seconds": o.soak.as_secs(),
            "faults": faults, "published": acked.len(), "delivered": delivered, "duplicated": duplicated,
            "lost": lost, "open_after_drain": open,
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    anyhow::ensure!(lost == 0 && open == 0, "{lost} acknowledged events lost, {open} deliveries left open");
    Ok(())
}
