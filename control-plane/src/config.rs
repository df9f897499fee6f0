//! Command-line flags (each with its `HERALD_…` environment twin) and the validated `Config` that
//! `server::run` takes by value.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use herald_shared::retry::RetrySchedule;

use crate::crypto::SecretKey;

/// Herald: signed, retried, logged webhook delivery.
#[derive(Parser)]
#[command(name = "herald", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the control plane: the gRPC API, the durable event queue and the dispatcher.
    Serve(Box<ServeArgs>),
    /// Run a local control plane on SQLite in the working folder, with a printed API key and
    /// copy-paste examples. The fastest way to see Herald work.
    Dev(DevArgs),
    /// Apply database migrations and exit.
    Migrate(DatabaseArgs),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Webhooks: create, list, get, update, delete, rotate-secret, test.
    Webhooks {
        #[command(flatten)]
        client: crate::cli::ClientArgs,
        #[command(subcommand)]
        command: crate::cli::WebhooksCommand,
    },
    /// Publish events: one from an argument or stdin, or a file of them.
    Events {
        #[command(flatten)]
        client: crate::cli::ClientArgs,
        #[command(subcommand)]
        command: crate::cli::EventsCommand,
    },
    /// The delivery log: list, get, retry, watch.
    Deliveries {
        #[command(flatten)]
        client: crate::cli::ClientArgs,
        #[command(subcommand)]
        command: crate::cli::DeliveriesCommand,
    },
    /// Connected agents.
    Agents {
        #[command(flatten)]
        client: crate::cli::ClientArgs,
        #[command(subcommand)]
        command: crate::cli::AgentsCommand,
    },
    /// Webhook templates.
    Templates {
        #[command(flatten)]
        client: crate::cli::ClientArgs,
        #[command(subcommand)]
        command: crate::cli::TemplatesCommand,
    },
    /// Re-seal every secret at rest under `--secret-key`, opening old values with
    /// `--previous-secret-key`: the last step of rotating the master key. Safe beside a running
    /// control plane that has both keys.
    Rekey {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        keys: KeyArgs,
    },
}

#[derive(Args, Clone)]
pub struct DatabaseArgs {
    /// `sqlite://herald.db` (the embedded default) or `postgres://user@host/db`.
    #[arg(long, env = "HERALD_DATABASE_URL", default_value = "sqlite://herald.db")]
    pub database_url: String,
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create an API key for a workspace (created if absent) and print it.
    Create {
        #[command(flatten)]
        db: DatabaseArgs,
        /// The workspace the key belongs to, e.g. `ws_acme`.
        #[arg(long, env = "HERALD_WORKSPACE")]
        workspace: String,
        /// `admin` (everything) or `publish` (EventService only).
        #[arg(long, env = "HERALD_SCOPE", default_value = "admin")]
        scope: String,
    },
    /// List API keys (their ids, workspaces, scopes and creation times; never the keys).
    List {
        #[command(flatten)]
        db: DatabaseArgs,
        /// Only this workspace's keys.
        #[arg(long, env = "HERALD_WORKSPACE")]
        workspace: Option<String>,
    },
    /// Revoke an API key, named by its id (`key_…`, from `keys list`) or by the key itself.
    /// Control planes on PostgreSQL drop it as the notification arrives; one on SQLite within
    /// 30 s (the time it keeps an accepted key). A bootstrap key comes back at the next start
    /// unless it is removed from the configuration first.
    Revoke {
        #[command(flatten)]
        db: DatabaseArgs,
        /// The key's id or the key.
        key: String,
    },
}

/// The master key that seals secrets at rest, and retired ones during its rotation.
#[derive(Args, Clone)]
pub struct KeyArgs {
    /// The key that encrypts secrets, header values and transform variables at rest: 32 bytes,
    /// base64. `herald dev` generates one in a local file.
    #[arg(long, env = "HERALD_SECRET_KEY", hide_env_values = true)]
    pub secret_key: Option<String>,
    /// Retired master keys that still open values sealed before a rotation, until `herald rekey`
    /// has re-sealed them under `--secret-key` (repeatable).
    #[arg(long, env = "HERALD_PREVIOUS_SECRET_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub previous_secret_key: Vec<String>,
}

impl KeyArgs {
    /// The master key with its retired keys.
    pub fn keyring(&self) -> Result<SecretKey, ConfigError> {
        let parse = |k: &str| SecretKey::from_base64(k).map_err(|e| ConfigError::SecretKey(e.to_string()));
        let current = parse(self.secret_key.as_deref().ok_or(ConfigError::MissingSecretKey)?)?;
        let retired = self.previous_secret_key.iter().map(|k| parse(k)).collect::<Result<Vec<_>, _>>()?;
        Ok(current.with_retired(retired))
    }
}

