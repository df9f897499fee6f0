//! `herald.v1.WebhookService`.

use std::time::Duration;

use herald_shared::proto::{self, webhook_service_server::WebhookService};
use herald_shared::{catalog, ids, signature};
use tonic::{Request, Response, Status};

use super::validate::{self, MASK};
use super::{FieldError, detached, json, page, status_of, timestamp};
use crate::auth::Scope;
use crate::server::AppState;
use crate::store::StoreError;
use crate::store::webhooks::Webhook;

pub struct WebhookApi {
    pub state: AppState,
}

/// The API view of a webhook: custom header values and transform variables masked, the secret
/// shown only when `show_secret` (create and rotate).
pub fn to_proto(w: &Webhook, show_secret: bool) -> proto::Webhook {
    let s = &w.spec;
    let now = crate::store::now_millis();
    proto::Webhook {
        id: w.id.clone(),
        name: s.name.clone(),
        url: s.url.clone(),
        events: s.events.clone(),
        secret: if show_secret { w.secret.clone() } else { String::new() },
        headers: s.headers.keys().map(|k| (k.clone(), MASK.to_owned())).collect(),
        active: Some(s.active),
        zone: s.zone.clone(),
        transform: s.transform.as_ref().map(json::from_json),
        transform_vars: s.transform_vars.keys().map(|k| (k.clone(), MASK.to_owned())).collect(),
        signature_scheme: s.signature_scheme,
        timeout: s
            .timeout_ms
            .map(|ms| prost_types::Duration { seconds: ms / 1000, nanos: ((ms % 1000) * 1_000_000) as i32 }),
        rate_limit_per_second: s.rate_limit_per_second.map(|v| v as u32),
        max_in_flight: s.max_in_flight.map(|v| v as u32),
        description: s.description.clone(),
        created_at: Some(timestamp(w.created_at)),
        updated_at: Some(timestamp(w.updated_at)),
        rotation_grace_ends_at: w.previous_secret_until.filter(|&until| until > now).map(timestamp),
    }
}

/// Checks that `id` looks like a webhook id, naming `field` otherwise.
pub fn webhook_id(id: &str, field: &str) -> Result<(), FieldError> {
    if id.is_empty() {
        return Err(FieldError::new(field, "is required"));
    }
    if !ids::has_prefix(id, ids::WEBHOOK) {
        return Err(FieldError::new(field, "is not a webhook id (wh_…)"));
    }
    Ok(())
}

#[tonic::async_trait]
impl WebhookService for WebhookApi {
    async fn create_webhook(
        &self,
        request: Request<proto::CreateWebhookRequest>,
    ) -> Result<Response<proto::Webhook>, Status> {
        let who = self.state.auth.check(&request, Scope::Admin).await?;
        let w = request.into_inner().webhook.ok_or_else(|| FieldError::new("webhook", "is required"))?;
        let spec = validate::new_spec(&w, &self.state.rules, "webhook")?;
        let secret = if w.secret.is_empty() {
            signature::generate_secret()
        } else {
            validate::secret(&w.secret, spec.signature_scheme, "webhook.secret")?;
            w.secret.clone()
        };
        let created = self.state.store.create_webhook(&who.workspace, spec, secret).await.map_err(status_of)?;
        tracing::info!(webhook = %created.id, workspace = %who.workspace, "webhook created");
        Ok(Response::new(to_proto(&created, true)))
    }

    async fn get_webhook(
        &self,
        request: Request<proto::GetWebhookRequest>,
    ) -> Result<Response<proto::Webhook>, Status> {
        let who = self.state.auth.check(&request, Scope::Admin).await?;
        let id = &request.get_ref().id;
        webhook_id(id, "id")?;
        let w = self.state.store.get_webhook(&who.workspace, id).await.map_err(status_of)?;
        Ok(Response::new(to_proto(&w, false)))
    }

