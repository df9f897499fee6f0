//! `herald.v1.DeliveryService`: delivery logs and manual actions.

use std::collections::HashMap;

use herald_shared::proto::{self, delivery_service_server::DeliveryService};
use herald_shared::{catalog, ids};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{FieldError, detached, page, status_of, timestamp};
use crate::auth::Scope;
use crate::db::entity::attempt;
use crate::db::entity::delivery::{self, status};
use crate::dispatch::{Change, Dispatcher};
use crate::server::AppState;

/// How often a watch asks again whether the key it was opened with still holds.
const WATCH_KEY_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);
/// The longest a watch waits for that answer before it goes on and asks again next time.
const WATCH_KEY_LOOKUP: std::time::Duration = std::time::Duration::from_millis(250);
use crate::store::deliveries::DeliveryFilter;

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

/// The stored statuses a status filter selects (none: every status).
fn statuses(v: i32, field: &str) -> Result<Vec<i16>, FieldError> {
    Ok(match proto::DeliveryStatus::try_from(v) {
        Ok(proto::DeliveryStatus::Unspecified) => vec![],
        Ok(proto::DeliveryStatus::Pending) => vec![status::PENDING, status::PARKED],
        Ok(proto::DeliveryStatus::InFlight) => vec![status::IN_FLIGHT],
        Ok(proto::DeliveryStatus::Succeeded) => vec![status::SUCCEEDED],
        Ok(proto::DeliveryStatus::Failed) => vec![status::FAILED],
        Ok(proto::DeliveryStatus::Cancelled) => vec![status::CANCELLED],
        Err(_) => return Err(FieldError::new(field, format!("{v} is not a DeliveryStatus value"))),
    })
}

fn millis(t: &prost_types::Timestamp, field: &str) -> Result<i64, FieldError> {
    if !(0..1_000_000_000).contains(&t.nanos) || t.seconds < 0 || t.seconds > 253_402_300_799 {
        return Err(FieldError::new(field, "is not a valid time"));
    }
    Ok(t.seconds * 1000 + i64::from(t.nanos / 1_000_000))
}

fn webhook_filter(id: &str, field: &str) -> Result<Option<String>, FieldError> {
    if id.is_empty() {
        return Ok(None);
    }
    super::webhooks::webhook_id(id, field)?;
    Ok(Some(id.to_owned()))
}

fn event_type_filter(t: &str, field: &str) -> Result<Option<String>, FieldError> {
    if t.is_empty() {
        return Ok(None);
    }
    catalog::find(t).ok_or_else(|| FieldError::new(field, format!("{t:?} is not an event type")))?;
    Ok(Some(t.to_owned()))
}

/// The filters `ListDeliveries` and `WatchDeliveries` share.
fn filter(
    webhook_id: &str,
    status: i32,
    event_type: &str,
    created_after: Option<&prost_types::Timestamp>,
    created_before: Option<&prost_types::Timestamp>,
) -> Result<DeliveryFilter, FieldError> {
    let created_after = created_after.map(|t| millis(t, "created_after")).transpose()?;
    let created_before = created_before.map(|t| millis(t, "created_before")).transpose()?;
    if let (Some(a), Some(b)) = (created_after, created_before)
        && a >= b
    {
        return Err(FieldError::new("created_before", "must be later than created_after"));
    }
    Ok(DeliveryFilter {
        webhook_id: webhook_filter(webhook_id, "webhook_id")?,
        statuses: statuses(status, "status")?,
        event_type: event_type_filter(event_type, "event_type")?,
        created_after,
        created_before,
    })
}

fn delivery_id(id: &str) -> Result<(), FieldError> {
    if ids::has_prefix(id, ids::DELIVERY) {
        Ok(())
    } else {
        Err(FieldError::new("id", "is not a delivery id (dlv_…)"))
    }
}

fn json_map(text: &str) -> HashMap<String, String> {
    serde_json::from_str::<HashMap<String, serde_json::Value>>(text)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
        .collect()
}

