//! Wiring: opens the database, migrates, and serves the gRPC API (with health and reflection) and
//! the HTTP probes until the shutdown token fires.

use std::sync::Arc;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use herald_shared::proto;
use proto::agent_service_server::AgentServiceServer;
use proto::delivery_service_server::DeliveryServiceServer;
use proto::event_service_server::EventServiceServer;
use proto::webhook_service_server::WebhookServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::api::agents::AgentApi;
use crate::api::deliveries::DeliveryApi;
use crate::api::events::EventApi;
use crate::api::validate::Rules;
use crate::api::webhooks::WebhookApi;
use crate::auth::{Authenticator, Scope};
use crate::config::Config;
use crate::db;
use crate::store::Store;

/// The largest gRPC message accepted: a full `PublishEvents` batch fits.
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// What every handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub dispatcher: crate::dispatch::Dispatcher,
    /// Fires at shutdown: long-lived streams end so the server can stop (agent sessions once
    /// their agents have drained, or at `--agent-drain-timeout`).
    pub shutdown: CancellationToken,
    pub auth: Authenticator,
    pub config: Arc<Config>,
    pub rules: Rules,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Runs a control plane on the given listeners until `shutdown` is cancelled, then stops
/// accepting calls, lets running ones finish, and closes the database.
pub async fn run(
    config: Config,
    grpc: TcpListener,
    http: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // SQLite serves one control plane: a second one dispatching from the same file would
    // double-send. The lock lives as long as this function.
    let _single = match db::sqlite_path(&config.database_url) {
        Some(path) => Some(db::lock_single_server(&path)?),
        None => None,
    };
    let db = db::connect(&config.database_url)
        .await
        .with_context(|| format!("cannot open the database {}", crate::config::redact_url(&config.database_url)))?;
    db::migrate(&db).await.context("cannot migrate the database")?;
    let sync = db::sync_setting(&db).await.unwrap_or_default();
    tracing::info!(%sync, "database ready");

    let store = Store::with_write_timeout(db.clone(), config.secret_key.clone(), config.write_timeout);
    if let Some(key) = &config.bootstrap_api_key {
        store
            .put_api_key(&config.bootstrap_workspace, key, Scope::Admin)
            .await
            .context("cannot store the bootstrap API key")?;
    }
    let policy = crate::store::queue::policy_from(
        config.retry_schedule.clone(),
        config.lease_grace,
        config.retry_after_max,
        config.response_body_limit,
    );
    tokio::spawn(retention_loop(store.clone(), config.retention, shutdown.clone()));
    let metrics = Arc::new(crate::metrics::Metrics::new(store.writer.commits.clone()));
    let dispatcher = crate::dispatch::Dispatcher::spawn(
        store.clone(),
        policy,
        config.header_prefix.clone(),
        config.response_body_limit,
        metrics.clone(),
        shutdown.clone(),
    );
    // Stops the result writer on any way out of here, should `finish` below not be reached.
    let _results = dispatcher.results_guard();
    let auth = Authenticator::new(store.clone());
    if let Some(pool) = (store.db.get_database_backend() == sea_orm::DbBackend::Postgres)
        .then(|| store.db.get_postgres_connection_pool().clone())
    {
        tokio::spawn(wake_on_notify(pool, dispatcher.clone(), auth.clone(), shutdown.clone()));
    }
    let state = AppState {
        metrics,
        dispatcher,
        shutdown: shutdown.clone(),
        auth,
        store,
        rules: Rules {
            allow_http: config.allow_http,
            allow_cidr: config.allow_cidr.clone(),
            header_prefix: config.header_prefix.clone(),
        },
        config: Arc::new(config),
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<WebhookServiceServer<WebhookApi>>().await;
    health.set_serving::<EventServiceServer<EventApi>>().await;
    health.set_serving::<DeliveryServiceServer<DeliveryApi>>().await;
    health.set_serving::<AgentServiceServer<AgentApi>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().context("reflection v1")?;
    let reflection_v1alpha = reflection().build_v1alpha().context("reflection v1alpha")?;

    let mut builder = Server::builder();
    if let Some(tls) = &state.config.tls {
        let cert = std::fs::read(&tls.cert).with_context(|| format!("cannot read {}", tls.cert.display()))?;
        let key = std::fs::read(&tls.key).with_context(|| format!("cannot read {}", tls.key.display()))?;
        let mut tls_config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        if let Some(ca) = &tls.client_ca {
            let ca = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
            // API clients (backends, grpcurl) need no certificate; agent sessions are the ones
            // that must present one signed by this CA.
            tls_config = tls_config.client_ca_root(Certificate::from_pem(ca)).client_auth_optional(true);
        }
        builder = builder.tls_config(tls_config).context("invalid TLS configuration")?;
    }

    let http_task = match http {
        Some(listener) => {
            let app = axum::Router::new()
                .route("/healthz", get(|| async { "ok" }))
                .route("/readyz", get(readyz))
                .route("/metrics", get(metrics_page))
                .with_state(state.clone());
            let token = shutdown.clone();
            Some(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(token.cancelled_owned()).await {
                    tracing::error!(error = %e, "HTTP server failed");
                }
            }))
        }
        None => None,
    };

    let router = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            WebhookServiceServer::new(WebhookApi { state: state.clone() }).max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(EventServiceServer::new(EventApi { state: state.clone() }).max_decoding_message_size(MAX_MESSAGE))
        .add_service(
            DeliveryServiceServer::new(DeliveryApi { state: state.clone() }).max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(AgentServiceServer::new(AgentApi { state: state.clone() }).max_decoding_message_size(MAX_MESSAGE));

    tracing::info!("control plane serving");
    let served = router.serve_with_incoming_shutdown(incoming(grpc), shutdown.cancelled()).await;
    // Agents are asked to drain (here too if the server stopped on an error rather than the
    // token): what they report until their sessions end is recorded before the database closes.
    shutdown.cancel();
    state.dispatcher.finish(state.config.agent_drain_timeout + std::time::Duration::from_secs(1)).await;
    if let Some(task) = http_task {
        let _ = task.await;
    }
    drop(state);
    db.close().await.ok();
    tracing::info!("control plane stopped");
    served.context("gRPC server failed")
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    match tokio::time::timeout(db::ACQUIRE_TIMEOUT, db::ping(&state.store.db)).await {
        Ok(Ok(())) => (StatusCode::OK, "ready"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable"),
    }
}

/// The Prometheus exposition, with the queue read from the database and the agents from the
/// dispatcher at scrape time.
async fn metrics_page(
    State(state): State<AppState>,
) -> (StatusCode, [(axum::http::HeaderName, &'static str); 1], String) {
    use crate::metrics::{StatusLabels, ZoneLabels};
    let m = &state.metrics;
    let now = crate::store::now_millis();
    match tokio::time::timeout(db::ACQUIRE_TIMEOUT, state.store.queue_stats(now)).await {
        Ok(Ok((counts, oldest))) => {
            m.queue_depth.clear();
            for (status, n) in counts {
                let status = match status {
                    crate::db::entity::delivery::status::IN_FLIGHT => "in_flight",
                    crate::db::entity::delivery::status::PARKED => "paused",
                    _ => "pending",
                }
                .to_owned();
                m.queue_depth.get_or_create(&StatusLabels { status }).set(n);
            }
            let age = oldest.map_or(0, |t| (now - t).max(0) / 1000);
            m.oldest_pending_seconds.set(age);
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot read the queue for /metrics"),
        Err(_) => tracing::warn!("reading the queue for /metrics timed out"),
    }
    m.agents_connected.clear();
    let mut zones = state.dispatcher.zones();
    if let Ok(Ok(named)) = tokio::time::timeout(db::ACQUIRE_TIMEOUT, state.store.webhook_zones()).await {
        for zone in named {
            zones.entry(zone).or_insert(0);
        }
    }
    for (zone, n) in zones {
        m.agents_connected.get_or_create(&ZoneLabels { zone }).set(n);
    }
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    (StatusCode::OK, [(axum::http::header::CONTENT_TYPE, content_type)], m.encode())
}

/// The gRPC listener's connections, each with `TCP_NODELAY` (as tonic sets on connections it
/// accepts itself). Jobs, results and answers are small HTTP/2 frames: with Nagle's algorithm, a
/// frame sent while the one before it was unacknowledged waited for the peer's delayed ACK, up to
/// 40 ms on Linux. That was the p99 of publish-to-receipt latency (`docs/BENCHMARKS.md`).
fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Prunes what `--retention` no longer keeps, in batches, every quarter of the retention period
/// (between 100 ms and a minute), with a pause between batches so that dispatch goes on.
async fn retention_loop(store: Store, retention: std::time::Duration, shutdown: CancellationToken) {
    const BATCH: u64 = 500;
    let every = (retention / 4).clamp(std::time::Duration::from_millis(100), std::time::Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let cutoff = crate::store::now_millis() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        match store.prune_all(cutoff, BATCH, std::time::Duration::from_millis(5), &shutdown).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(events = pruned, "pruned events older than the retention period"),
            Err(e) => tracing::warn!(error = %e, "cannot prune old events; trying again later"),
        }
    }
}

/// Wakes the dispatcher when another replica on the same PostgreSQL queues deliveries or
/// finishes jobs (`NOTIFY herald_wake`), relays other replicas' delivery changes to this
/// replica's watchers (`herald_changes`), and makes the dispatcher forget a webhook another
/// replica changed or deleted (`herald_webhooks`), or every cached webhook when it (re)connects,
/// since changes announced meanwhile were lost; and drops a revoked API key from the cache of
/// accepted keys (`herald_keys`, or every cached key when it (re)connects). The listener
/// reconnects by itself; the
/// dispatcher's own timers remain the fallback while it cannot.
///
/// It also keeps [`crate::store::Peers`] true: every [`crate::store::PEER_HEARTBEAT`] it tells
/// the others this replica is there (`pg_notify('herald_wake', '<id>')`, which its own listener
/// hears back, proof that it is still listening), it notes every other replica it hears, and it
/// answers one it had not heard before with an announcement at once. On connecting it announces
/// itself and looks for work again a second later: a replica that had not heard of this one yet
/// may have queued work without waking it.
async fn wake_on_notify(
    pool: sea_orm::sqlx::PgPool,
    dispatcher: crate::dispatch::Dispatcher,
    auth: Authenticator,
    shutdown: CancellationToken,
) {
    use sea_orm::sqlx::postgres::PgListener;
    let peers = dispatcher.peers();
    let db = sea_orm::SqlxPostgresConnector::from_sqlx_postgres_pool(pool.clone());
    let announce = async || {
        if let Err(e) = sea_orm::ConnectionTrait::execute_raw(&db, peers.announcement()).await {
            tracing::debug!(error = %e, "cannot announce this replica to the others");
        }
    };
    loop {
        let listening = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener
                .listen_all([
                    crate::store::events::WAKE_CHANNEL,
                    crate::store::events::CHANGES_CHANNEL,
                    crate::store::webhooks::WEBHOOKS_CHANNEL,
                    crate::store::keys::KEYS_CHANNEL,
                ])
                .await?;
            peers.set_listening(true, crate::store::now_millis());
            // Webhook changes and key revocations announced while this one was not listening are
            // lost: what the dispatcher cached of webhooks, and the keys accepted, may be stale.
            dispatcher.forget_all();
            auth.forget_all();
            let mut heartbeat = tokio::time::interval(crate::store::PEER_HEARTBEAT);
            let catch_up = dispatcher.clone();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                catch_up.wake();
            });
            loop {
                let n = tokio::select! {
                    _ = heartbeat.tick() => {
                        announce().await;
                        continue;
                    }
                    n = listener.try_recv() => n?,
                };
                let now = crate::store::now_millis();
                let Some(n) = n else {
                    // The connection was lost, and the listener connected again and listens anew
                    // (sqlx does both before it answers `None`). Until a notification (its own
                    // heartbeat) arrives, this replica cannot know it is alone; webhook changes
                    // announced meanwhile were lost, and so were wake-ups.
                    peers.set_listening(false, now);
                    dispatcher.forget_all();
                    auth.forget_all();
                    continue;
                };
                // A revocation comes from `herald keys revoke`, not from a replica: the payload is
                // the key's hash.
                if n.channel() == crate::store::keys::KEYS_CHANNEL {
                    auth.forget(n.payload());
                    continue;
                }
                peers.set_listening(true, now);
                // `herald_wake` carries the sender's id; the others `<sender> <ids>`.
                let (from, ids) = match n.payload().split_once(' ') {
                    Some((from, ids)) if n.channel() != crate::store::events::WAKE_CHANNEL => (from, ids),
                    _ => (n.payload(), ""),
                };
                // Its own notifications (payload: its replica id) it has acted on already.
                if from == peers.id {
                    continue;
                }
                if peers.heard_from(from, now) {
                    announce().await;
                }
                match n.channel() {
                    crate::store::events::CHANGES_CHANNEL if !ids.is_empty() => {
                        dispatcher.heard_changes(ids);
                    }
                    crate::store::webhooks::WEBHOOKS_CHANNEL if !ids.is_empty() => dispatcher.forget(ids),
                    crate::store::events::WAKE_CHANNEL => dispatcher.wake(),
                    _ => {}
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), sea_orm::sqlx::Error>(())
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listening => if let Err(e) = r {
                peers.set_listening(false, crate::store::now_millis());
                tracing::warn!(error = %e, "cannot listen for other replicas' wake-ups; retrying");
            },
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;

    #[tokio::test]
    async fn grpc_connections_are_accepted_without_nagle() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = super::incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.expect("a connection").unwrap();
        assert!(accepted.nodelay().unwrap(), "an accepted gRPC connection has Nagle's algorithm on");
    }
}