/// Flags of `herald serve`. No `Debug`: they hold secrets; `Config` prints redacted.
#[derive(Args, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// Address of the gRPC API (port 0 picks a free port, which is logged).
    #[arg(long, env = "HERALD_GRPC_ADDR", default_value = "127.0.0.1:7070")]
    pub grpc_addr: SocketAddr,
    /// Address of the `/healthz` and `/readyz` probes.
    #[arg(long, env = "HERALD_HTTP_ADDR", default_value = "127.0.0.1:9090")]
    pub http_addr: SocketAddr,
    /// An admin API key that is made to exist at start-up (for Helm secrets and scripts).
    #[arg(long, env = "HERALD_BOOTSTRAP_API_KEY", hide_env_values = true)]
    pub bootstrap_api_key: Option<String>,
    /// The workspace of `--bootstrap-api-key`.
    #[arg(long, env = "HERALD_BOOTSTRAP_WORKSPACE", default_value = "ws_default")]
    pub bootstrap_workspace: String,
    /// Agent tokens, `TOKEN` (every zone) or `TOKEN:zone,zone`. Repeatable; comma-free tokens.
    #[arg(long, env = "HERALD_AGENT_TOKEN", hide_env_values = true, value_delimiter = ';')]
    pub agent_token: Vec<String>,
    /// Delay before each attempt: attempt 1 after publishing, then after each failure.
    #[arg(long, env = "HERALD_RETRY_SCHEDULE", default_value = "0s,1m,5m,30m,2h,8h")]
    pub retry_schedule: RetrySchedule,
    /// The longest a `Retry-After` answer may push an attempt back.
    #[arg(long, env = "HERALD_RETRY_AFTER_MAX", default_value = "24h", value_parser = humantime::parse_duration)]
    pub retry_after_max: Duration,
    /// How long past the webhook's timeout a lease lasts before the delivery is dispatched again.
    #[arg(long, env = "HERALD_LEASE_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub lease_grace: Duration,
    /// How long a publish may wait on a write that makes no progress (no statement finishes)
    /// before it is answered `UNAVAILABLE`. A large write that keeps moving is waited for.
    #[arg(long, env = "HERALD_PUBLISH_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub publish_timeout: Duration,
    /// How long a write may go without progress before it is rolled back and its callers told the
    /// outcome is unknown: a publish write moves with each statement that finishes, any other
    /// write with each operation of its batch. A publish that keeps moving is waited for.
    #[arg(long, env = "HERALD_WRITE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub write_timeout: Duration,
    /// At shutdown, how long connected agents are given to finish the jobs they hold and report
    /// them before the control plane stops; what is still running then is reported to the
    /// next control plane the agent reaches. (Not the agent's own `--drain-timeout`.)
    #[arg(long, env = "HERALD_AGENT_DRAIN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub agent_drain_timeout: Duration,
    /// How long the old secret keeps signing after a rotation.
    #[arg(long, env = "HERALD_ROTATION_GRACE", default_value = "24h", value_parser = humantime::parse_duration)]
    pub rotation_grace: Duration,
    /// Events, deliveries and attempts older than this are pruned.
    #[arg(long, env = "HERALD_RETENTION", default_value = "30d", value_parser = humantime::parse_duration)]
    pub retention: Duration,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// PEM certificate of the gRPC server (TLS).
    #[arg(long, env = "HERALD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the gRPC server.
    #[arg(long, env = "HERALD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA of agents' client certificates; when set, agents must present one (mTLS).
    #[arg(long, env = "HERALD_CLIENT_CA", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// Accept plain `http://` webhook URLs (development only).
    #[arg(long, env = "HERALD_ALLOW_HTTP")]
    pub allow_http: bool,
    /// Accept webhook URLs whose host is a literal address in these ranges (by default every
    /// literal non-global address is refused). Agents guard egress with their own `--allow-cidr`.
    #[arg(long, env = "HERALD_ALLOW_CIDR", value_delimiter = ',')]
    pub allow_cidr: Vec<ipnet::IpNet>,
    /// Prefix of Herald's delivery headers.
    #[arg(long, env = "HERALD_HEADER_PREFIX", default_value = "X-CloudThinker")]
    pub header_prefix: String,
    /// Response bodies are stored up to this many bytes (at most 65536).
    #[arg(long, env = "HERALD_RESPONSE_BODY_LIMIT", default_value_t = 4096)]
    pub response_body_limit: usize,
}