fn attempt_to_proto(a: &attempt::Model) -> proto::Attempt {
    proto::Attempt {
        number: a.number as u32,
        agent_id: a.agent_id.clone(),
        zone: a.zone.clone(),
        started_at: Some(timestamp(a.started_at)),
        duration: Some(prost_types::Duration {
            seconds: a.duration_ms / 1000,
            nanos: ((a.duration_ms % 1000) * 1_000_000) as i32,
        }),
        request_headers: json_map(&a.request_headers),
        request_body: a.request_body.clone().unwrap_or_default(),
        response_status: a.response_status as u32,
        response_headers: json_map(&a.response_headers),
        response_body: a.response_body.clone(),
        error_kind: a.error_kind,
        error_message: a.error_message.clone(),
        stale: a.stale,
        manual: a.manual,
    }
}

/// The API view of a delivery, with `attempts` when given; the dispatcher says whether its zone
/// has an agent.
pub fn delivery_to_proto(d: &delivery::Model, attempts: &[attempt::Model], dispatcher: &Dispatcher) -> proto::Delivery {
    let open = d.status == status::PENDING || d.status == status::PARKED;
    proto::Delivery {
        id: d.id.clone(),
        event_id: d.event_id.clone(),
        webhook_id: d.webhook_id.clone(),
        event_type: d.event_type.clone(),
        status: status_to_proto(d.status) as i32,
        attempts: attempts.iter().map(attempt_to_proto).collect(),
        attempt_count: d.attempt_count as u32,
        next_attempt_at: open.then(|| timestamp(d.next_attempt_at)),
        created_at: Some(timestamp(d.created_at)),
        updated_at: Some(timestamp(d.updated_at)),
        paused: d.status == status::PARKED,
        zone: d.zone.clone(),
        test: d.test,
        waiting_for_agent: d.status == status::PENDING && !dispatcher.zone_served(&d.zone),
    }
}

