//! `herald.v1.DeliveryService`: delivery logs and manual actions. The delivery pipeline issue
//! implements these; until then they answer UNIMPLEMENTED after authenticating the caller.

use herald_shared::proto::{self, delivery_service_server::DeliveryService};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::Scope;
use crate::db::entity::delivery::status;
use crate::server::AppState;

pub struct DeliveryApi {
    pub state: AppState,
}

/// The API status of a stored delivery status (parked shows as pending, with `paused`).
pub fn status_to_proto(s: i16) -> proto::DeliveryStatus {
    match s {
        status::PENDING | status::PARKED => proto::DeliveryStatus::Pending,
        status::IN_FLIGHT => proto::DeliveryStatus::InFlight,
        status::SUCCEEDED => proto::DeliveryStatus::Succeeded,
        status::FAILED => proto::DeliveryStatus::Failed,
        status::CANCELLED => proto::DeliveryStatus::Cancelled,
        _ => proto::DeliveryStatus::Unspecified,
    }
}

fn later(rpc: &str) -> Status {
    Status::unimplemented(format!("{rpc} arrives with the delivery pipeline"))
}

#[tonic::async_trait]
impl DeliveryService for DeliveryApi {
    async fn list_deliveries(
        &self,
        request: Request<proto::ListDeliveriesRequest>,
    ) -> Result<Response<proto::ListDeliveriesResponse>, Status> {
        self.state.auth.check(&request, Scope::Admin).await?;
        Err(later("ListDeliveries"))
    }

    async fn get_delivery(
        &self,
        request: Request<proto::GetDeliveryRequest>,
    ) -> Result<Response<proto::Delivery>, Status> {
        self.state.auth.check(&request, Scope::Admin).await?;
        Err(later("GetDelivery"))
    }

    async fn retry_delivery(
        &self,
        request: Request<proto::RetryDeliveryRequest>,
    ) -> Result<Response<proto::Delivery>, Status> {
        self.state.auth.check(&request, Scope::Admin).await?;
        Err(later("RetryDelivery"))
    }

    async fn replay_webhook(
        &self,
        request: Request<proto::ReplayWebhookRequest>,
    ) -> Result<Response<proto::ReplayWebhookResponse>, Status> {
        self.state.auth.check(&request, Scope::Admin).await?;
        Err(later("ReplayWebhook"))
    }

    type WatchDeliveriesStream = ReceiverStream<Result<proto::DeliveryChange, Status>>;

    async fn watch_deliveries(
        &self,
        request: Request<proto::WatchDeliveriesRequest>,
    ) -> Result<Response<Self::WatchDeliveriesStream>, Status> {
        self.state.auth.check(&request, Scope::Admin).await?;
        Err(later("WatchDeliveries"))
    }
}
