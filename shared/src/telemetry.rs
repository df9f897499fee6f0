//! Logging and tracing set-up shared by every binary.
//!
//! Logs: `tracing` to stderr, filtered by `RUST_LOG` (default `info`, with the database drivers'
//! per-statement logs turned down), as JSON when `HERALD_LOG_FORMAT=json`.
//!
//! Traces: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans go to that OTLP/gRPC collector (batched;
//! `OTEL_BSP_SCHEDULE_DELAY` and the other standard variables apply). Herald's own spans are
//! made with the OpenTelemetry API ([`tracer`]): `herald.publish` for a publish call,
//! `herald.dispatch` for each job the control plane sends, `herald.attempt` in the agent for each
//! request. A delivery's dispatch spans live in a trace of their own whose ids derive from the
//! delivery ([`dispatch_context`]), so that each attempt can link to the publish that created it
//! and to the attempt before it without storing anything.

use std::cell::Cell;
use std::sync::Arc;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Flushes and stops the trace exporter when dropped (keep it alive in `main`).
#[must_use = "traces are flushed when this is dropped"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs the global subscriber, and the OTLP exporter when `OTEL_EXPORTER_OTLP_ENDPOINT` is
/// set. Call once, first thing in `main`, inside the Tokio runtime.
pub fn init(service: &'static str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,sea_orm=warn,sea_orm_migration=warn,h2=warn,tower=warn"));
    let provider = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").is_ok().then(|| provider(service)).flatten();
    let otel = provider.as_ref().map(|p| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer().with_tracer(p.tracer(service))
    });
    let json = std::env::var("HERALD_LOG_FORMAT").is_ok_and(|f| f == "json");
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    if json {
        registry.with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr)).init();
    } else {
        registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).init();
    }
    if provider.is_some() {
        ENABLED.store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(service, "exporting traces over OTLP");
    }
    Telemetry { provider }
}

fn provider(service: &'static str) -> Option<SdkTracerProvider> {
    let exporter = match opentelemetry_otlp::SpanExporter::builder().with_tonic().build() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("OTEL_EXPORTER_OTLP_ENDPOINT is set but the exporter cannot be built: {e}");
            return None;
        }
    };
    let exporter =
        OnRuntime { inner: Arc::new(tokio::sync::Mutex::new(exporter)), runtime: tokio::runtime::Handle::current() };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_id_generator(Ids::default())
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(service).build())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    Some(provider)
}

/// Runs the OTLP exporter on the application's Tokio runtime: the batch processor exports from a
/// thread of its own, where tonic would find no reactor.
#[derive(Debug)]
struct OnRuntime {
    inner: Arc<tokio::sync::Mutex<opentelemetry_otlp::SpanExporter>>,
    runtime: tokio::runtime::Handle,
}

impl SpanExporter for OnRuntime {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send {
        let inner = self.inner.clone();
        let task = self.runtime.spawn(async move { inner.lock().await.export(batch).await });
        async move {
            task.await.unwrap_or_else(|e| Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(e.to_string())))
        }
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        if let Ok(mut inner) = self.inner.try_lock() {
            inner.set_resource(resource);
        }
    }
}

static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans are exported: callers skip building spans on hot paths when they are not.
pub fn enabled() -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed)
}

thread_local! {
    /// Ids the next span started on this thread takes (see [`start_with_ids`]).
    static NEXT_IDS: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
}

/// Random ids, unless [`start_with_ids`] chose them.
#[derive(Debug, Default)]
struct Ids(RandomIdGenerator);

impl IdGenerator for Ids {
    fn new_trace_id(&self) -> TraceId {
        NEXT_IDS.with(Cell::get).map_or_else(|| self.0.new_trace_id(), |(t, _)| t)
    }

    fn new_span_id(&self) -> SpanId {
        NEXT_IDS.with(Cell::get).map_or_else(|| self.0.new_span_id(), |(_, s)| s)
    }
}