    async fn list_webhooks(
        &self,
        request: Request<proto::ListWebhooksRequest>,
    ) -> Result<Response<proto::ListWebhooksResponse>, Status> {
        let who = self.state.auth.check(&request, Scope::Admin).await?;
        let r = request.get_ref();
        let size = page::size(r.page_size)?;
        let after = page::after(&r.page_token)?;
        let (hooks, more) =
            self.state.store.list_webhooks(&who.workspace, after.as_deref(), size).await.map_err(status_of)?;
        let next_page_token = match (more, hooks.last()) {
            (true, Some(last)) => page::token(&last.id),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListWebhooksResponse {
            webhooks: hooks.iter().map(|w| to_proto(w, false)).collect(),
            next_page_token,
        }))
    }

    async fn update_webhook(
        &self,
        request: Request<proto::UpdateWebhookRequest>,
    ) -> Result<Response<proto::Webhook>, Status> {
        let who = self.state.auth.check(&request, Scope::Admin).await?;
        let r = request.into_inner();
        let w = r.webhook.ok_or_else(|| FieldError::new("webhook", "is required"))?;
        webhook_id(&w.id, "webhook.id")?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        validate::mask(&paths)?;
        let rules = self.state.rules.clone();
        let id = w.id.clone();
        let (state, workspace) = (self.state.clone(), who.workspace);
        let updated = detached(async move {
            let (updated, changed) = state
                .store
                .update_webhook(&workspace, &id, move |current| {
                    validate::apply_mask(current.spec.clone(), &current.secret, &w, &paths, &rules)
                        .map_err(|e| StoreError::invalid(e.field, e.message))
                })
                .await
                .map_err(status_of)?;
            state.dispatcher.forget(&updated.id);
            state.dispatcher.changed_many(&workspace, &updated.id, changed);
            Ok(updated)
        })
        .await?;
        tracing::info!(webhook = %updated.id, "webhook updated");
        Ok(Response::new(to_proto(&updated, false)))
    }

    async fn delete_webhook(
        &self,
        request: Request<proto::DeleteWebhookRequest>,
    ) -> Result<Response<proto::DeleteWebhookResponse>, Status> {
        let who = self.state.auth.check(&request, Scope::Admin).await?;
        let id = request.into_inner().id;
        webhook_id(&id, "id")?;
        let (state, workspace, hook) = (self.state.clone(), who.workspace, id.clone());
        let cancelled = detached(async move {
            let changed = state.store.delete_webhook(&workspace, &hook).await.map_err(status_of)?;
            let cancelled = changed.count;
            state.dispatcher.forget(&hook);
            state.dispatcher.changed_many(&workspace, &hook, changed);
            Ok(cancelled)
        })
        .await?;
        tracing::info!(webhook = %id, cancelled, "webhook deleted");
        Ok(Response::new(proto::DeleteWebhookResponse { cancelled_deliveries: cancelled }))
    }

    async fn rotate_webhook_secret(
        &self,
        request: Request<proto::RotateWebhookSecretRequest>,
    ) -> Result<Response<proto::Webhook>, Status> {
        let who = self.state.auth.check(&request, Scope::Admin).await?;
        let r = request.into_inner();
        webhook_id(&r.id, "id")?;
        let current = self.state.store.get_webhook(&who.workspace, &r.id).await.map_err(status_of)?;
        let secret = if r.secret.is_empty() {
            signature::generate_secret()
        } else {
            validate::secret(&r.secret, current.spec.signature_scheme, "secret")?;
            r.secret
        };
        let grace = i64::try_from(self.state.config.rotation_grace.as_millis()).unwrap_or(i64::MAX);
        let until = crate::store::now_millis().saturating_add(grace);
        let (state, workspace) = (self.state.clone(), who.workspace);
        let rotated = detached(async move {
            let rotated = state.store.rotate_secret(&workspace, &r.id, secret, until).await.map_err(status_of)?;
            state.dispatcher.forget(&rotated.id);
            Ok(rotated)
        })
        .await?;
        tracing::info!(webhook = %rotated.id, grace = ?Duration::from_millis(grace as u64), "webhook secret rotated");
        Ok(Response::new(to_proto(&rotated, true)))
    }

    async fn send_test_event(
        &self,
        request: Request<proto::SendTestEventRequest>,
    ) -> Result<Response<proto::SendTestEventResponse>, Status> {
        let who = self.state.auth.check(&request, Scope::Admin).await?;
        let r = request.get_ref();
        webhook_id(&r.webhook_id, "webhook_id")?;
        let event_type = if r.event_type.is_empty() { catalog::TEST } else { r.event_type.as_str() };
        if catalog::find(event_type).is_none() {
            return Err(FieldError::new("event_type", format!("{event_type:?} is not an event type")).into());
        }
        let now = chrono::Utc::now();
        let ts = herald_shared::envelope::format_timestamp(
            chrono::DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now),
        );
        let (state, workspace, hook, event_type) =
            (self.state.clone(), who.workspace, r.webhook_id.clone(), event_type.to_owned());
        let (event_id, delivery_id) = detached(async move {
            let sent = state.store.send_test_event(&workspace, &hook, &event_type, ts).await.map_err(|e| match e {
                StoreError::Invalid { message, .. } => Status::failed_precondition(message),
                other => status_of(other),
            })?;
            state.dispatcher.wake();
            state.dispatcher.changed(vec![sent.1.clone()]);
            Ok(sent)
        })
        .await?;
        tracing::info!(webhook = %r.webhook_id, %event_id, "test event sent");
        Ok(Response::new(proto::SendTestEventResponse { event_id, delivery_id }))
    }

    async fn list_event_types(
        &self,
        request: Request<proto::ListEventTypesRequest>,
    ) -> Result<Response<proto::ListEventTypesResponse>, Status> {
        self.state.auth.check(&request, Scope::Admin).await?;
        let event_types = catalog::EVENT_TYPES
            .iter()
            .map(|t| proto::EventType {
                name: t.name.to_owned(),
                category: t.category.to_owned(),
                description: t.description.to_owned(),
                operational: catalog::is_operational(t.name),
            })
            .collect();
        Ok(Response::new(proto::ListEventTypesResponse { event_types }))
    }

    async fn list_templates(
        &self,
        request: Request<proto::ListTemplatesRequest>,
    ) -> Result<Response<proto::ListTemplatesResponse>, Status> {
        self.state.auth.check(&request, Scope::Admin).await?;
        let templates = crate::templates::all()
            .into_iter()
            .map(|t| proto::Template {
                id: t.id.to_owned(),
                name: t.name.to_owned(),
                description: t.description.to_owned(),
                url_pattern: t.url_pattern.to_owned(),
                default_events: t.default_events.iter().map(|e| (*e).to_owned()).collect(),
                headers: t.headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
                transform: Some(json::from_json(&t.transform)),
                required_vars: t.required_vars.iter().map(|v| (*v).to_owned()).collect(),
            })
            .collect();
        Ok(Response::new(proto::ListTemplatesResponse { templates }))
    }
}
