//! `herald-bench`: runs the real binaries (a control plane on SQLite or PostgreSQL, agents), a
//! fast local receiver and a publisher, all on this machine, and measures end to end.
//!
//! Scenarios (`--scenario NAME`, or `all`; sizes are multiplied by `--scale`):
//! - `throughput`: one webhook, 200,000 events published as fast as they are accepted.
//! - `fanout`: 100 webhooks, 2,000 events: each event to every webhook (200,000 deliveries).
//! - `latency`: one webhook, 1,000 events/s, one event per `PublishEvents` call, for 60 s.
//! - `backlog`: 1,000,000 deliveries queued with no agent connected; then one connects and
//!   drains them. Reports the control plane's RSS while the backlog is held.
//! - `zones`: 1,000 webhooks across 10 zones, one agent per zone, 200 events (200,000
//!   deliveries).
//! - `ingest`: publish only (one subscribed webhook, no agent): events acknowledged per second.
//! - `soak`: load for `--minutes N` (or `--seconds N`) while random faults strike (an agent
//!   SIGKILLed and restarted, the control plane SIGKILLed and restarted, the receiver hanging);
//!   then the count of published, delivered, duplicated and lost.
//!
//! Before the scenarios, the raw limit: the same receiver driven by a bare reqwest client with 64
//! connections and the same 300-byte body, nothing of Herald in between. Every delivery rate is
//! also given as a ratio to it.
//!
//! A delivery scenario ends when every delivery row is `succeeded` in the database. Latency is
//! publish-to-receipt: each event id carries the time its `PublishEvents` call started, and the
//! receiver subtracts it from the time the request arrived. It prints a table and, with
//! `--json FILE`, writes every number.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_control_plane::db::entity::delivery;
use herald_shared::proto;
use herald_tests::procs::{AgentProcess, ControlPlaneProcess};
use herald_tests::receiver::Receiver;
use herald_tests::tls::TestCa;
use herald_tests::{Authed, Backend, TestDb};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::json;

const SCENARIOS: [&str; 6] = ["throughput", "fanout", "latency", "backlog", "zones", "ingest"];
/// The header that carries the event id (the default header prefix).
const EVENT_ID_HEADER: &str = "x-cloudthinker-event-id";
/// Events per `PublishEvents` call when publishing as fast as the control plane accepts.
const BATCH: usize = 1000;
/// Concurrent `PublishEvents` callers by default (`--publishers`).
const PUBLISHERS: usize = 4;
/// Connections of the raw-limit client (the agent's pool holds as many per host).
const RAW_CONNECTIONS: usize = 64;

type EventsClient = proto::event_service_client::EventServiceClient<Authed>;

