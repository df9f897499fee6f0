//! The real binaries as child processes: a control plane (`herald serve`) and agents
//! (`herald-agent`), with helpers to restart, SIGTERM and SIGKILL them.

use std::process::Stdio;
use std::time::Duration;

use herald_shared::proto;
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use crate::{Authed, Bearer, bin};

/// The agent token every test control plane accepts.
pub const AGENT_TOKEN: &str = "agent-token-for-tests-0123456789";
/// The secret key every test control plane uses.
pub const SECRET_KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

/// The ports [`free_port`] hands out: below Linux's ephemeral range (32768-60999), so the
/// kernel never gives one of them to an outgoing connection or to a `bind` on port 0 while a
/// child process is on its way to binding it.
const PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A free loopback port for a child process to bind.
///
/// Binding port 0 and handing the number on would leave a window in which the kernel can give
/// the same port to any other socket of the machine (every outgoing connection takes one), and
/// the child then fails with "Address already in use". Ports are instead taken in turn from
/// [`PORTS`], starting at an offset drawn from the process id so that test binaries running at
/// the same time start far apart, and each is checked free by binding it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(PORTS.end - PORTS.start);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(2_654_435_761) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = PORTS.start + u16::try_from(n).expect("span fits in u16");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {PORTS:?}");
}

/// Sends `signal` (`TERM`, `KILL`) to a child.
pub fn signal(child: &Child, signal: &str) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status();
    }
}

/// A `herald serve` process.
pub struct ControlPlaneProcess {
    pub child: Child,
    pub port: u16,
    /// The port of `/healthz`, `/readyz` and `/metrics`.
    pub http_port: u16,
    pub api_key: String,
    pub db_url: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    pub log: std::path::PathBuf,
    _logs: tempfile::TempDir,
}

impl ControlPlaneProcess {
    /// Starts `herald serve` on `db_url` with `extra` flags and waits until it serves.
    pub async fn start(db_url: &str, extra: &[&str]) -> ControlPlaneProcess {
        Self::start_with_env(db_url, extra, &[]).await
    }

    /// Like [`ControlPlaneProcess::start`], with `env` added to the process's environment.
    pub async fn start_with_env(db_url: &str, extra: &[&str], env: &[(&str, &str)]) -> ControlPlaneProcess {
        let logs = tempfile::tempdir().unwrap();
        let mut cp = ControlPlaneProcess {
            child: Command::new("true").spawn().unwrap(),
            port: free_port(),
            http_port: free_port(),
            api_key: crate::new_key(),
            db_url: db_url.to_owned(),
            args: extra.iter().map(|s| (*s).to_owned()).collect(),
            env: env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            log: logs.path().join("control-plane.log"),
            _logs: logs,
        };
        cp.spawn().await;
        cp
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        self.child = Command::new(bin("herald"))
            .args(["serve", "--grpc-addr", &format!("127.0.0.1:{}", self.port)])
            .args(["--http-addr", &format!("127.0.0.1:{}", self.http_port)])
            .args(["--database-url", &self.db_url, "--secret-key", SECRET_KEY, "--bootstrap-api-key", &self.api_key])
            .args(["--agent-token", AGENT_TOKEN, "--allow-cidr", "127.0.0.0/8,::1/128"])
            .args(&self.args)
            .env("RUST_LOG", "info,herald_control_plane=debug")
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start herald serve");
        self.wait_serving().await;
    }

