//! Herald's sender agent: dials out to the control plane, opens an `AgentService.Session`, and
//! (once the delivery pipeline lands) signs, sends and reports delivery jobs.
//!
//! Architecture invariant: the agent keeps no state on disk and holds no database credentials. A
//! killed agent loses only its leases, which expire and are dispatched again.

use std::time::Duration;

use clap::Parser;
use herald_shared::proto::{self, agent_message, agent_service_client::AgentServiceClient};
use rand::Rng as _;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::metadata::MetadataValue;

/// The stateless sender agent. No `Debug`: the token is a secret.
#[derive(Clone, Parser)]
#[command(name = "herald-agent", version, about)]
pub struct Args {
    /// Control-plane address; repeat for several (tried in turn).
    #[arg(long = "control-plane", env = "HERALD_CONTROL_PLANE", value_delimiter = ',', required = true)]
    pub control_planes: Vec<String>,
    /// The zone this agent serves.
    #[arg(long, env = "HERALD_ZONE", default_value = "default")]
    pub zone: String,
    /// Agent token, as configured on the control plane with `--agent-token`.
    #[arg(long, env = "HERALD_AGENT_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Stable id of this agent (for example the pod name); generated when absent.
    #[arg(long, env = "HERALD_AGENT_ID")]
    pub agent_id: Option<String>,
    /// Jobs held at once.
    #[arg(long, env = "HERALD_MAX_IN_FLIGHT", default_value_t = 256)]
    pub max_in_flight: u32,
    /// Address of the agent's probes (served once the delivery pipeline lands).
    #[arg(long, env = "HERALD_HTTP_ADDR", default_value = "127.0.0.1:9091")]
    pub http_addr: std::net::SocketAddr,
    /// Public address requests leave from, shown to customers for allowlists. Repeatable.
    #[arg(long, env = "HERALD_EGRESS_IP", value_delimiter = ',')]
    pub egress_ip: Vec<String>,
    /// Address range the egress guard lets through (development and tests). Repeatable.
    #[arg(long, env = "HERALD_ALLOW_CIDR", value_delimiter = ',')]
    pub allow_cidr: Vec<String>,
    /// PEM CA certificate to trust in addition to the system roots.
    #[arg(long, env = "HERALD_EXTRA_CA_CERT")]
    pub extra_ca_cert: Option<std::path::PathBuf>,
    /// Allow plain `http://` endpoints (development only).
    #[arg(long, env = "HERALD_ALLOW_HTTP")]
    pub allow_http: bool,
}

/// Keeps a session open to one of the control planes until `shutdown`, reconnecting with
/// exponential backoff and jitter.
pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    let agent_id = args.agent_id.clone().unwrap_or_else(|| herald_shared::ids::new_id(herald_shared::ids::AGENT));
    let mut backoff = Duration::from_millis(200);
    let mut next = 0usize;
    loop {
        let endpoint = &args.control_planes[next % args.control_planes.len()];
        next += 1;
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            outcome = session(endpoint, &agent_id, &args) => match outcome {
                Ok(()) => {
                    tracing::info!(%endpoint, "session closed by the control plane");
                    backoff = Duration::from_millis(200);
                }
                Err(status) if status.code() == Code::Unimplemented => {
                    tracing::warn!(%endpoint, "this control plane does not serve agent sessions yet; waiting");
                    backoff = Duration::from_secs(30);
                }
                Err(status) => tracing::warn!(%endpoint, code = ?status.code(), message = status.message(), "session failed"),
            },
        }
        let jitter = rand::rng().random_range(0..=backoff.as_millis() as u64 / 2);
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(backoff + Duration::from_millis(jitter)) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

async fn session(endpoint: &str, agent_id: &str, args: &Args) -> Result<(), tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .map_err(|e| tonic::Status::invalid_argument(format!("bad control-plane address {endpoint}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("cannot connect: {e}")))?;
    let token: MetadataValue<_> = format!("Bearer {}", args.token)
        .parse()
        .map_err(|_| tonic::Status::invalid_argument("the token is not valid in a header"))?;
    let mut client = AgentServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", token.clone());
        Ok(req)
    });
    let hello = proto::AgentMessage {
        msg: Some(agent_message::Msg::Hello(proto::Hello {
            agent_id: agent_id.to_owned(),
            zone: args.zone.clone(),
            version: herald_shared::VERSION.to_owned(),
            capacity: args.max_in_flight,
            egress_ips: args.egress_ip.clone(),
            pending_results: Vec::new(),
        })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(hello).await.map_err(|_| tonic::Status::internal("session channel closed"))?;
    let mut inbound = client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    tracing::info!(%endpoint, zone = %args.zone, "session open");
    while let Some(message) = inbound.message().await? {
        tracing::debug!(?message, "control message");
    }
    drop(tx);
    Ok(())
}