#[tonic::async_trait]
impl DeliveryService for DeliveryApi {
    async fn list_deliveries(
        &self,
        request: Request<proto::ListDeliveriesRequest>,
    ) -> Result<Response<proto::ListDeliveriesResponse>, Status> {
        let who = self.state.auth.check(&request, Scope::Admin).await?;
        let r = request.get_ref();
        let filter =
            filter(&r.webhook_id, r.status, &r.event_type, r.created_after.as_ref(), r.created_before.as_ref())?;
        let size = page::size(r.page_size)?;
        let before = page::after(&r.page_token)?;
        let (rows, more) = self
            .state
            .store
            .list_deliveries(&who.workspace, &filter, before.as_deref(), size)
            .await
            .map_err(status_of)?;
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => page::token(&last.id),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListDeliveriesResponse {
            deliveries: rows.iter().map(|d| delivery_to_proto(d, &[], &self.state.dispatcher)).collect(),
            next_page_token,
        }))
    }

    async fn get_delivery(
        &self,
        request: Request<proto::GetDeliveryRequest>,
    ) -> Result<Response<proto::Delivery>, Status> {
        let who = self.state.auth.check(&request, Scope::Admin).await?;
        let id = &request.get_ref().id;
        delivery_id(id)?;
        let (d, attempts) = self.state.store.get_delivery(&who.workspace, id).await.map_err(status_of)?;
        Ok(Response::new(delivery_to_proto(&d, &attempts, &self.state.dispatcher)))
    }

    async fn retry_delivery(
        &self,
        request: Request<proto::RetryDeliveryRequest>,
    ) -> Result<Response<proto::Delivery>, Status> {
        let who = self.state.auth.check(&request, Scope::Admin).await?;
        let id = request.into_inner().id;
        delivery_id(&id)?;
        let (state, workspace) = (self.state.clone(), who.workspace);
        let d = detached(async move {
            let d = state.store.retry_delivery(&workspace, &id).await.map_err(|e| match e {
                crate::store::StoreError::Invalid { message, .. } => Status::failed_precondition(message),
                other => status_of(other),
            })?;
            state.dispatcher.changed(vec![d.id.clone()]);
            state.dispatcher.wake();
            Ok(d)
        })
        .await?;
        tracing::info!(delivery = %d.id, "manual retry requested");
        Ok(Response::new(delivery_to_proto(&d, &[], &self.state.dispatcher)))
    }

    async fn replay_webhook(
        &self,
        request: Request<proto::ReplayWebhookRequest>,
    ) -> Result<Response<proto::ReplayWebhookResponse>, Status> {
        let who = self.state.auth.check(&request, Scope::Admin).await?;
        let r = request.get_ref();
        super::webhooks::webhook_id(&r.webhook_id, "webhook_id")?;
        let after = r
            .created_after
            .as_ref()
            .ok_or_else(|| FieldError::new("created_after", "is required"))
            .and_then(|t| millis(t, "created_after"))?;
        let before = match &r.created_before {
            Some(t) => millis(t, "created_before")?,
            None => crate::store::now_millis() + 1,
        };
        if after >= before {
            return Err(FieldError::new("created_before", "must be later than created_after").into());
        }
        let (state, workspace, hook, include_all) =
            (self.state.clone(), who.workspace, r.webhook_id.clone(), r.include_all);
        let queued = detached(async move {
            let reopened =
                state.store.replay_webhook(&workspace, &hook, after, before, include_all).await.map_err(status_of)?;
            let queued = reopened.count;
            state.dispatcher.changed_many(&workspace, &hook, reopened);
            state.dispatcher.wake();
            Ok(queued)
        })
        .await?;
        tracing::info!(webhook = %r.webhook_id, queued, "replay queued");
        Ok(Response::new(proto::ReplayWebhookResponse { queued }))
    }

    type WatchDeliveriesStream = ReceiverStream<Result<proto::DeliveryChange, Status>>;

    async fn watch_deliveries(
        &self,
        request: Request<proto::WatchDeliveriesRequest>,
    ) -> Result<Response<Self::WatchDeliveriesStream>, Status> {
        let who = self.state.auth.check(&request, Scope::Admin).await?;
        let key = crate::auth::bearer(&request)?.to_owned();
        let r = request.get_ref();
        let filter =
            filter(&r.webhook_id, r.status, &r.event_type, r.created_after.as_ref(), r.created_before.as_ref())?;
        let mut changes = self.state.dispatcher.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let shutdown = self.state.shutdown.clone();
        let auth = self.state.auth.clone();
        let dispatcher = self.state.dispatcher.clone();
        tokio::spawn(async move {
            // The key is asked for again as the watch goes on: a key revoked meanwhile ends it
            // (as soon as this control plane hears of the revocation: at once on PostgreSQL, when
            // its cached acceptance lapses on SQLite).
            let mut recheck = tokio::time::interval(WATCH_KEY_RECHECK);
            recheck.tick().await;
            loop {
                let change = tokio::select! {
                    c = changes.recv() => c,
                    // Bounded: while the key is looked up, changes wait in the broadcast.
                    _ = recheck.tick() => match tokio::time::timeout(WATCH_KEY_LOOKUP, auth.check_key(&key, Scope::Admin)).await {
                        Ok(Ok(now)) if now.workspace == who.workspace => continue,
                        Ok(Ok(_)) => {
                            let _ = tx.send(Err(Status::unauthenticated("the API key changed workspace"))).await;
                            return;
                        }
                        Ok(Err(s)) if s.code() == tonic::Code::Unauthenticated || s.code() == tonic::Code::PermissionDenied => {
                            let _ = tx.send(Err(s)).await;
                            return;
                        }
                        // The database is slow or away: the key is asked for again next time.
                        _ => continue,
                    },
                    _ = tx.closed() => return,
                    _ = shutdown.cancelled() => return,
                };
                match change {
                    Ok(Change::Row(d)) if d.workspace_id == who.workspace && filter.matches(&d) => {
                        let msg = proto::DeliveryChange { delivery: Some(delivery_to_proto(&d, &[], &dispatcher)) };
                        if tx.send(Ok(msg)).await.is_err() {
                            return;
                        }
                    }
                    // Too many to send one by one: the watcher is told to list, as one that
                    // fell behind is (other statuses, types and ages may be among them).
                    Ok(Change::Many { workspace, webhook, count })
                        if workspace == who.workspace && filter.webhook_id.as_ref().is_none_or(|w| *w == webhook) =>
                    {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "{count} deliveries of webhook {webhook} changed at once (a pause, a zone change, a \
                                 deletion or a replay), more than a watch is sent one by one; list to catch up"
                            ))))
                            .await;
                        return;
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "{n} changes were dropped: this watcher fell behind; list to catch up"
                            ))))
                            .await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
