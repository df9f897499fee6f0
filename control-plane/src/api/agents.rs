//! `herald.v1.AgentService`. The agent session itself arrives with the delivery pipeline; until
//! then `Session` authenticates the agent's token and answers UNIMPLEMENTED, and `ListAgents`
//! answers UNIMPLEMENTED.

use herald_shared::proto::{self, agent_service_server::AgentService};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Scope;
use crate::config::AgentToken;
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

#[tonic::async_trait]
impl AgentService for AgentApi {
    type SessionStream = ReceiverStream<Result<proto::ControlMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<proto::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        agent_token(&self.state.config.agent_tokens, &request)?;
        Err(Status::unimplemented("agent sessions arrive with the delivery pipeline"))
    }

    async fn list_agents(
        &self,
        request: Request<proto::ListAgentsRequest>,
    ) -> Result<Response<proto::ListAgentsResponse>, Status> {
        self.state.auth.check(&request, Scope::Admin).await?;
        Err(Status::unimplemented("ListAgents arrives with the delivery pipeline"))
    }
}