struct Options {
    scenario: String,
    backend: Backend,
    scale: f64,
    events: Option<usize>,
    seconds: Option<f64>,
    soak: Duration,
    tls: bool,
    /// Concurrent callers of `PublishEvents` in the scenarios that publish as fast as they can.
    publishers: usize,
    json: Option<String>,
    /// Where to copy the processes' logs after each scenario.
    logs: Option<std::path::PathBuf>,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        scenario: "throughput".into(),
        backend: Backend::Sqlite,
        scale: 1.0,
        events: None,
        seconds: None,
        soak: Duration::from_secs(60),
        tls: false,
        publishers: PUBLISHERS,
        json: None,
        logs: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow::anyhow!("{a} needs a value"));
        match a.as_str() {
            "--scenario" => o.scenario = value()?,
            "--database" => {
                o.backend = match value()?.as_str() {
                    "sqlite" => Backend::Sqlite,
                    "postgres" => Backend::Postgres,
                    other => anyhow::bail!("--database sqlite|postgres, not {other}"),
                }
            }
            "--scale" => o.scale = value()?.parse()?,
            "--events" => o.events = Some(value()?.parse()?),
            "--seconds" => {
                let s: f64 = value()?.parse()?;
                o.seconds = Some(s);
                o.soak = Duration::from_secs_f64(s);
            }
            "--minutes" => o.soak = Duration::from_secs(60 * value()?.parse::<u64>()?),
            "--tls" => o.tls = true,
            "--publishers" => {
                o.publishers = value()?.parse()?;
                anyhow::ensure!(o.publishers > 0, "--publishers must be at least 1");
            }
            "--json" => o.json = Some(value()?),
            "--logs" => o.logs = Some(value()?.into()),
            "--help" | "-h" => {
                println!(
                    "herald-bench [--scenario throughput|fanout|latency|backlog|zones|ingest|all|soak] \
                     [--database sqlite|postgres] [--scale F] [--events N] [--seconds N | --minutes N] [--tls] [--publishers N] [--json FILE] [--logs DIR]\n\
                     --scale multiplies every scenario's size; --events sets the events of the scenario; \
                     --seconds the length of latency (or soak); --publishers the concurrent publish calls (4; latency makes one a millisecond)"
                );
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let known = o.scenario == "all" || o.scenario == "soak" || SCENARIOS.contains(&o.scenario.as_str());
    anyhow::ensure!(known, "--scenario {}|all|soak, not {}", SCENARIOS.join("|"), o.scenario);
    anyhow::ensure!(o.scale > 0.0, "--scale must be positive");
    Ok(o)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = options()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    if o.scenario == "soak" {
        return soak(&o).await;
    }
    let ca = o.tls.then(TestCa::new);
    let sink = Sink::start(ca.as_ref()).await?;
    let body = Bytes::from(event_data(0));
    let raw_seconds = (5.0 * o.scale).clamp(1.0, 5.0);
    let raw = raw_limit(&sink, ca.as_ref(), body, raw_seconds).await?;
    println!(
        "raw limit: {raw:.0} requests/s ({RAW_CONNECTIONS} connections, {} bytes, {}, {raw_seconds:.0} s)",
        event_data(0).len(),
        if o.tls { "TLS" } else { "plain HTTP" }
    );
    let names: Vec<&str> = if o.scenario == "all" { SCENARIOS.to_vec() } else { vec![o.scenario.as_str()] };
    let mut results = Vec::new();
    for name in names {
        let r = run(name, &o, &sink, ca.as_ref(), raw).await?;
        // Each scenario's row as soon as it is done; the aligned table comes at the end.
        println!("{}", r.row.join(" | "));
        results.push(r);
    }
    print_table(&results);
    if let Some(path) = &o.json {
        let out = json!({
            "machine": machine(),
            "database": backend_name(o.backend),
            "tls": o.tls,
            "scale": o.scale,
            "raw_limit_requests_per_second": raw,
            "scenarios": results.iter().map(|r| &r.json).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}

/// About 300 bytes of event data, as the issue's benchmark asks, different for each `n` and of
/// the same length: events of one batch do not share their data, as a publisher's do not (a
/// database write could otherwise send one copy for a batch, docs/BENCHMARKS.md item 52).
fn event_data(n: usize) -> String {
    format!(r#"{{"title":"{}{n:012}","potential_savings":150.00,"status":"pending"}}"#, "x".repeat(230))
}

fn backend_name(b: Backend) -> &'static str {
    match b {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    }
}

fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}

// ---------------------------------------------------------------------------------------------
// The receiver: hyper, HTTP/1.1 keep-alive, 200 to everything; counts, and measures latency.

#[derive(Default)]
struct Sink {
    addr: std::sync::OnceLock<SocketAddr>,
    deliveries: AtomicU64,
    raw: AtomicU64,
    /// Publish-to-receipt, in µs, of every delivery since the last `take_latencies`.
    latencies: std::sync::Mutex<Vec<u32>>,
}

impl Sink {
    async fn start(ca: Option<&TestCa>) -> anyhow::Result<Arc<Sink>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let sink = Arc::new(Sink::default());
        let _ = sink.addr.set(listener.local_addr()?);
        let tls = ca.map(|ca| tokio_rustls::TlsAcceptor::from(ca.server_config(&["localhost", "127.0.0.1"])));
        let s = sink.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                let (s, tls) = (s.clone(), tls.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| answer(s.clone(), req));
                    match tls {
                        // With TLS, HTTP/2 or HTTP/1.1 as ALPN settles, as a real endpoint serves.
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let http =
                                    hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                                let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                            }
                        }
                        None => {
                            let http = hyper::server::conn::http1::Builder::new();
                            let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        });
        Ok(sink)
    }

    fn url(&self, tls: bool, path: &str) -> String {
        let port = self.addr.get().expect("started").port();
        format!("{}://127.0.0.1:{port}{path}", if tls { "https" } else { "http" })
    }

    fn take_latencies(&self) -> Vec<u32> {
        std::mem::take(&mut *self.latencies.lock().expect("latency lock"))
    }
}