#[derive(Args, Clone)]
pub struct DevArgs {
    /// Address of the gRPC API.
    #[arg(long, env = "HERALD_GRPC_ADDR", default_value = "127.0.0.1:7070")]
    pub grpc_addr: SocketAddr,
    /// Address of the `/healthz` and `/readyz` probes.
    #[arg(long, env = "HERALD_HTTP_ADDR", default_value = "127.0.0.1:9090")]
    pub http_addr: SocketAddr,
    /// Folder of the SQLite database, key file and secret key.
    #[arg(long, env = "HERALD_DEV_DIR", default_value = ".")]
    pub dir: PathBuf,
}

/// Validated configuration of a control plane.
#[derive(Clone)]
pub struct Config {
    pub database_url: String,
    pub bootstrap_api_key: Option<String>,
    pub bootstrap_workspace: String,
    pub agent_tokens: Vec<AgentToken>,
    pub retry_schedule: RetrySchedule,
    pub retry_after_max: Duration,
    pub lease_grace: Duration,
    pub publish_timeout: Duration,
    pub write_timeout: Duration,
    pub agent_drain_timeout: Duration,
    pub rotation_grace: Duration,
    pub retention: Duration,
    pub secret_key: SecretKey,
    pub tls: Option<TlsFiles>,
    pub allow_http: bool,
    pub allow_cidr: Vec<ipnet::IpNet>,
    pub header_prefix: String,
    pub response_body_limit: usize,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &redact_url(&self.database_url))
            .field("bootstrap_api_key", &self.bootstrap_api_key.as_ref().map(|_| "***"))
            .field("bootstrap_workspace", &self.bootstrap_workspace)
            .field("agent_tokens", &self.agent_tokens.len())
            .field("retry_schedule", &self.retry_schedule.to_string())
            .field("lease_grace", &self.lease_grace)
            .field("publish_timeout", &self.publish_timeout)
            .field("write_timeout", &self.write_timeout)
            .field("agent_drain_timeout", &self.agent_drain_timeout)
            .field("rotation_grace", &self.rotation_grace)
            .field("retention", &self.retention)
            .field("tls", &self.tls.is_some())
            .field("allow_http", &self.allow_http)
            .field("header_prefix", &self.header_prefix)
            .finish_non_exhaustive()
    }
}

/// Paths of the gRPC server's TLS material.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// An agent token and the zones it may serve (`None`: every zone).
#[derive(Clone)]
pub struct AgentToken {
    pub token: String,
    pub zones: Option<Vec<String>>,
}

impl std::fmt::Debug for AgentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentToken").field("token", &"***").field("zones", &self.zones).finish()
    }
}

/// A flag that does not make sense.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--secret-key is required: 32 bytes in base64 (generate one with `head -c32 /dev/urandom | base64`)")]
    MissingSecretKey,
    #[error("--secret-key: {0}")]
    SecretKey(String),
    #[error("--agent-token: {0}")]
    AgentToken(String),
    #[error("--response-body-limit must be at most 65536")]
    BodyLimit,
    #[error("--bootstrap-workspace: {0}")]
    Workspace(String),
    #[error("--header-prefix must be a valid header name prefix such as X-Acme")]
    HeaderPrefix,
    #[error("--publish-timeout must be at least 1ms")]
    PublishTimeout,
    #[error("--write-timeout must be at least 1ms")]
    WriteTimeout,
}

impl TryFrom<ServeArgs> for Config {
    type Error = ConfigError;

    fn try_from(a: ServeArgs) -> Result<Self, ConfigError> {
        let secret_key = a.keys.keyring()?;
        let agent_tokens = a.agent_token.iter().map(|t| parse_agent_token(t)).collect::<Result<Vec<_>, _>>()?;
        if a.response_body_limit > 65536 {
            return Err(ConfigError::BodyLimit);
        }
        crate::auth::validate_workspace_id(&a.bootstrap_workspace).map_err(ConfigError::Workspace)?;
        if a.header_prefix.is_empty()
            || !a.header_prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            || a.header_prefix.len() > 64
        {
            return Err(ConfigError::HeaderPrefix);
        }
        if a.publish_timeout < Duration::from_millis(1) {
            return Err(ConfigError::PublishTimeout);
        }
        if a.write_timeout < Duration::from_millis(1) {
            return Err(ConfigError::WriteTimeout);
        }
        let tls = match (a.tls_cert, a.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key, client_ca: a.client_ca }),
            _ => None,
        };
        Ok(Config {
            database_url: a.db.database_url,
            bootstrap_api_key: a.bootstrap_api_key.filter(|k| !k.is_empty()),
            bootstrap_workspace: a.bootstrap_workspace,
            agent_tokens,
            retry_schedule: a.retry_schedule,
            retry_after_max: a.retry_after_max,
            lease_grace: a.lease_grace,
            publish_timeout: a.publish_timeout,
            write_timeout: a.write_timeout,
            agent_drain_timeout: a.agent_drain_timeout,
            rotation_grace: a.rotation_grace,
            retention: a.retention,
            secret_key,
            tls,
            allow_http: a.allow_http,
            allow_cidr: a.allow_cidr,
            header_prefix: a.header_prefix,
            response_body_limit: a.response_body_limit,
        })
    }
}

