//! `herald.v1.AgentService`: agent sessions and the list of connected agents.
//!
//! A session checks the agent's client certificate (when `--client-ca` asks for mTLS) and its
//! agent token, takes the agent's hello (the zone must be one the
//! token covers), answers a welcome, then relays credit and results to the dispatcher and jobs
//! and heartbeats back, until either side closes, the agent goes silent for three heartbeat
//! intervals, or the control plane shuts down (then it asks the agent to drain).

use std::time::Duration;

use futures::FutureExt as _;
use herald_shared::proto::{self, agent_message, agent_service_server::AgentService, control_message};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::FieldError;
use crate::auth::Scope;
use crate::config::AgentToken;
use crate::dispatch::HEARTBEAT;
use crate::server::AppState;

pub struct AgentApi {
    pub state: AppState,
}

/// The configured token an agent presents as `authorization: Bearer <token>`. Tokens are compared
/// through their SHA-256, so the comparison's timing says nothing about the token.
pub fn agent_token<'a, T>(tokens: &'a [AgentToken], request: &Request<T>) -> Result<&'a AgentToken, Status> {
    let presented = crate::auth::bearer(request)?;
    let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let want = digest(presented);
    tokens
        .iter()
        .find(|t| digest(&t.token).as_ref() == want.as_ref())
        .ok_or_else(|| Status::unauthenticated("unknown agent token"))
}

fn control(msg: control_message::Msg) -> Result<proto::ControlMessage, Status> {
    Ok(proto::ControlMessage { msg: Some(msg) })
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    type SessionStream = ReceiverStream<Result<proto::ControlMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<proto::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        // With `--client-ca`, TLS verified any certificate offered; an agent must offer one.
        if self.state.config.tls.as_ref().is_some_and(|t| t.client_ca.is_some())
            && request.peer_certs().is_none_or(|certs| certs.is_empty())
        {
            return Err(Status::unauthenticated(
                "this control plane requires agents to present a client certificate (mTLS): see --client-cert",
            ));
        }
        let token = agent_token(&self.state.config.agent_tokens, &request)?.clone();
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(15), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 15 s"))??;
        let hello = match first.and_then(|m| m.msg) {
            Some(agent_message::Msg::Hello(h)) => h,
            _ => return Err(FieldError::new("hello", "the first message of a session must be a hello").into()),
        };
        let zone = super::validate::zone(&hello.zone, "hello.zone")?;
        if hello.capacity == 0 {
            return Err(FieldError::new("hello.capacity", "must be at least 1").into());
        }
        if let Some(zones) = &token.zones
            && !zones.contains(&zone)
        {
            return Err(Status::permission_denied(format!("this agent token does not cover zone {zone:?}")));
        }
        // Credit never exceeds capacity, and the job channel below holds that much.
        let hello = proto::Hello { zone, capacity: hello.capacity.min(4096), ..hello };
        // Room for the agent's whole credit plus heartbeats: job sends never wait.
        let (tx, rx) = tokio::sync::mpsc::channel(hello.capacity as usize + 64);
        let dispatcher = self.state.dispatcher.clone();
        let (session, welcome) = dispatcher.open(&hello, tx.clone());
        tracing::info!(agent = %welcome.agent_id, zone = %hello.zone, capacity = hello.capacity, "agent connected");
        // The channel is new and has room. Nothing here waits between `open` and the task that
        // closes the session: a call dropped meanwhile (the agent gone) would leave the session
        // open for good, listed and counted as connected.
        let _ = tx.try_send(control(control_message::Msg::Welcome(welcome.clone())));
        let shutdown = self.state.shutdown.clone();
        let drain_timeout = self.state.config.agent_drain_timeout;
        let pending = hello.pending_results;
        tokio::spawn(async move {
            // Before any result of this session's own jobs.
            dispatcher.pending_results(session, pending).await;
            let mut beat = tokio::time::interval(HEARTBEAT);
            let silence = HEARTBEAT * 3;
            let mut last_heard = tokio::time::Instant::now();
            let mut reclaim = true;
            // Armed at shutdown: until then the agent finishes and reports the jobs it holds.
            let mut draining = false;
            let deadline = tokio::time::sleep(Duration::ZERO);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    msg = inbound.message() => match msg {
                        Ok(Some(m)) => {
                            last_heard = tokio::time::Instant::now();
                            match m.msg {
                                Some(agent_message::Msg::Credit(c)) => dispatcher.credit(session, c.jobs),
                                // While draining, a result writer that cannot keep up (a stalled
                                // database) does not hold the session past its deadline.
                                Some(agent_message::Msg::Result(r)) => tokio::select! {
                                    _ = dispatcher.result(session, r) => {}
                                    _ = &mut deadline, if draining => break,
                                },
                                _ => {}
                            }
                        }
                        // The agent has sent everything: its results are recorded, and it is told
                        // so, before its session ends (it keeps those it is not told of).
                        Ok(None) => {
                            // It reads no more jobs: none is sent to it meanwhile.
                            dispatcher.drain(session);
                            dispatcher.flush_results().await;
                            break;
                        }
                        Err(e) => {
                            tracing::info!(agent = %welcome.agent_id, error = %e, "agent session broke");
                            break;
                        }
                    },
                    _ = beat.tick() => {
                        if last_heard.elapsed() > silence {
                            tracing::warn!(agent = %welcome.agent_id, "agent went silent; closing its session");
                            break;
                        }
                        let now = chrono::Utc::now();
                        let hb = proto::Heartbeat { sent_at: Some(prost_types::Timestamp { seconds: now.timestamp(), nanos: 0 }) };
                        let _ = tx.try_send(control(control_message::Msg::Heartbeat(hb)));
                    }
                    // The agent is asked to drain, and its results are read until it has reported
                    // everything and ends its stream: what it reports here is recorded before the
                    // control plane stops, rather than lost with it and sent again once its lease
                    // expires. Its leases are not taken back: a job still running at the deadline
                    // is reported to the next control plane the agent reaches.
                    _ = shutdown.cancelled(), if !draining => {
                        dispatcher.drain(session);
                        let _ = tx.try_send(control(control_message::Msg::Drain(proto::Drain { reason: "control plane shutting down".into() })));
                        reclaim = false;
                        draining = true;
                        deadline.as_mut().reset(tokio::time::Instant::now() + drain_timeout);
                    }
                    _ = &mut deadline, if draining => {
                        // Results already received are taken; the agent keeps any it reports
                        // later for its next session.
                        while let Some(Ok(Some(m))) = inbound.message().now_or_never() {
                            if let Some(agent_message::Msg::Result(r)) = m.msg
                                && dispatcher.result(session, r).now_or_never().is_none()
                            {
                                break;
                            }
                        }
                        tracing::warn!(agent = %welcome.agent_id, "agent still busy at the drain timeout; closing its session");
                        break;
                    }
                }
            }
            dispatcher.close(session, reclaim).await;
            tracing::info!(agent = %welcome.agent_id, "agent disconnected");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_agents(
        &self,
        request: Request<proto::ListAgentsRequest>,
    ) -> Result<Response<proto::ListAgentsResponse>, Status> {
        self.state.auth.check(&request, Scope::Admin).await?;
        let zone = &request.get_ref().zone;
        if !zone.is_empty() {
            super::validate::zone(zone, "zone")?;
        }
        let agents = self.state.dispatcher.all_agents(zone).await;
        Ok(Response::new(proto::ListAgentsResponse { agents }))
    }
}
