//! OpenTelemetry end to end: the real binaries export to an OTLP collector running in this test,
//! and the spans of a publish, its fan-out and a retry are joined as documented, down to the
//! `traceparent` the receiver gets.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_shared::proto;
use herald_tests::procs::{AgentProcess, ControlPlaneProcess};
use herald_tests::receiver::{Receiver, Reply};
use herald_tests::tls::TestCa;
use herald_tests::{Backend, TestDb, webhook};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;

use crate::pipeline::{WAIT, create, settled};

/// An OTLP trace collector that keeps every span with its service's name.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut kept = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    any_value::Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                kept.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn attr(span: &Span, key: &str) -> String {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            any_value::Value::StringValue(s) => s.clone(),
            any_value::Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_dispatch_and_attempts_form_linked_traces() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    let _collector = tokio::spawn(server);
    let otel = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];

    let ca = TestCa::new();
    let db = TestDb::new(Backend::Sqlite).await;
    let cp = ControlPlaneProcess::start_with_env(&db.url, &["--retry-schedule", "0s,50ms"], &otel).await;
    let _agent = AgentProcess::with_env(
        &cp.url(),
        "default",
        "agent-1",
        Some(&ca.path),
        &["--allow-cidr", "127.0.0.0/8"],
        &otel,
    );
    cp.wait_agents(&["agent-1"]).await;
    let (steady, flaky) = (Receiver::https(&ca).await, Receiver::https(&ca).await);
    flaky.script([Reply::status(503)]);
    let a = create(&cp, webhook("steady", &steady.url("/"), &["incident.created"])).await;
    let b = create(&cp, webhook("flaky", &flaky.url("/"), &["incident.created"])).await;

    // The publisher's own trace: Herald's publish span is its child.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(proto::PublishEventRequest {
        event: Some(herald_tests::event("incident.created", r#"{"title":"traced"}"#)),
    });
    request.metadata_mut().insert("traceparent", format!("00-{client_trace}-{client_span}-01").parse().unwrap());
    let e = cp.events().publish_event(request).await.unwrap().into_inner();
    let done = settled(&db, &e.id).await;
    let d_a = done.iter().find(|d| d.webhook_id == a.id).unwrap();
    let d_b = done.iter().find(|d| d.webhook_id == b.id).unwrap();
    assert_eq!((d_a.attempt_count, d_b.attempt_count), (1, 2));

    // 1 publish, 3 dispatches (a#1, b#1, b#2), 3 attempts.
    let deadline = tokio::time::Instant::now() + WAIT;
    let spans = loop {
        let spans = collector.spans.lock().unwrap().clone();
        let count = |name: &str| spans.iter().filter(|(_, s)| s.name == name).count();
        if count("herald.publish") >= 1 && count("herald.dispatch") >= 3 && count("herald.attempt") >= 3 {
            break spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans did not arrive: {:?}",
            spans.iter().map(|(_, s)| &s.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let named = |name: &'static str| spans.iter().filter(move |(_, s)| s.name == name);
    let (service, publish) = named("herald.publish").next().unwrap();
    assert_eq!(service, "herald-control-plane");
    assert_eq!(hex::encode(&publish.trace_id), client_trace, "the publish joins the publisher's trace");
    assert_eq!(hex::encode(&publish.parent_span_id), client_span);

    let dispatch = |delivery: &str, attempt: u32| {
        named("herald.dispatch")
            .map(|(_, s)| s)
            .find(|s| attr(s, "herald.delivery_id") == delivery && attr(s, "herald.attempt") == attempt.to_string())
            .unwrap_or_else(|| panic!("no dispatch span for {delivery} #{attempt}"))
    };
    let links_to =
        |s: &Span, target: &Span| s.links.iter().any(|l| l.trace_id == target.trace_id && l.span_id == target.span_id);
    let (a1, b1, b2) = (dispatch(&d_a.id, 1), dispatch(&d_b.id, 1), dispatch(&d_b.id, 2));
    for d in [a1, b1, b2] {
        assert!(links_to(d, publish), "every dispatch of the fan-out links to the publish");
        assert!(d.parent_span_id.is_empty(), "a dispatch starts the delivery's own trace");
    }
    assert_ne!(a1.trace_id, b1.trace_id, "a trace per delivery");
    assert_eq!(b1.trace_id, b2.trace_id, "the attempts of one delivery share its trace");
    assert!(links_to(b2, b1), "a retry links to the attempt before it");
    assert!(!links_to(b1, b2));

    // Each attempt is the agent's child of its dispatch, and the receiver's traceparent is the attempt's.
    let received: Vec<_> = steady.requests().into_iter().chain(flaky.requests()).collect();
    assert_eq!(received.len(), 3);
    for dispatch in [a1, b1, b2] {
        let (service, attempt) = named("herald.attempt")
            .find(|(_, s)| s.parent_span_id == dispatch.span_id)
            .unwrap_or_else(|| panic!("no attempt span under dispatch {}", attr(dispatch, "herald.delivery_id")));
        assert_eq!(service, "herald-agent");
        assert_eq!(attempt.trace_id, dispatch.trace_id);
        let traceparent = format!("00-{}-{}-01", hex::encode(&attempt.trace_id), hex::encode(&attempt.span_id));
        assert!(
            received.iter().any(|r| r.header("traceparent") == traceparent),
            "the receiver joins the attempt's trace: {traceparent}"
        );
    }
    let failed = named("herald.attempt").map(|(_, s)| s).find(|s| s.parent_span_id == b1.span_id).unwrap();
    assert_eq!(attr(failed, "http.response.status_code"), "503");
}
