//! The test harness: databases (a temporary SQLite file, or a fresh schema on the PostgreSQL
//! server), a control plane running `server::run` in-process on `127.0.0.1:0`, authenticated
//! clients, and the paths of the real binaries.
//!
//! Every wait has a timeout; ports are bound before use, so there are no sleeps to guess.

pub mod procs;
pub mod proxy;
pub mod receiver;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use herald_control_plane::config::Config;
use herald_shared::proto;
use proto::delivery_service_client::DeliveryServiceClient;
use proto::event_service_client::EventServiceClient;
use proto::webhook_service_client::WebhookServiceClient;
use sea_orm::{ConnectionTrait, DatabaseConnection, EntityTrait, QueryOrder};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The PostgreSQL server tests use: `HERALD_TEST_POSTGRES_URL`, or the machine's server.
pub fn postgres_url() -> String {
    std::env::var("HERALD_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A database of its own for one test: a temporary SQLite file, or a new schema on PostgreSQL.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    /// Keeps the SQLite folder alive as long as the test.
    _dir: Option<tempfile::TempDir>,
    /// The PostgreSQL schema, dropped with the test.
    schema: Option<String>,
    /// The connection snapshots read through, opened on first use.
    snapshots: tokio::sync::OnceCell<DatabaseConnection>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temporary folder");
                let url = format!("sqlite://{}", dir.path().join("herald.db").display());
                TestDb { backend, url, _dir: Some(dir), schema: None, snapshots: Default::default() }
            }
            Backend::Postgres => {
                let base = postgres_url();
                let schema = format!("t_{}", herald_shared::ids::new_id("s").to_ascii_lowercase());
                let admin = sea_orm::Database::connect(&base)
                    .await
                    .unwrap_or_else(|e| panic!("PostgreSQL at {base} is required for these tests: {e}"));
                admin.execute_unprepared(&format!("CREATE SCHEMA {schema}")).await.expect("create schema");
                admin.close().await.ok();
                let sep = if base.contains('?') { '&' } else { '?' };
                let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
                TestDb { backend, url, _dir: None, schema: Some(schema), snapshots: Default::default() }
            }
        }
    }

    /// A connection of the test's own, to look at what the control plane stored.
    pub async fn connect(&self) -> DatabaseConnection {
        herald_control_plane::db::connect(&self.url).await.expect("connect to the test database")
    }

    /// Every row of every table, in a stable order, as text: equal snapshots mean nothing was
    /// written in between.
    pub async fn snapshot(&self) -> String {
        use herald_control_plane::db::entity::*;
        let db = self.snapshots.get_or_init(|| self.connect()).await;
        let mut out = String::new();
        macro_rules! dump {
            ($m:ident, $($col:ident),+) => {{
                let rows = $m::Entity::find()$(.order_by_asc($m::Column::$col))+.all(db).await.expect("read table");
                out.push_str(&format!("{}: {:?}\n", stringify!($m), rows));
            }};
        }
        dump!(workspace, Id);
        dump!(api_key, Id);
        dump!(webhook, Id);
        dump!(event, WorkspaceId, Id);
        dump!(delivery, Id);
        dump!(attempt, Id);
        dump!(agent, Id);
        out
    }
}

impl Drop for TestDb {
    /// Drops the test's PostgreSQL schema, so that test runs do not pile schemas up in the
    /// database they are given. Best effort, on a thread of its own (the test's runtime may be
    /// going away): a schema that a process still holds locks in after 2 s stays.
    fn drop(&mut self) {
        let Some(schema) = self.schema.take() else { return };
        let (base, name) = (postgres_url(), schema.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let admin = sea_orm::Database::connect(&base).await.ok()?;
                let sql = format!("SET lock_timeout = '2s'; DROP SCHEMA IF EXISTS {schema} CASCADE");
                let dropped = admin.execute_unprepared(&sql).await.is_ok();
                admin.close().await.ok();
                Some(dropped)
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(true))) {
            eprintln!("note: test schema {name} was left in place (still in use)");
        }
    }
}

