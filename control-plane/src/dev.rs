//! `herald dev`: a control plane on SQLite in a local folder plus an embedded agent in zone
//! `default` that may reach loopback and plain `http`, with its secret key and an admin API key
//! kept in `herald-dev.json` beside the database (so printed commands keep working across
//! restarts), and copy-paste examples printed at start-up.

use std::path::Path;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DevArgs};
use crate::crypto::SecretKey;

/// What `herald dev` keeps between runs.
#[derive(serde::Serialize, serde::Deserialize)]
struct DevState {
    secret_key: String,
    api_key: String,
}

fn load_or_create(path: &Path) -> anyhow::Result<DevState> {
    if let Ok(text) = std::fs::read_to_string(path) {
        return serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged; delete it to start afresh", path.display()));
    }
    let state = DevState { secret_key: SecretKey::generate_base64(), api_key: crate::store::keys::generate_key() };
    std::fs::write(path, serde_json::to_string_pretty(&state)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(state)
}

/// Runs the development control plane until `shutdown`.
pub async fn run(args: DevArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("cannot create {}", args.dir.display()))?;
    let state = load_or_create(&args.dir.join("herald-dev.json"))?;
    let db_path = args.dir.join("herald.db");
    let mut config = Config::for_tests(format!("sqlite://{}", db_path.display()));
    config.secret_key = SecretKey::from_base64(&state.secret_key).context("herald-dev.json holds a bad secret key")?;
    config.bootstrap_api_key = Some(state.api_key.clone());
    config.allow_http = true;
    let agent_token = crate::store::keys::generate_key();
    config.agent_tokens = vec![crate::config::AgentToken { token: agent_token.clone(), zones: None }];
    // Ctrl-C stops soon: the embedded agent's last results are waited for this long at most.
    config.agent_drain_timeout = std::time::Duration::from_secs(5);

    let grpc = crate::bind(args.grpc_addr, "gRPC").await?;
    let http = crate::bind(args.http_addr, "HTTP").await?;
    let addr = grpc.local_addr()?;
    let http_addr = http.local_addr()?;
    let server = tokio::spawn(crate::server::run(config, grpc, Some(http), shutdown.clone()));
    // Print the banner once the server answers health checks, so that the commands work when read.
    if !wait_serving(addr, &server).await {
        return server.await.context("the control plane task failed")?;
    }
    // The embedded agent: zone `default`, loopback and plain http allowed, for local receivers.
    let agent = herald_agent::Args {
        control_planes: vec![format!("http://{addr}")],
        zone: "default".into(),
        token: agent_token,
        agent_id: Some("dev-agent".into()),
        max_in_flight: 256,
        // Runs on the control plane's runtime: the flag is the binary's, not `run`'s.
        worker_threads: None,
        http_addr: "127.0.0.1:0".parse().expect("a valid address"),
        egress_ip: Vec::new(),
        allow_cidr: crate::config::loopback(),
        extra_ca_cert: None,
        allow_http: true,
        client_cert: None,
        client_key: None,
        drain_timeout: std::time::Duration::from_secs(35),
    };
    let agent_task = tokio::spawn(herald_agent::run(agent, shutdown.clone()));
    println!("{}", banner(&addr.to_string(), &http_addr.to_string(), &db_path.display().to_string(), &state.api_key));
    let served = server.await.context("the control plane task failed")?;
    let _ = agent_task.await;
    served
}

/// Waits until the gRPC health service says SERVING; false if the server task ended first.
async fn wait_serving(addr: std::net::SocketAddr, server: &tokio::task::JoinHandle<anyhow::Result<()>>) -> bool {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else { return false };
    let channel = endpoint.connect_lazy();
    loop {
        if server.is_finished() {
            return false;
        }
        let check = HealthClient::new(channel.clone())
            .check(HealthCheckRequest { service: "herald.v1.EventService".into() })
            .await;
        if check.is_ok_and(|r| r.into_inner().status == 1) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn banner(addr: &str, http: &str, db: &str, key: &str) -> String {
    let auth = format!("-H 'authorization: Bearer {key}'");
    format!(
        r#"
Herald dev is running.
  gRPC       {addr} (plaintext)
  probes     http://{http}/healthz  http://{http}/readyz
  database   sqlite://{db}
  API key    {key}   (workspace ws_default, scope admin)
  agent      dev-agent, zone default (may reach loopback and plain http)

Try it (copy and paste):
  grpcurl -plaintext {addr} list
  grpcurl -plaintext {auth} {addr} herald.v1.WebhookService/ListEventTypes
  grpcurl -plaintext {auth} -d '{{"webhook": {{"name": "local", "url": "http://127.0.0.1:8000/hook", "events": ["incident.*"]}}}}' {addr} herald.v1.WebhookService/CreateWebhook
  grpcurl -plaintext {auth} -d '{{"event": {{"type": "incident.created", "data": {{"title": "DB down"}}}}}}' {addr} herald.v1.EventService/PublishEvent

Stop with Ctrl-C. State is kept in {db} and herald-dev.json.
"#
    )
}