fn parse_agent_token(raw: &str) -> Result<AgentToken, ConfigError> {
    let (token, zones) = match raw.split_once(':') {
        Some((token, zones)) => {
            let zones: Vec<String> =
                zones.split(',').map(str::trim).filter(|z| !z.is_empty()).map(String::from).collect();
            if zones.is_empty() {
                return Err(ConfigError::AgentToken("a token with `:` must name at least one zone".into()));
            }
            (token, Some(zones))
        }
        None => (raw, None),
    };
    if token.len() < 16 {
        return Err(ConfigError::AgentToken("a token must be at least 16 characters".into()));
    }
    Ok(AgentToken { token: token.to_owned(), zones })
}

/// A database URL without its password, for logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

impl Config {
    /// A configuration for tests: the given database, a fixed secret key, plain `http` allowed.
    pub fn for_tests(database_url: impl Into<String>) -> Self {
        Config {
            database_url: database_url.into(),
            bootstrap_api_key: None,
            bootstrap_workspace: "ws_default".into(),
            agent_tokens: Vec::new(),
            retry_schedule: RetrySchedule::default(),
            retry_after_max: Duration::from_secs(24 * 3600),
            lease_grace: Duration::from_secs(10),
            publish_timeout: crate::db::PUBLISH_TIMEOUT,
            write_timeout: crate::store::writer::WRITE_TIMEOUT,
            // Sessions a test leaves open do not hold its control plane's stop for long.
            agent_drain_timeout: Duration::from_secs(2),
            rotation_grace: Duration::from_secs(24 * 3600),
            retention: Duration::from_secs(30 * 24 * 3600),
            secret_key: SecretKey::from_bytes([7u8; 32]),
            tls: None,
            allow_http: true,
            allow_cidr: crate::config::loopback(),
            header_prefix: "X-CloudThinker".into(),
            response_body_limit: 4096,
        }
    }
}

/// The loopback ranges, IPv4 and IPv6: what `herald dev` and the tests open for local receivers.
pub fn loopback() -> Vec<ipnet::IpNet> {
    ["127.0.0.0/8", "::1/128"].iter().map(|r| r.parse().expect("a valid range")).collect()
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    /// Every flag of the commands that run or manage a control plane has an environment twin
    /// (`--database-url` ↔ `HERALD_DATABASE_URL`), as containers and Helm charts set them; the
    /// client commands take `--addr` and `--api-key` from theirs. `--help` and `--version` aside.
    #[test]
    fn every_flag_has_an_environment_twin() {
        use clap::CommandFactory as _;
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_positional() || ["help", "version"].contains(&id) || arg.get_env().is_some() {
                    continue;
                }
                missing.push(format!("{path} --{}", arg.get_long().unwrap_or(id)));
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let cli = Cli::command();
        let mut missing = Vec::new();
        for name in ["serve", "dev", "migrate", "keys"] {
            walk(cli.find_subcommand(name).expect(name), name, &mut missing);
        }
        assert!(missing.is_empty(), "flags without an environment twin: {missing:?}");
    }

    /// `herald serve` with `flags`, validated as the server would.
    fn serve(flags: &[&str]) -> Result<Config, ConfigError> {
        let key = format!("{}=", "A".repeat(43));
        let args =
            [&["herald", "serve", "--database-url", "sqlite://herald.db", "--secret-key", &key][..], flags].concat();
        let Command::Serve(a) = Cli::try_parse_from(args).expect("flags parse").command else { unreachable!() };
        Config::try_from(*a)
    }

    #[test]
    fn the_publish_and_write_timeouts_are_read_and_checked() {
        let c = serve(&[]).expect("defaults are valid");
        assert_eq!(
            (c.publish_timeout, c.write_timeout),
            (crate::db::PUBLISH_TIMEOUT, crate::store::writer::WRITE_TIMEOUT)
        );
        let c = serve(&["--publish-timeout", "250ms", "--write-timeout", "2m"]).unwrap();
        assert_eq!((c.publish_timeout, c.write_timeout), (Duration::from_millis(250), Duration::from_secs(120)));
        let zero = serve(&["--write-timeout", "0s"]).expect_err("refused");
        assert!(zero.to_string().contains("--write-timeout"), "{zero}");
        let zero = serve(&["--publish-timeout", "0s"]).expect_err("refused");
        assert!(zero.to_string().contains("--publish-timeout"), "{zero}");
    }
}