async fn answer(
    sink: Arc<Sink>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<http_body_util::Empty<Bytes>>, std::convert::Infallible> {
    use http_body_util::BodyExt as _;
    let raw = req.uri().path() == "/raw";
    let sent = req
        .headers()
        .get(EVENT_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|id| id.split('-').nth(1))
        .and_then(|us| us.parse::<i64>().ok());
    // The whole body is read, as a real receiver reads it.
    let _ = req.into_body().collect().await;
    if raw {
        sink.raw.fetch_add(1, Ordering::Relaxed);
    } else {
        if let Some(sent) = sent {
            let took = (micros_now() - sent).clamp(0, i64::from(u32::MAX));
            sink.latencies.lock().expect("latency lock").push(took as u32);
        }
        sink.deliveries.fetch_add(1, Ordering::Relaxed);
    }
    Ok(hyper::Response::new(http_body_util::Empty::new()))
}

fn micros_now() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// The raw limit: `RAW_CONNECTIONS` concurrent bare reqwest requests for `seconds`.
async fn raw_limit(sink: &Arc<Sink>, ca: Option<&TestCa>, body: Bytes, seconds: f64) -> anyhow::Result<f64> {
    let mut builder = reqwest::Client::builder().pool_max_idle_per_host(RAW_CONNECTIONS).tcp_nodelay(true).no_proxy();
    if let Some(ca) = ca {
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject as _;
        roots.add(rustls::pki_types::CertificateDer::from_pem_slice(ca.pem.as_bytes())?)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // The same ALPN offer as the agent's client.
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        builder = builder.use_preconfigured_tls(tls);
    }
    let client = builder.build()?;
    let url = sink.url(ca.is_some(), "/raw");
    // Warm the connections up first, then count.
    let deadline = Instant::now() + Duration::from_secs_f64(0.3);
    let run = |until: Instant| {
        let tasks: Vec<_> = (0..RAW_CONNECTIONS)
            .map(|_| {
                let (client, url, body) = (client.clone(), url.clone(), body.clone());
                tokio::spawn(async move {
                    while Instant::now() < until {
                        let r = client
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(body.clone())
                            .send()
                            .await?;
                        anyhow::ensure!(r.status().is_success(), "the receiver answered {}", r.status());
                        r.bytes().await?;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        async move {
            for t in tasks {
                t.await??;
            }
            anyhow::Ok(())
        }
    };
    run(deadline).await?;
    let before = sink.raw.load(Ordering::SeqCst);
    let started = Instant::now();
    run(started + Duration::from_secs_f64(seconds)).await?;
    let took = started.elapsed().as_secs_f64();
    Ok((sink.raw.load(Ordering::SeqCst) - before) as f64 / took)
}

// ---------------------------------------------------------------------------------------------
// Processes: CPU and memory from /proc.

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// User plus system CPU seconds a process has used.
fn cpu_seconds(pid: u32, tick: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / tick
}

/// CPU seconds of every PostgreSQL server process (backends, WAL writer, checkpointer).
fn postgres_cpu_seconds(tick: f64) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0.0 };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres"))
        .map(|pid| cpu_seconds(pid, tick))
        .sum()
}

/// (`VmRSS`, `VmHWM`: resident now and at its peak) of a process, in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

struct Plan {
    webhooks: usize,
    zones: usize,
    /// Events published (for `latency`: per second, for `seconds`).
    events: usize,
    rate: Option<f64>,
    seconds: f64,
    agents: bool,
    /// Agents connect only once everything is published (`backlog`).
    agents_late: bool,
}

fn plan(name: &str, o: &Options) -> Plan {
    let scaled = |n: f64| ((n * o.scale).round() as usize).max(1);
    let base = Plan { webhooks: 1, zones: 1, events: 0, rate: None, seconds: 0.0, agents: true, agents_late: false };
    let mut p = match name {
        "throughput" => Plan { events: scaled(200_000.0), ..base },
        "fanout" => Plan { webhooks: 100, events: scaled(2_000.0), ..base },
        "latency" => Plan { rate: Some(1000.0), seconds: (60.0 * o.scale).max(2.0), ..base },
        "backlog" => Plan { events: scaled(1_000_000.0), agents_late: true, ..base },
        "zones" => Plan { webhooks: 1000, zones: 10, events: scaled(200.0), ..base },
        "ingest" => Plan { events: scaled(200_000.0), agents: false, ..base },
        _ => unreachable!("checked in options"),
    };
    if let Some(n) = o.events {
        p.events = n;
    }
    if let Some(s) = o.seconds {
        p.seconds = s;
    }
    if let Some(rate) = p.rate {
        p.events = (rate * p.seconds).round() as usize;
    }
    p
}

struct Outcome {
    row: Vec<String>,
    json: serde_json::Value,
}

const COLUMNS: [&str; 13] = [
    "scenario",
    "deliveries",
    "del/s",
    "x raw",
    "events/s acked",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "max ms",
    "durable commits/1k ev",
    "CPU s/1k del (cp, agents, pg, bench)",
    "peak RSS MiB (cp, agent max, agent idle)",
    "sync",
];

fn print_table(results: &[Outcome]) {
    let mut widths: Vec<usize> = COLUMNS.iter().map(|c| c.len()).collect();
    for r in results {
        for (w, cell) in widths.iter_mut().zip(&r.row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_owned()
    };
    println!("{}", line(COLUMNS.iter().map(|c| (*c).to_owned()).collect()));
    for r in results {
        println!("{}", line(r.row.clone()));
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1000.0
}

async fn scrape_commits(cp: &ControlPlaneProcess) -> (f64, f64) {
    let (_, text) = herald_tests::http_get(cp.http_port, "/metrics").await;
    let m = herald_tests::parse_metrics(&text);
    let get = |sync: &str| m.get(&format!("herald_db_commits_total{{sync=\"{sync}\"}}")).copied().unwrap_or(0.0);
    (get("durable"), get("relaxed"))
}

/// The share of jobs whose event envelope came from the control plane's cache rather than the
/// database, over the control plane's life; `None` before any job.
async fn scrape_cached_share(cp: &ControlPlaneProcess) -> Option<f64> {
    let (_, text) = herald_tests::http_get(cp.http_port, "/metrics").await;
    let m = herald_tests::parse_metrics(&text);
    let get =
        |source: &str| m.get(&format!("herald_event_envelopes_total{{source=\"{source}\"}}")).copied().unwrap_or(0.0);
    let (cached, read) = (get("cache"), get("database"));
    (cached + read > 0.0).then(|| cached / (cached + read))
}

async fn run(name: &str, o: &Options, sink: &Arc<Sink>, ca: Option<&TestCa>, raw: f64) -> anyhow::Result<Outcome> {
    let p = plan(name, o);
    let tick = clock_ticks();
    let db = TestDb::new(o.backend).await;
    let cp = ControlPlaneProcess::start_with_env(&db.url, &["--allow-http"], &[("RUST_LOG", "info")]).await;
    // The control plane's log survives the scenario (also when it fails) with --logs.
    let keep =
        o.logs.as_ref().map(|dir| KeepLog { from: cp.log.clone(), to: dir.join(format!("{name}-control-plane.log")) });
    let zones: Vec<String> =
        if p.zones == 1 { vec!["default".to_owned()] } else { (0..p.zones).map(|z| format!("zone-{z}")).collect() };
    let ca_path = ca.map(|ca| ca.path.clone());
    let start_agents = || -> Vec<AgentProcess> {
        // One worker thread each: the two cores are shared with the control plane, the
        // publisher and the receiver (docs/BENCHMARKS.md item 49).
        let mut args = vec!["--max-in-flight", "512", "--worker-threads", "1"];
        if !o.tls {
            args.push("--allow-http");
        }
        zones
            .iter()
            .map(|z| AgentProcess::start(&cp.url(), z, &format!("bench-{z}"), ca_path.as_deref(), &args))
            .collect()
    };
    let agent_ids: Vec<String> = zones.iter().map(|z| format!("bench-{z}")).collect();
    let agent_refs: Vec<&str> = agent_ids.iter().map(String::as_str).collect();
    let mut agents = Vec::new();
    let mut idle_rss = None;
    if p.agents && !p.agents_late {
        agents = start_agents();
        cp.wait_agents(&agent_refs).await;
        // Connected, nothing to do yet: the agents' resident memory at rest.
        tokio::time::sleep(Duration::from_millis(500)).await;
        idle_rss = agents.iter().filter_map(|a| a.child.id()).map(|pid| rss_mib(pid).0).reduce(f64::max);
    }
    // The webhooks, spread over the zones; every one subscribes to every event.
    let mut hooks = cp.webhooks();
    for i in 0..p.webhooks {
        let hook = proto::Webhook {
            name: format!("bench-{i}"),
            url: sink.url(o.tls, &format!("/hook/{i}")),
            events: vec!["*".into()],
            zone: zones[i % zones.len()].clone(),
            ..Default::default()
        };
        hooks.create_webhook(proto::CreateWebhookRequest { webhook: Some(hook) }).await?;
    }
    let expected = (p.events * p.webhooks) as u64;
    let conn = herald_control_plane::db::connect(&db.url).await?;
    let sync = herald_control_plane::db::sync_setting(&conn).await.unwrap_or_default();
    sink.take_latencies();
    let delivered_before = sink.deliveries.load(Ordering::SeqCst);
    let (durable_before, relaxed_before) = scrape_commits(&cp).await;
    let cpu = |agents: &[AgentProcess]| -> (f64, f64, f64, f64) {
        let agents: f64 = agents.iter().filter_map(|a| a.child.id()).map(|pid| cpu_seconds(pid, tick)).sum();
        (
            cp.child.id().map_or(0.0, |pid| cpu_seconds(pid, tick)),
            agents,
            if o.backend == Backend::Postgres { postgres_cpu_seconds(tick) } else { 0.0 },
            cpu_seconds(std::process::id(), tick),
        )
    };
    let cpu_before = cpu(&agents);
    let started = Instant::now();
    let Published { events: published, retries: publish_retries } = match p.rate {
        Some(rate) => publish_at(&cp, rate, p.seconds).await?,
        None => publish_all(&cp, p.events, o.publishers).await?,
    };
    if publish_retries > 0 {
        println!("{name}: {publish_retries} publish calls answered UNAVAILABLE and were made again");
    }
    let published_in = started.elapsed();
    let mut held_rss = None;
    let mut drain_started = started;
    let mut agent_cpu_before = cpu_before.1;
    if p.agents_late {
        // The backlog is held: how much memory does the control plane need for it?
        tokio::time::sleep(Duration::from_secs(2)).await;
        held_rss = cp.child.id().map(rss_mib);
        agents = start_agents();
        agent_cpu_before = 0.0;
        drain_started = Instant::now();
    }
    if p.agents {
        wait_succeeded(&conn, sink, delivered_before + expected, expected).await?;
    }
    let done = drain_started.elapsed();
    let mut cpu_after = cpu(&agents);
    cpu_after.1 -= agent_cpu_before;
    let (durable_after, relaxed_after) = scrape_commits(&cp).await;
    let cached_share = scrape_cached_share(&cp).await;
    let cp_rss = cp.child.id().map_or((0.0, 0.0), rss_mib);
    let agent_rss: Vec<f64> = agents.iter().filter_map(|a| a.child.id()).map(|pid| rss_mib(pid).1).collect();
    let mut lat = sink.take_latencies();
    lat.sort_unstable();

    let deliveries = if p.agents { expected } else { 0 };
    let per_second = if p.agents { deliveries as f64 / done.as_secs_f64() } else { 0.0 };
    let acked = published as f64 / published_in.as_secs_f64();
    let per_1k =
        |cpu: f64| if deliveries > 0 { cpu / deliveries as f64 * 1000.0 } else { cpu / published as f64 * 1000.0 };
    let cpu_cp = per_1k(cpu_after.0 - cpu_before.0);
    let cpu_agents = per_1k(cpu_after.1);
    let cpu_pg = per_1k(cpu_after.2 - cpu_before.2);
    let cpu_bench = per_1k(cpu_after.3 - cpu_before.3);
    let durable_per_1k = (durable_after - durable_before) / published as f64 * 1000.0;
    let relaxed = relaxed_after - relaxed_before;
    let agent_peak = agent_rss.iter().copied().fold(0.0, f64::max);
    let (p50, p95, p99, max) =
        (percentile(&lat, 0.50), percentile(&lat, 0.95), percentile(&lat, 0.99), percentile(&lat, 1.0));
    drop(keep);
    drop(agents);
    drop(cp);
    drop_schema(&db).await;

    // Latency needs deliveries: `ingest` has none.
    let ms = |v: f64| if lat.is_empty() { "-".to_owned() } else { format!("{v:.1}") };
    let row = vec![
        name.to_owned(),
        deliveries.to_string(),
        format!("{per_second:.0}"),
        if p.agents { format!("{:.2}", per_second / raw) } else { "-".into() },
        format!("{acked:.0}"),
        ms(p50),
        ms(p95),
        ms(p99),
        ms(max),
        format!("{durable_per_1k:.1}"),
        format!("{cpu_cp:.3}, {cpu_agents:.3}, {cpu_pg:.3}, {cpu_bench:.3}"),
        format!("{:.0}, {agent_peak:.0}, {}", cp_rss.1, idle_rss.map_or("-".to_owned(), |r| format!("{r:.0}"))),
        sync.clone(),
    ];
    let json = json!({
        "scenario": name,
        "database": backend_name(o.backend),
        "tls": o.tls,
        "publishers": if p.rate.is_some() { 0 } else { o.publishers },
        "webhooks": p.webhooks,
        "zones": p.zones,
        "agents": if p.agents { p.zones } else { 0 },
        "events": published,
        "deliveries": deliveries,
        "seconds": done.as_secs_f64(),
        "deliveries_per_second": per_second,
        "ratio_to_raw_limit": if p.agents { per_second / raw } else { 0.0 },
        "events_per_second_acknowledged": acked,
        "latency_ms": { "p50": p50, "p95": p95, "p99": p99, "max": max, "samples": lat.len() },
        "cpu_seconds_per_1k": {
            "per": if deliveries > 0 { "deliveries" } else { "events" },
            "control_plane": cpu_cp, "agents": cpu_agents, "postgres": cpu_pg, "bench_publisher_and_receiver": cpu_bench,
        },
        "peak_rss_mib": { "control_plane": cp_rss.1, "agents": agent_rss },
        "agent_idle_rss_mib": idle_rss,
        "control_plane_rss_mib_with_backlog_held": held_rss.map(|r| r.0),
        "sync": sync,
        "durable_commits_per_1k_events": durable_per_1k,
        "relaxed_commits": relaxed,
        "envelopes_from_cache_share": cached_share,
        "publish_calls_retried": publish_retries,
    });
    Ok(Outcome { row, json })
}

/// Copies a log file when dropped.
struct KeepLog {
    from: std::path::PathBuf,
    to: std::path::PathBuf,
}

impl Drop for KeepLog {
    fn drop(&mut self) {
        if let Some(dir) = self.to.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::copy(&self.from, &self.to);
    }
}

/// How many times a publish call is made again after `UNAVAILABLE` before the run fails.
const PUBLISH_RETRIES: u32 = 10;

/// Makes one `PublishEvents` call and, while the control plane answers `UNAVAILABLE` (its
/// database did not answer in time), makes it again with the same events, as a publisher does:
/// the ids make it idempotent. Counts the calls made again in `retries`.
async fn publish_call(
    events: &mut EventsClient,
    batch: Vec<proto::Event>,
    retries: &AtomicU64,
) -> Result<(), tonic::Status> {
    let mut retried = 0;
    loop {
        match events.publish_events(proto::PublishEventsRequest { events: batch.clone() }).await {
            Ok(_) => return Ok(()),
            Err(status) if status.code() == tonic::Code::Unavailable && retried < PUBLISH_RETRIES => {
                retries.fetch_add(1, Ordering::Relaxed);
                retried += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => return Err(status),
        }
    }
}

/// Events acknowledged, and the calls that had to be made again (see [`publish_call`]).
struct Published {
    events: usize,
    retries: u64,
}

/// Publishes `total` events in batches of `BATCH` from `publishers` concurrent callers, as fast
/// as they are acknowledged.
async fn publish_all(cp: &ControlPlaneProcess, total: usize, publishers: usize) -> anyhow::Result<Published> {
    let batches = total.div_ceil(BATCH);
    let retries = Arc::new(AtomicU64::new(0));
    let mut callers = Vec::new();
    for p in 0..publishers {
        // Answers list every delivery of every event: with fan-out, more than tonic's default 4 MiB.
        let mut events = cp.events().max_decoding_message_size(256 << 20);
        let retries = retries.clone();
        callers.push(tokio::spawn(async move {
            let mut b = p;
            while b < batches {
                let n = (total - b * BATCH).min(BATCH);
                let sent = micros_now();
                let batch = (0..n)
                    .map(|i| proto::Event {
                        id: format!("b-{sent}-{b}-{i}"),
                        ..herald_tests::event("incident.created", &event_data(b * BATCH + i))
                    })
                    .collect();
                publish_call(&mut events, batch, &retries).await?;
                b += publishers;
            }
            anyhow::Ok(())
        }));
    }
    for c in callers {
        c.await??;
    }
    Ok(Published { events: total, retries: retries.load(Ordering::Relaxed) })
}

/// Publishes `rate` events a second, one per call, for `seconds`; calls overlap when one takes
/// longer than the interval.
async fn publish_at(cp: &ControlPlaneProcess, rate: f64, seconds: f64) -> anyhow::Result<Published> {
    let total = (rate * seconds).round() as usize;
    let retries = Arc::new(AtomicU64::new(0));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut calls = tokio::task::JoinSet::new();
    // One connection, as a publishing service keeps one: calls are multiplexed on it.
    let client = cp.events();
    for i in 0..total {
        tick.tick().await;
        let mut events = client.clone();
        let retries = retries.clone();
        calls.spawn(async move {
            let sent = micros_now();
            let event =
                proto::Event { id: format!("l-{sent}-{i}"), ..herald_tests::event("incident.created", &event_data(i)) };
            publish_call(&mut events, vec![event], &retries).await
        });
        while let Some(done) = calls.try_join_next() {
            done??;
        }
    }
    while let Some(done) = calls.join_next().await {
        done??;
    }
    Ok(Published { events: total, retries: retries.load(Ordering::Relaxed) })
}

/// Waits until the receiver has seen `received` requests and `expected` delivery rows are
/// `succeeded` in the database, with none left open.
async fn wait_succeeded(
    conn: &sea_orm::DatabaseConnection,
    sink: &Sink,
    received: u64,
    expected: u64,
) -> anyhow::Result<()> {
    let limit = Instant::now() + Duration::from_secs(3600);
    while sink.deliveries.load(Ordering::SeqCst) < received {
        anyhow::ensure!(Instant::now() < limit, "deliveries did not arrive within an hour");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    loop {
        let open =
            delivery::Entity::find().filter(delivery::Column::Status.is_in(delivery::status::OPEN)).count(conn).await?;
        if open == 0 {
            break;
        }
        anyhow::ensure!(Instant::now() < limit, "{open} deliveries still open after an hour");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let succeeded =
        delivery::Entity::find().filter(delivery::Column::Status.eq(delivery::status::SUCCEEDED)).count(conn).await?;
    anyhow::ensure!(succeeded == expected, "{succeeded} deliveries succeeded, {expected} expected");
    Ok(())
}

/// Drops a PostgreSQL scenario's schema (a million rows need not outlive the run).
async fn drop_schema(db: &TestDb) {
    if db.backend != Backend::Postgres {
        return;
    }
    let Some(schema) = db.url.rsplit("search_path%3D").next() else { return };
    if let Ok(admin) = sea_orm::Database::connect(&herald_tests::postgres_url()).await {
        let _ = admin.execute_unprepared(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).await;
        let _ = admin.close().await;
    }
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
