//! `herald.v1.EventService`.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use herald_shared::proto::{self, event_service_server::EventService};
use herald_shared::{catalog, envelope, ids};
use tonic::{Request, Response, Status};

use super::{FieldError, json, status_of};
use crate::auth::Scope;
use crate::server::AppState;
use crate::store::events::{EventStatus, NewEvent, StoredEvent};

/// The largest `data` payload, in bytes of JSON.
pub const MAX_DATA: usize = 256 * 1024;
/// The most events in one `PublishEvents` call.
pub const MAX_BATCH: usize = 1000;

pub struct EventApi {
    pub state: AppState,
}

/// Validates one event to publish; `prefix` is `event` or `events[i]`.
pub fn new_event(e: proto::Event, prefix: &str, now: DateTime<Utc>) -> Result<NewEvent, FieldError> {
    let field = |name: &str| format!("{prefix}.{name}");
    if e.r#type.is_empty() {
        return Err(FieldError::new(field("type"), "is required"));
    }
    if catalog::is_operational(&e.r#type) {
        return Err(FieldError::new(field("type"), "webhook.* types are Herald's own and cannot be published"));
    }
    if catalog::find(&e.r#type).is_none() {
        return Err(FieldError::new(
            field("type"),
            format!("{:?} is not an event type (see ListEventTypes)", e.r#type),
        ));
    }
    let id = if e.id.is_empty() {
        ids::new_id(ids::EVENT)
    } else if ids::is_valid_event_id(&e.id) {
        e.id
    } else {
        return Err(FieldError::new(field("id"), "must be 1 to 64 of A-Z a-z 0-9 _ -"));
    };
    let (timestamp, timestamp_supplied) = match e.timestamp {
        Some(ts) => {
            let t = u32::try_from(ts.nanos)
                .ok()
                .and_then(|nanos| DateTime::from_timestamp(ts.seconds, nanos))
                .filter(|t| (0..=9999).contains(&chrono::Datelike::year(t)))
                .ok_or_else(|| FieldError::new(field("timestamp"), "is not a valid time"))?;
            (envelope::format_timestamp(t), true)
        }
        None => (envelope::format_timestamp(now), false),
    };
    let data = match (e.data, e.data_json.is_empty()) {
        (Some(_), false) => {
            return Err(FieldError::new(field("data_json"), "set `data` or `data_json`, not both"));
        }
        (Some(s), true) => json::struct_to_json(&s, 0)
            .ok_or_else(|| {
                FieldError::new(field("data"), format!("nests deeper than {} levels or holds NaN", json::MAX_DEPTH))
            })?
            .to_string(),
        (None, false) => {
            if e.data_json.len() > MAX_DATA {
                return Err(FieldError::new(
                    field("data_json"),
                    format!("is {} bytes; at most {MAX_DATA}", e.data_json.len()),
                ));
            }
            json::check_payload(&e.data_json).map_err(|err| {
                let message = match err {
                    json::PayloadError::NotJson(err) => format!("is not valid JSON: {err}"),
                    json::PayloadError::NotObject => "must be a JSON object".to_owned(),
                    json::PayloadError::TooDeep => format!("nests deeper than {} levels", json::MAX_DEPTH),
                };
                FieldError::new(field("data_json"), message)
            })?;
            e.data_json
        }
        (None, true) => "{}".to_owned(),
    };
    if data.len() > MAX_DATA {
        return Err(FieldError::new(field("data"), format!("is {} bytes as JSON; at most {MAX_DATA}", data.len())));
    }
    Ok(NewEvent { id, event_type: e.r#type, timestamp, timestamp_supplied, data, trace_context: None })
}

/// The API view of a stored event. `with_data` fills `data` and `data_json` (GetEvent); publish
/// answers leave the payload out, so that an answer is never larger than its request and never
/// trips a client's default 4 MiB message limit.
pub fn to_proto(e: &StoredEvent, with_data: bool) -> proto::Event {
    let status = match e.status() {
        EventStatus::Pending => proto::EventStatus::Pending,
        EventStatus::Delivered => proto::EventStatus::Delivered,
        EventStatus::Failed => proto::EventStatus::Failed,
    };
    let timestamp = DateTime::parse_from_rfc3339(&e.event.timestamp)
        .ok()
        .map(|t| prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 });
    let data = with_data
        .then(|| serde_json::from_str::<serde_json::Value>(&e.event.data).ok().map(|j| json::struct_from_json(&j)))
        .flatten();
    proto::Event {
        id: e.event.id.clone(),
        r#type: e.event.event_type.clone(),
        timestamp,
        workspace_id: e.event.workspace_id.clone(),
        data,
        data_json: if with_data { e.event.data.clone() } else { String::new() },
        status: status as i32,
        deliveries: e
            .deliveries
            .iter()
            .map(|d| proto::DeliverySummary {
                id: d.id.clone(),
                webhook_id: d.webhook_id.clone(),
                status: super::deliveries::status_to_proto(d.status) as i32,
                attempt_count: d.attempt_count as u32,
            })
            .collect(),
    }
}

/// Now, to the millisecond: generated envelope timestamps read `…T10:30:00.123Z`.
fn now_millis_precision() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

impl EventApi {
    fn first_delay_ms(&self) -> i64 {
        let d = self.state.config.retry_schedule.delay_before(1).unwrap_or_default();
        i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
    }

    fn publish_timeout(&self) -> std::time::Duration {
        self.state.config.publish_timeout
    }
}

#[tonic::async_trait]
impl EventService for EventApi {
    async fn publish_event(
        &self,
        request: Request<proto::PublishEventRequest>,
    ) -> Result<Response<proto::Event>, Status> {
        let who = self.state.auth.check(&request, Scope::Publish).await?;
        let (mut span, trace_context) = publish_span(&request, &who.workspace, 1);
        let e = request.into_inner().event.ok_or_else(|| FieldError::new("event", "is required"))?;
        let event = NewEvent { trace_context, ..new_event(e, "event", now_millis_precision())? };
        let stored = self
            .state
            .store
            .publish(&who.workspace, vec![event], false, self.first_delay_ms(), self.publish_timeout())
            .await;
        let mut stored = stored.map_err(|e| failed(&mut span, status_of(e)))?;
        self.state.metrics.events_published.inc();
        let stored = stored.pop().ok_or_else(|| Status::internal("internal error"))?;
        Ok(Response::new(to_proto(&stored, false)))
    }

    async fn publish_events(
        &self,
        request: Request<proto::PublishEventsRequest>,
    ) -> Result<Response<proto::PublishEventsResponse>, Status> {
        let who = self.state.auth.check(&request, Scope::Publish).await?;
        let (mut span, trace_context) = publish_span(&request, &who.workspace, request.get_ref().events.len());
        let events = request.into_inner().events;
        if events.is_empty() {
            return Err(FieldError::new("events", "must hold at least one event").into());
        }
        if events.len() > MAX_BATCH {
            return Err(FieldError::new("events", format!("holds {} events; at most {MAX_BATCH}", events.len())).into());
        }
        let now = now_millis_precision();
        let mut seen: HashMap<String, usize> = HashMap::with_capacity(events.len());
        let mut batch = Vec::with_capacity(events.len());
        for (i, e) in events.into_iter().enumerate() {
            let prefix = format!("events[{i}]");
            let event = NewEvent { trace_context: trace_context.clone(), ..new_event(e, &prefix, now)? };
            if let Some(first) = seen.insert(event.id.clone(), i) {
                return Err(FieldError::new(format!("{prefix}.id"), format!("duplicates events[{first}].id")).into());
            }
            batch.push(event);
        }
        let stored =
            self.state.store.publish(&who.workspace, batch, true, self.first_delay_ms(), self.publish_timeout()).await;
        let stored = stored.map_err(|e| failed(&mut span, status_of(e)))?;
        self.state.metrics.events_published.inc_by(stored.len() as u64);
        Ok(Response::new(proto::PublishEventsResponse { events: stored.iter().map(|e| to_proto(e, false)).collect() }))
    }

    async fn get_event(&self, request: Request<proto::GetEventRequest>) -> Result<Response<proto::Event>, Status> {
        let who = self.state.auth.check(&request, Scope::Publish).await?;
        let id = &request.get_ref().id;
        if !ids::is_valid_event_id(id) {
            return Err(FieldError::new("id", "must be 1 to 64 of A-Z a-z 0-9 _ -").into());
        }
        let stored = self.state.store.get_event(&who.workspace, id).await.map_err(status_of)?;
        Ok(Response::new(to_proto(&stored, true)))
    }
}

/// The `herald.publish` span of a publish call, a child of the caller's span when the request
/// carries a `traceparent`; and its own `traceparent`, which the events keep (when traces are
/// exported) so that their dispatches can link to it.
fn publish_span<T>(
    request: &Request<T>,
    workspace: &str,
    events: usize,
) -> (opentelemetry::global::BoxedSpan, Option<String>) {
    use herald_shared::telemetry;
    use opentelemetry::trace::{Span as _, SpanKind, TraceContextExt as _, Tracer as _};
    let parent = request
        .metadata()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(telemetry::parse_traceparent)
        .map_or_else(opentelemetry::Context::new, |sc| opentelemetry::Context::new().with_remote_span_context(sc));
    let tracer = telemetry::tracer();
    let span = tracer
        .span_builder("herald.publish")
        .with_kind(SpanKind::Server)
        .with_attributes([
            opentelemetry::KeyValue::new("herald.workspace", workspace.to_owned()),
            opentelemetry::KeyValue::new("herald.events", events as i64),
        ])
        .start_with_context(&tracer, &parent);
    let context = span.span_context().is_valid().then(|| telemetry::traceparent(span.span_context()));
    (span, context)
}

/// Marks the publish span failed with `status`, and passes `status` on.
fn failed(span: &mut opentelemetry::global::BoxedSpan, status: Status) -> Status {
    use opentelemetry::trace::Span as _;
    span.set_status(opentelemetry::trace::Status::error(status.message().to_owned()));
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: &str, data_json: &str) -> proto::Event {
        proto::Event { r#type: t.into(), data_json: data_json.into(), ..Default::default() }
    }

    #[test]
    fn events_are_validated() {
        let now = Utc::now();
        let ok = new_event(ev("incident.created", r#"{"a": 150.00}"#), "event", now).unwrap();
        assert!(ok.id.starts_with("evt_"));
        assert_eq!(ok.data, r#"{"a": 150.00}"#);
        assert!(!ok.timestamp_supplied);
        let field = |e: proto::Event| new_event(e, "event", now).unwrap_err().field;
        assert_eq!(field(ev("", "{}")), "event.type");
        assert_eq!(field(ev("webhook.test", "{}")), "event.type");
        assert_eq!(field(ev("incident.exploded", "{}")), "event.type");
        assert_eq!(field(ev("incident.created", "[1]")), "event.data_json");
        assert_eq!(field(ev("incident.created", "{")), "event.data_json");
        let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(MAX_DATA));
        assert_eq!(field(ev("incident.created", &big)), "event.data_json");
        let deep = format!("{}{{}}{}", "{\"a\":".repeat(70), "}".repeat(70));
        assert_eq!(field(ev("incident.created", &deep)), "event.data_json");
        let mut bad_id = ev("incident.created", "{}");
        bad_id.id = "has space".into();
        assert_eq!(field(bad_id), "event.id");
        let mut both = ev("incident.created", "{}");
        both.data = Some(Default::default());
        assert_eq!(field(both), "event.data_json");
    }
}