/// The tracer of Herald's own spans (a no-op until [`init`] installs an exporter).
pub fn tracer() -> opentelemetry::global::BoxedTracer {
    opentelemetry::global::tracer("herald")
}

/// Starts a root span with the ids of `context`.
pub fn start_with_ids(
    builder: opentelemetry::trace::SpanBuilder,
    context: &SpanContext,
) -> opentelemetry::global::BoxedSpan {
    use opentelemetry::trace::Tracer as _;
    NEXT_IDS.with(|n| n.set(Some((context.trace_id(), context.span_id()))));
    let span = tracer().build_with_context(builder, &opentelemetry::Context::new());
    NEXT_IDS.with(|n| n.set(None));
    span
}

/// The span context of a dispatch of `delivery` for attempt `attempt`, after `lost` leases of that
/// attempt were lost: a trace per delivery, a span per dispatch, derived from the ids so that any
/// dispatch can name the one before it.
pub fn dispatch_context(delivery: &str, attempt: u32, lost: u32) -> SpanContext {
    let trace = ring::digest::digest(&ring::digest::SHA256, delivery.as_bytes());
    let mut span_input = delivery.as_bytes().to_vec();
    span_input.extend_from_slice(&attempt.to_be_bytes());
    span_input.extend_from_slice(&lost.to_be_bytes());
    let span = ring::digest::digest(&ring::digest::SHA256, &span_input);
    let trace_id = TraceId::from_bytes(trace.as_ref()[..16].try_into().expect("16 bytes"));
    let span_id = SpanId::from_bytes(span.as_ref()[..8].try_into().expect("8 bytes"));
    SpanContext::new(trace_id, span_id, TraceFlags::SAMPLED, false, TraceState::default())
}

/// The W3C `traceparent` of a span context.
pub fn traceparent(context: &SpanContext) -> String {
    format!("00-{}-{}-{:02x}", context.trace_id(), context.span_id(), context.trace_flags().to_u8())
}

/// A W3C `traceparent` read as a remote span context.
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let (Some("00"), Some(trace), Some(span), Some(flags), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let trace_id = TraceId::from_hex(trace).ok().filter(|t| *t != TraceId::INVALID)?;
    let span_id = SpanId::from_hex(span).ok().filter(|s| *s != SpanId::INVALID)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    (trace.len() == 32 && span.len() == 16)
        .then(|| SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, TraceState::default()))
}

/// The context of the current OpenTelemetry span `cx` holds, if valid.
pub fn valid(cx: &opentelemetry::Context) -> Option<SpanContext> {
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_junk() {
        let cx = dispatch_context("dlv_1", 2, 0);
        let tp = traceparent(&cx);
        assert_eq!(tp.len(), 55);
        let back = parse_traceparent(&tp).unwrap();
        assert_eq!((back.trace_id(), back.span_id()), (cx.trace_id(), cx.span_id()));
        for junk in [
            "",
            "00-xyz",
            "01-00000000000000000000000000000001-0000000000000001-01",
            "00-00000000000000000000000000000000-0000000000000001-01",
        ] {
            assert!(parse_traceparent(junk).is_none(), "{junk}");
        }
    }

    #[test]
    fn dispatch_contexts_share_a_trace_per_delivery() {
        let (a1, a2, b1) =
            (dispatch_context("dlv_a", 1, 0), dispatch_context("dlv_a", 2, 0), dispatch_context("dlv_b", 1, 0));
        assert_ne!(a1.span_id(), dispatch_context("dlv_a", 1, 1).span_id(), "a re-dispatch is a span of its own");
        assert_eq!(a1.trace_id(), a2.trace_id());
        assert_ne!(a1.span_id(), a2.span_id());
        assert_ne!(a1.trace_id(), b1.trace_id());
        assert_eq!(a1, dispatch_context("dlv_a", 1, 0), "the same inputs give the same ids");
    }
}
