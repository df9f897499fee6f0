//! `herald.v1.AgentService`. The delivery pipeline issue implements the agent session; until then
//! `Session` and `ListAgents` answer UNIMPLEMENTED.

use herald_shared::proto::{self, agent_service_server::AgentService};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Scope;
use crate::server::AppState;

pub struct AgentApi {
    pub state: AppState,
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    type SessionStream = ReceiverStream<Result<proto::ControlMessage, Status>>;

    async fn session(
        &self,
        _request: Request<Streaming<proto::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
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