    async fn wait_serving(&mut self) {
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(channel) = Channel::from_shared(self.url()).unwrap().connect().await {
                let ok = HealthClient::new(channel)
                    .check(HealthCheckRequest { service: "herald.v1.EventService".into() })
                    .await
                    .is_ok_and(|r| r.into_inner().status == 1);
                if ok {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "herald serve exited with {status}:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(tokio::time::Instant::now() < deadline, "herald serve did not become ready");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Runs `herald dev` in `dir` and returns a handle with its admin key (read from
    /// `herald-dev.json`) and the child.
    pub async fn dev(dir: &std::path::Path) -> (ControlPlaneProcess, Child) {
        let logs = tempfile::tempdir().unwrap();
        let log = logs.path().join("dev.log");
        let (port, http_port) = (free_port(), free_port());
        let child = Command::new(bin("herald"))
            .args([
                "dev",
                "--grpc-addr",
                &format!("127.0.0.1:{port}"),
                "--http-addr",
                &format!("127.0.0.1:{http_port}"),
            ])
            .current_dir(dir)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("start herald dev");
        let state = dir.join("herald-dev.json");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let api_key = loop {
            if let Ok(text) = std::fs::read_to_string(&state)
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            {
                break v["api_key"].as_str().unwrap_or_default().to_owned();
            }
            assert!(tokio::time::Instant::now() < deadline, "herald dev did not start");
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        let mut cp = ControlPlaneProcess {
            child: Command::new("true").spawn().unwrap(),
            port,
            http_port,
            api_key,
            db_url: String::new(),
            args: Vec::new(),
            env: Vec::new(),
            log,
            _logs: logs,
        };
        cp.wait_serving().await;
        (cp, child)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// SIGKILLs the control plane and starts it again on the same port and database.
    pub async fn kill_and_restart(&mut self) {
        signal(&self.child, "KILL");
        let _ = self.child.wait().await;
        self.spawn().await;
    }

    /// SIGTERMs the control plane, waits for it to exit cleanly, and starts it again on the same
    /// port and database after `down` (a rolling restart). Returns how long it took to exit.
    pub async fn terminate_and_restart(&mut self, down: Duration) -> Duration {
        let asked = std::time::Instant::now();
        signal(&self.child, "TERM");
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("the control plane exits within 60 s of SIGTERM")
            .unwrap();
        let stopped = asked.elapsed();
        assert!(
            status.success(),
            "SIGTERM ends in a clean exit: {status}\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        tokio::time::sleep(down).await;
        self.spawn().await;
        stopped
    }

    fn channel(&self) -> Channel {
        Channel::from_shared(self.url()).unwrap().connect_lazy()
    }

    fn bearer(&self) -> Bearer {
        Bearer(Some(format!("Bearer {}", self.api_key).parse().unwrap()))
    }

    pub fn webhooks(&self) -> proto::webhook_service_client::WebhookServiceClient<Authed> {
        proto::webhook_service_client::WebhookServiceClient::with_interceptor(self.channel(), self.bearer())
    }

    /// The webhook service with another API key.
    pub fn webhooks_as(&self, key: &str) -> proto::webhook_service_client::WebhookServiceClient<Authed> {
        let bearer = Bearer(Some(format!("Bearer {key}").parse().unwrap()));
        proto::webhook_service_client::WebhookServiceClient::with_interceptor(self.channel(), bearer)
    }

    pub fn events(&self) -> proto::event_service_client::EventServiceClient<Authed> {
        proto::event_service_client::EventServiceClient::with_interceptor(self.channel(), self.bearer())
    }

    pub fn deliveries(&self) -> proto::delivery_service_client::DeliveryServiceClient<Authed> {
        proto::delivery_service_client::DeliveryServiceClient::with_interceptor(self.channel(), self.bearer())
    }

    pub fn agents(&self) -> proto::agent_service_client::AgentServiceClient<Authed> {
        proto::agent_service_client::AgentServiceClient::with_interceptor(self.channel(), self.bearer())
    }

    /// Waits until the agents with these ids are connected.
    pub async fn wait_agents(&self, ids: &[&str]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let connected =
                self.agents().list_agents(proto::ListAgentsRequest::default()).await.map(|r| r.into_inner().agents);
            if connected.as_ref().is_ok_and(|a| ids.iter().all(|id| a.iter().any(|x| x.id == *id))) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "agents {ids:?} did not connect: {connected:?}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// A `herald-agent` process.
pub struct AgentProcess {
    pub child: Child,
    /// The port of the agent's probes and `/metrics`.
    pub http_port: u16,
    pub id: String,
    pub zone: String,
    pub log: std::path::PathBuf,
    _logs: tempfile::TempDir,
}

impl AgentProcess {
    /// Starts an agent of `zone` for the control plane at `url`, trusting `ca` and loopback.
    pub fn start(url: &str, zone: &str, id: &str, ca: Option<&std::path::Path>, extra: &[&str]) -> AgentProcess {
        let mut args = vec!["--allow-cidr", "127.0.0.0/8"];
        args.extend_from_slice(extra);
        Self::guarded(url, zone, id, ca, &args)
    }

    /// Starts an agent whose egress guard opens no range beyond those `extra` names.
    pub fn guarded(url: &str, zone: &str, id: &str, ca: Option<&std::path::Path>, extra: &[&str]) -> AgentProcess {
        Self::with_env(url, zone, id, ca, extra, &[])
    }

    /// Like [`AgentProcess::guarded`], with `env` added to the agent's environment.
    pub fn with_env(
        url: &str,
        zone: &str,
        id: &str,
        ca: Option<&std::path::Path>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> AgentProcess {
        let logs = tempfile::tempdir().unwrap();
        let log = logs.path().join("agent.log");
        let file = std::fs::File::create(&log).unwrap();
        let http_port = free_port();
        let mut cmd = Command::new(bin("herald-agent"));
        cmd.args(["--control-plane", url, "--zone", zone, "--agent-id", id, "--token", AGENT_TOKEN])
            .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            // Tests choose the agent's threads with its own flag or variable only.
            .env_remove("TOKIO_WORKER_THREADS")
            .env_remove("HERALD_WORKER_THREADS")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true);
        if let Some(ca) = ca {
            cmd.arg("--extra-ca-cert").arg(ca);
        }
        let child = cmd.spawn().expect("start herald-agent");
        AgentProcess { child, http_port, id: id.to_owned(), zone: zone.to_owned(), log, _logs: logs }
    }
}