/// Adds `authorization: Bearer <key>` to every call.
#[derive(Clone)]
pub struct Bearer(pub Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Authed = InterceptedService<Channel, Bearer>;

/// A control plane running in this process.
pub struct ControlPlane {
    pub addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub channel: Channel,
    /// The admin key of workspace `ws_default`.
    pub api_key: String,
    pub config: Config,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

/// A fresh random API key.
pub fn new_key() -> String {
    herald_control_plane::store::keys::generate_key()
}

impl ControlPlane {
    /// Starts a control plane with `config` (its bootstrap key set when absent) and waits until
    /// it answers health checks.
    pub async fn start(mut config: Config) -> ControlPlane {
        let _ = rustls_provider();
        let api_key = config.bootstrap_api_key.get_or_insert_with(new_key).clone();
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind gRPC");
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind HTTP");
        let (addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(herald_control_plane::server::run(config.clone(), grpc, Some(http), shutdown.clone()));
        let channel = match &config.tls {
            // A TLS control plane's certificate comes from `TestCa::server_files`, which writes
            // it beside the CA's `ca.pem`; it is reached as `localhost`, a name it must carry.
            Some(tls) => {
                let ca = tls.cert.parent().expect("certificate folder").join("ca.pem");
                let tls = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(ca).expect("ca.pem")))
                    .domain_name("localhost");
                Channel::from_shared(format!("https://localhost:{}", addr.port()))
                    .unwrap()
                    .tls_config(tls)
                    .expect("client TLS")
                    .connect_lazy()
            }
            None => Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy(),
        };
        let cp = ControlPlane { addr, http_addr, channel, api_key, config, shutdown, task };
        cp.wait_serving().await;
        cp
    }

    async fn wait_serving(&self) {
        use tonic_health_client::*;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut client = HealthClient::new(self.channel.clone());
            let ok = client
                .check(HealthCheckRequest { service: "herald.v1.EventService".into() })
                .await
                .is_ok_and(|r| r.into_inner().status == 1);
            if ok {
                return;
            }
            assert!(!self.task.is_finished(), "the control plane exited during start-up");
            assert!(tokio::time::Instant::now() < deadline, "the control plane did not become ready in 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the control plane and waits for it to close the database.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the control plane stops within 30 s")
            .expect("the control plane task does not panic")
            .expect("the control plane stops cleanly");
    }

    fn bearer(key: Option<&str>) -> Bearer {
        Bearer(key.map(|k| format!("Bearer {k}").parse().expect("ASCII key")))
    }

    pub fn webhooks(&self) -> WebhookServiceClient<Authed> {
        self.webhooks_as(Some(&self.api_key))
    }

    pub fn webhooks_as(&self, key: Option<&str>) -> WebhookServiceClient<Authed> {
        WebhookServiceClient::with_interceptor(self.channel.clone(), Self::bearer(key))
    }

    pub fn events(&self) -> EventServiceClient<Authed> {
        self.events_as(Some(&self.api_key))
    }

    pub fn events_as(&self, key: Option<&str>) -> EventServiceClient<Authed> {
        EventServiceClient::with_interceptor(self.channel.clone(), Self::bearer(key))
            .max_decoding_message_size(64 << 20)
    }

    pub fn deliveries_as(&self, key: Option<&str>) -> DeliveryServiceClient<Authed> {
        DeliveryServiceClient::with_interceptor(self.channel.clone(), Self::bearer(key))
    }

    pub fn agents_as(&self, key: Option<&str>) -> proto::agent_service_client::AgentServiceClient<Authed> {
        proto::agent_service_client::AgentServiceClient::with_interceptor(self.channel.clone(), Self::bearer(key))
    }
}

/// The health-check client, from tonic-health's generated code.
pub mod tonic_health_client {
    pub use tonic_health::pb::health_client::HealthClient;
    pub use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
}

fn rustls_provider() -> bool {
    rustls::crypto::ring::default_provider().install_default().is_ok()
}

/// The field an INVALID_ARGUMENT (or ALREADY_EXISTS) status names in its `BadRequest` detail.
pub fn bad_field(status: &Status) -> Option<String> {
    use tonic_types::StatusExt;
    status.get_details_bad_request().and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
}

/// Path of a binary of this workspace, built by the same `cargo test` run.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // Test binaries live in `target/<profile>/deps`, other binaries in `target/<profile>`.
    let dir = exe.parent().expect("executable folder");
    let dir = if dir.ends_with("deps") { dir.parent().expect("target profile folder") } else { dir };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo test --workspace does)",
        path.display()
    );
    path
}

/// A webhook to create, valid unless a test changes it.
pub fn webhook(name: &str, url: &str, events: &[&str]) -> proto::Webhook {
    proto::Webhook {
        name: name.into(),
        url: url.into(),
        events: events.iter().map(|e| (*e).to_owned()).collect(),
        ..Default::default()
    }
}

/// An event with `data_json`.
pub fn event(event_type: &str, data_json: &str) -> proto::Event {
    proto::Event { r#type: event_type.into(), data_json: data_json.into(), ..Default::default() }
}

/// A plain HTTP/1.1 GET on loopback: the status and the body (for probes and `/metrics`).
pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send the request");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("read the answer");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// The samples of a Prometheus text exposition, by series (`name{label="value",…}`, labels as
/// written) to value.
pub fn parse_metrics(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}
