//! The hostile-input matrix: every RPC called with malformed input, each case answered with its
//! status code and the field it names, and the database unchanged after every one of them.

use std::future::Future;
use std::pin::Pin;

use bytes::{Buf as _, BufMut as _};
use herald_control_plane::auth::Scope;
use herald_control_plane::store::Store;
use herald_shared::proto::{self, Webhook, agent_message};
use herald_tests::{Backend, ControlPlane, bad_field, event, new_key, webhook};
use prost_types::Timestamp;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

use crate::support::start_with;
use crate::webhooks::{create_cases, mask};

both_databases!(every_rpc_answers_hostile_input_and_writes_nothing);

type Call = Pin<Box<dyn Future<Output = Result<(), Status>> + Send>>;

/// One row: the RPC, what is wrong, the status it must get, and the field it must name (for
/// `INVALID_ARGUMENT`; `None` where no field is to blame, as for another workspace's ids;
/// `decode:Message.field` where the message does not even decode and prost names the field).
struct Case {
    rpc: &'static str,
    what: String,
    code: Code,
    field: Option<String>,
    call: Call,
}

const TOKEN: &str = "agent-token-for-the-matrix-0123";
const FORGED: &[&str] = &["", "wh_../../etc/passwd", "wh_01aaaaaaaaaaaaaaaaaaaaaaa'", "evt_1", "x"];

/// Sends raw bytes as the request message of `path`, the way a broken or malicious client would.
#[derive(Clone, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = ();
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        buf.advance(buf.remaining());
        Ok(Some(()))
    }
}

fn raw(cp: &ControlPlane, path: &'static str, bytes: Vec<u8>) -> Call {
    let channel = cp.channel.clone();
    let key: tonic::metadata::MetadataValue<_> = format!("Bearer {}", cp.api_key).parse().unwrap();
    Box::pin(async move {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
        let mut req = tonic::Request::new(bytes);
        req.metadata_mut().insert("authorization", key);
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
        grpc.unary(req, path, RawCodec).await.map(|_| ())
    })
}

/// `msg` encoded, with the UTF-8 of `sentinel` replaced by as many bytes that are not UTF-8.
fn with_invalid_utf8(msg: &impl prost::Message, sentinel: &str) -> Vec<u8> {
    let mut bytes = msg.encode_to_vec();
    let at = bytes.windows(sentinel.len()).position(|w| w == sentinel.as_bytes()).expect("sentinel");
    bytes[at..at + sentinel.len()].fill(0xff);
    bytes
}

fn ts(seconds: i64) -> Option<Timestamp> {
    Some(Timestamp { seconds, nanos: 0 })
}

fn deep_json(levels: usize) -> String {
    format!("{}{{}}{}", "{\"a\":".repeat(levels), "}".repeat(levels))
}

async fn every_rpc_answers_hostile_input_and_writes_nothing(backend: Backend) {
    let (cp, db) = start_with(backend, |c| {
        c.allow_http = false;
        c.allow_cidr = Vec::new(); // the default: every literal non-global address is refused
        c.agent_tokens = vec![herald_control_plane::config::AgentToken { token: TOKEN.into(), zones: None }];
    })
    .await;
    // Our workspace's webhook, event and delivery, and another workspace's.
    let mine = cp
        .webhooks()
        .create_webhook(proto::CreateWebhookRequest { webhook: Some(webhook("mine", "https://example.com/a", &["*"])) })
        .await
        .unwrap()
        .into_inner();
    let my_event = cp
        .events()
        .publish_event(proto::PublishEventRequest { event: Some(event("incident.created", "{}")) })
        .await
        .unwrap()
        .into_inner();
    let other_key = new_key();
    let store = Store::new(db.connect().await, cp.config.secret_key.clone());
    store.put_api_key("ws_other", &other_key, Scope::Admin).await.unwrap();
    let theirs = cp
        .webhooks_as(Some(&other_key))
        .create_webhook(proto::CreateWebhookRequest {
            webhook: Some(webhook("theirs", "https://example.org/b", &["*"])),
        })
        .await
        .unwrap()
        .into_inner();
    let their_event = cp
        .events_as(Some(&other_key))
        .publish_event(proto::PublishEventRequest { event: Some(event("incident.created", "{}")) })
        .await
        .unwrap()
        .into_inner();
    let their_delivery = their_event.deliveries[0].id.clone();
    assert_eq!(my_event.deliveries.len(), 1);

    let key = Some(cp.api_key.as_str());
    let mut cases: Vec<Case> = Vec::new();
    macro_rules! case {
        ($rpc:literal, $what:expr, $code:ident, $field:expr, $client:expr, $method:ident, $req:expr) => {{
            let mut client = $client;
            let req = $req;
            let field: Option<&str> = $field;
            cases.push(Case {
                rpc: $rpc,
                what: $what.to_string(),
                code: Code::$code,
                field: field.map(str::to_owned),
                call: Box::pin(async move { client.$method(req).await.map(|_| ()) }),
            });
        }};
    }

    // CreateWebhook: every rule of a webhook, plus the URLs and templates strangers send.
    for (what, spoil, field) in create_cases() {
        let mut w = webhook("valid", "https://example.com/hook", &["incident.created"]);
        spoil(&mut w);
        let req = proto::CreateWebhookRequest { webhook: Some(w) };
        case!("CreateWebhook", what, InvalidArgument, Some(field), cp.webhooks(), create_webhook, req);
    }
    let urls = [
        ("literal private IPv4", "https://10.0.0.1/hook"),
        ("cloud metadata", "https://169.254.169.254/latest/meta-data/"),
        ("literal loopback in decimal", "https://2130706433/hook"),
        ("literal unique-local IPv6", "https://[fd00::1]/hook"),
        ("IPv4-mapped private", "https://[::ffff:192.168.0.1]/hook"),
        ("CGNAT", "https://100.64.0.1/hook"),
        ("backslash host", "https:\\\\example.com/hook"),
        ("javascript scheme", "javascript:alert(1)"),
        ("CR/LF in URL", "https://example.com/a\r\nHost: evil"),
        ("NUL in URL", "https://example.com/\0"),
    ];
    for (what, url) in urls {
        let req = proto::CreateWebhookRequest { webhook: Some(webhook("u", url, &["*"])) };
        case!("CreateWebhook", what, InvalidArgument, Some("webhook.url"), cp.webhooks(), create_webhook, req);
    }
    let transforms = [
        ("template does not compile", serde_json::json!({"text": "{{ type"}), "webhook.transform.text"),
        (
            "template loops",
            serde_json::json!({"a": ["{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}"]}),
            "webhook.transform.a[0]",
        ),
        // Past protobuf's own recursion limit: refused while decoding, prost naming the field.
        ("transform nests 80 deep", serde_json::from_str(&deep_json(80)).unwrap(), "decode:Webhook.transform"),
        ("transform too large", serde_json::json!({"t": "x".repeat(70_000)}), "webhook.transform"),
    ];
    for (what, transform, field) in transforms {
        let mut w = webhook("t", "https://example.com/hook", &["*"]);
        w.transform = Some(herald_control_plane::api::json::from_json(&transform));
        let req = proto::CreateWebhookRequest { webhook: Some(w) };
        case!("CreateWebhook", what, InvalidArgument, Some(field), cp.webhooks(), create_webhook, req);
    }
    let mut w = webhook("h", "https://example.com/hook", &["*"]);
    w.headers.insert("X-Bad\r\nName".into(), "v".into());
    let req = proto::CreateWebhookRequest { webhook: Some(w) };
    let field = "webhook.headers[\"X-Bad\\r\\nName\"]";
    case!("CreateWebhook", "CR/LF in header name", InvalidArgument, Some(field), cp.webhooks(), create_webhook, req);
    let mut w = webhook("h", "https://example.com/hook", &["*"]);
    w.headers = (0..65).map(|i| (format!("X-H{i}"), "v".to_owned())).collect();
    let req = proto::CreateWebhookRequest { webhook: Some(w) };
    case!("CreateWebhook", "65 headers", InvalidArgument, Some("webhook.headers"), cp.webhooks(), create_webhook, req);
    let mut w = webhook("h", "https://example.com/hook", &["*"]);
    w.headers.insert("X-Big".into(), "v".repeat(8193));
    let req = proto::CreateWebhookRequest { webhook: Some(w) };
    let field = Some("webhook.headers[\"X-Big\"]");
    case!("CreateWebhook", "header value over 8 KiB", InvalidArgument, field, cp.webhooks(), create_webhook, req);
    let long_name = format!("X-{}", "a".repeat(255));
    let mut w = webhook("h", "https://example.com/hook", &["*"]);
    w.headers.insert(long_name.clone(), "v".into());
    let req = proto::CreateWebhookRequest { webhook: Some(w) };
    let field = format!("webhook.headers[{long_name:?}]");
    let field = Some(field.as_str());
    case!("CreateWebhook", "header name over 256", InvalidArgument, field, cp.webhooks(), create_webhook, req);
    let mut w = webhook("v", "https://example.com/hook", &["*"]);
    w.transform_vars.insert("token".into(), "v".repeat(4097));
    let req = proto::CreateWebhookRequest { webhook: Some(w) };
    let field = Some("webhook.transform_vars[\"token\"]");
    case!("CreateWebhook", "variable over 4 KiB", InvalidArgument, field, cp.webhooks(), create_webhook, req);
    let mut w = webhook("v", "https://example.com/hook", &["*"]);
    w.transform_vars = (0..65).map(|i| (format!("v{i}"), "x".to_owned())).collect();
    let req = proto::CreateWebhookRequest { webhook: Some(w) };
    let field = Some("webhook.transform_vars");
    case!("CreateWebhook", "65 variables", InvalidArgument, field, cp.webhooks(), create_webhook, req);
    let patterns: Vec<String> = (0..101).map(|_| "incident.created".to_owned()).collect();
    let mut w = webhook("e", "https://example.com/hook", &[]);
    w.events = patterns;
    let req = proto::CreateWebhookRequest { webhook: Some(w) };
    case!(
        "CreateWebhook",
        "101 event patterns",
        InvalidArgument,
        Some("webhook.events"),
        cp.webhooks(),
        create_webhook,
        req
    );
    let req = proto::CreateWebhookRequest { webhook: None };
    case!("CreateWebhook", "no webhook", InvalidArgument, Some("webhook"), cp.webhooks(), create_webhook, req);

    // UpdateWebhook.
    let change = |w: Webhook| Webhook { id: mine.id.clone(), ..w };
    let req = proto::UpdateWebhookRequest {
        webhook: Some(change(webhook("u", "https://192.168.1.1/hook", &["*"]))),
        update_mask: mask(&["url"]),
    };
    case!(
        "UpdateWebhook",
        "literal private IP",
        InvalidArgument,
        Some("webhook.url"),
        cp.webhooks(),
        update_webhook,
        req
    );
    let req = proto::UpdateWebhookRequest {
        webhook: Some(change(webhook("u", "https://example.com", &["*"]))),
        update_mask: mask(&["name", "colour"]),
    };
    let field = Some("update_mask.paths[1]");
    case!("UpdateWebhook", "unknown mask path", InvalidArgument, field, cp.webhooks(), update_webhook, req);
    let req = proto::UpdateWebhookRequest {
        webhook: Some(change(webhook("u", "https://example.com", &["*"]))),
        update_mask: mask(&["secret"]),
    };
    let field = Some("update_mask.paths[0]");
    case!("UpdateWebhook", "the secret by update", InvalidArgument, field, cp.webhooks(), update_webhook, req);
    let req = proto::UpdateWebhookRequest { webhook: Some(change(Webhook::default())), update_mask: None };
    case!("UpdateWebhook", "no mask", InvalidArgument, Some("update_mask"), cp.webhooks(), update_webhook, req);
    for id in FORGED {
        let req = proto::UpdateWebhookRequest {
            webhook: Some(Webhook { id: (*id).into(), name: "x".into(), ..Default::default() }),
            update_mask: mask(&["name"]),
        };
        let what = format!("forged id {id:?}");
        case!("UpdateWebhook", what, InvalidArgument, Some("webhook.id"), cp.webhooks(), update_webhook, req);
    }
    let req = proto::UpdateWebhookRequest {
        webhook: Some(Webhook { id: theirs.id.clone(), name: "stolen".into(), ..Default::default() }),
        update_mask: mask(&["name"]),
    };
    case!("UpdateWebhook", "another workspace's id", NotFound, None, cp.webhooks(), update_webhook, req);

    // Reads and actions by id.
    for id in FORGED {
        let what = format!("forged id {id:?}");
        let req = proto::GetWebhookRequest { id: (*id).into() };
        case!("GetWebhook", what, InvalidArgument, Some("id"), cp.webhooks(), get_webhook, req);
        let req = proto::DeleteWebhookRequest { id: (*id).into() };
        case!("DeleteWebhook", what, InvalidArgument, Some("id"), cp.webhooks(), delete_webhook, req);
        let req = proto::RotateWebhookSecretRequest { id: (*id).into(), secret: String::new() };
        case!("RotateWebhookSecret", what, InvalidArgument, Some("id"), cp.webhooks(), rotate_webhook_secret, req);
        let req = proto::SendTestEventRequest { webhook_id: (*id).into(), event_type: String::new() };
        case!("SendTestEvent", what, InvalidArgument, Some("webhook_id"), cp.webhooks(), send_test_event, req);
        let req = proto::GetDeliveryRequest { id: (*id).into() };
        case!("GetDelivery", what, InvalidArgument, Some("id"), cp.deliveries_as(key), get_delivery, req);
        let req = proto::RetryDeliveryRequest { id: (*id).into() };
        case!("RetryDelivery", what, InvalidArgument, Some("id"), cp.deliveries_as(key), retry_delivery, req);
        let req = proto::ReplayWebhookRequest { webhook_id: (*id).into(), ..Default::default() };
        case!("ReplayWebhook", what, InvalidArgument, Some("webhook_id"), cp.deliveries_as(key), replay_webhook, req);
    }
    // Event ids are the publisher's own; these break their rules.
    for id in ["", "../../etc/passwd", "evt_1'", "a b", "evt\u{0}", &"a".repeat(65)] {
        let req = proto::GetEventRequest { id: id.to_owned() };
        case!("GetEvent", format!("malformed id {id:?}"), InvalidArgument, Some("id"), cp.events(), get_event, req);
    }
    // Well-formed ids of nothing.
    let unknown = "wh_01aaaaaaaaaaaaaaaaaaaaaaaa";
    let req = proto::GetWebhookRequest { id: unknown.into() };
    case!("GetWebhook", "unknown id", NotFound, None, cp.webhooks(), get_webhook, req);
    let req = proto::DeleteWebhookRequest { id: unknown.into() };
    case!("DeleteWebhook", "unknown id", NotFound, None, cp.webhooks(), delete_webhook, req);
    let req = proto::GetEventRequest { id: "evt_nothere".into() };
    case!("GetEvent", "unknown id", NotFound, None, cp.events(), get_event, req);
    let req = proto::GetDeliveryRequest { id: "dlv_01aaaaaaaaaaaaaaaaaaaaaaaa".into() };
    case!("GetDelivery", "unknown id", NotFound, None, cp.deliveries_as(key), get_delivery, req);
    let req = proto::RetryDeliveryRequest { id: "dlv_01aaaaaaaaaaaaaaaaaaaaaaaa".into() };
    case!("RetryDelivery", "unknown id", NotFound, None, cp.deliveries_as(key), retry_delivery, req);
    let other = "another workspace's id";
    let req = proto::GetWebhookRequest { id: theirs.id.clone() };
    case!("GetWebhook", other, NotFound, None, cp.webhooks(), get_webhook, req);
    let req = proto::DeleteWebhookRequest { id: theirs.id.clone() };
    case!("DeleteWebhook", other, NotFound, None, cp.webhooks(), delete_webhook, req);
    let req = proto::RotateWebhookSecretRequest { id: theirs.id.clone(), secret: String::new() };
    case!("RotateWebhookSecret", other, NotFound, None, cp.webhooks(), rotate_webhook_secret, req);
    let req = proto::SendTestEventRequest { webhook_id: theirs.id.clone(), event_type: String::new() };
    case!("SendTestEvent", other, NotFound, None, cp.webhooks(), send_test_event, req);
    let req = proto::GetEventRequest { id: their_event.id.clone() };
    case!("GetEvent", other, NotFound, None, cp.events(), get_event, req);
    let req = proto::GetDeliveryRequest { id: their_delivery.clone() };
    case!("GetDelivery", other, NotFound, None, cp.deliveries_as(key), get_delivery, req);
    let req = proto::RetryDeliveryRequest { id: their_delivery.clone() };
    case!("RetryDelivery", other, NotFound, None, cp.deliveries_as(key), retry_delivery, req);
    let req = proto::ReplayWebhookRequest { webhook_id: theirs.id.clone(), created_after: ts(0), ..Default::default() };
    case!("ReplayWebhook", other, NotFound, None, cp.deliveries_as(key), replay_webhook, req);
    let req = proto::RotateWebhookSecretRequest { id: mine.id.clone(), secret: "short".into() };
    case!(
        "RotateWebhookSecret",
        "short secret",
        InvalidArgument,
        Some("secret"),
        cp.webhooks(),
        rotate_webhook_secret,
        req
    );
    let req = proto::SendTestEventRequest { webhook_id: mine.id.clone(), event_type: "incident.exploded".into() };
    let field = Some("event_type");
    case!("SendTestEvent", "unknown event type", InvalidArgument, field, cp.webhooks(), send_test_event, req);
    let req = proto::ReplayWebhookRequest {
        webhook_id: mine.id.clone(),
        created_after: ts(200),
        created_before: ts(100),
        include_all: false,
    };
    let field = Some("created_before");
    case!("ReplayWebhook", "inverted time range", InvalidArgument, field, cp.deliveries_as(key), replay_webhook, req);

    // Lists and their page tokens.
    for (what, token) in
        [("forged page token", "forged"), ("binary page token", "\u{1}\u{2}"), ("huge page token", "A")]
    {
        let token = if what == "huge page token" { token.repeat(10_000) } else { token.to_owned() };
        let req = proto::ListWebhooksRequest { page_size: 0, page_token: token.clone() };
        case!("ListWebhooks", what, InvalidArgument, Some("page_token"), cp.webhooks(), list_webhooks, req);
        let req = proto::ListDeliveriesRequest { page_token: token, ..Default::default() };
        case!("ListDeliveries", what, InvalidArgument, Some("page_token"), cp.deliveries_as(key), list_deliveries, req);
    }
    let req = proto::ListWebhooksRequest { page_size: -1, page_token: String::new() };
    case!("ListWebhooks", "negative page size", InvalidArgument, Some("page_size"), cp.webhooks(), list_webhooks, req);
    let lists = [
        ("wrong enum value", proto::ListDeliveriesRequest { status: 42, ..Default::default() }, "status"),
        (
            "forged webhook id",
            proto::ListDeliveriesRequest { webhook_id: "nope".into(), ..Default::default() },
            "webhook_id",
        ),
        (
            "unknown event type",
            proto::ListDeliveriesRequest { event_type: "incident.exploded".into(), ..Default::default() },
            "event_type",
        ),
        ("negative page size", proto::ListDeliveriesRequest { page_size: -5, ..Default::default() }, "page_size"),
        (
            "inverted time range",
            proto::ListDeliveriesRequest { created_after: ts(100), created_before: ts(50), ..Default::default() },
            "created_before",
        ),
        (
            "timestamp out of range",
            proto::ListDeliveriesRequest {
                created_after: Some(Timestamp { seconds: i64::MAX, nanos: 0 }),
                ..Default::default()
            },
            "created_after",
        ),
    ];
    for (what, req, field) in lists {
        let watch = proto::WatchDeliveriesRequest {
            webhook_id: req.webhook_id.clone(),
            status: req.status,
            event_type: req.event_type.clone(),
            created_after: req.created_after,
            created_before: req.created_before,
        };
        if field != "page_size" {
            let client = cp.deliveries_as(key);
            case!("WatchDeliveries", what, InvalidArgument, Some(field), client, watch_deliveries, watch);
        }
        case!("ListDeliveries", what, InvalidArgument, Some(field), cp.deliveries_as(key), list_deliveries, req);
    }
    let req = proto::ListAgentsRequest { zone: "eu west".into() };
    case!("ListAgents", "bad zone", InvalidArgument, Some("zone"), cp.agents_as(key), list_agents, req);

    // Publishing.
    let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(256 * 1024));
    let publishes: Vec<(&str, proto::Event, &str)> = vec![
        ("no type", event("", "{}"), "event.type"),
        ("unknown type", event("incident.exploded", "{}"), "event.type"),
        ("operational type", event("webhook.delivery.failed", "{}"), "event.type"),
        ("test type", event("webhook.test", "{}"), "event.type"),
        ("not JSON", event("incident.created", "{oops"), "event.data_json"),
        ("JSON array", event("incident.created", "[1,2]"), "event.data_json"),
        ("JSON string", event("incident.created", "\"x\""), "event.data_json"),
        ("JSON null", event("incident.created", "null"), "event.data_json"),
        ("over 256 KiB", event("incident.created", &big), "event.data_json"),
        ("nested 80 deep", event("incident.created", &deep_json(80)), "event.data_json"),
        ("bad id", proto::Event { id: "no spaces allowed".into(), ..event("incident.created", "{}") }, "event.id"),
        ("long id", proto::Event { id: "a".repeat(65), ..event("incident.created", "{}") }, "event.id"),
        (
            "both data and data_json",
            proto::Event { data: Some(Default::default()), ..event("incident.created", "{}") },
            "event.data_json",
        ),
        (
            "bad timestamp",
            proto::Event { timestamp: Some(Timestamp { seconds: 0, nanos: -5 }), ..event("incident.created", "{}") },
            "event.timestamp",
        ),
    ];
    for (what, e, field) in publishes {
        let req = proto::PublishEventRequest { event: Some(e.clone()) };
        case!("PublishEvent", what, InvalidArgument, Some(field), cp.events(), publish_event, req);
        let mut batch = vec![event("task.started", "{}"), event("task.started", "{}"), e];
        batch.swap(1, 2);
        let req = proto::PublishEventsRequest { events: batch };
        let field = field.replacen("event", "events[1]", 1);
        case!("PublishEvents", what, InvalidArgument, Some(field.as_str()), cp.events(), publish_events, req);
    }
    let req = proto::PublishEventRequest { event: None };
    case!("PublishEvent", "no event", InvalidArgument, Some("event"), cp.events(), publish_event, req);
    let req = proto::PublishEventsRequest { events: vec![] };
    case!("PublishEvents", "empty batch", InvalidArgument, Some("events"), cp.events(), publish_events, req);
    let req = proto::PublishEventsRequest { events: (0..1001).map(|_| event("task.started", "{}")).collect() };
    case!("PublishEvents", "1,001 events", InvalidArgument, Some("events"), cp.events(), publish_events, req);
    let huge = format!(r#"{{"x":"{}"}}"#, "a".repeat(200 * 1024));
    let req = proto::PublishEventsRequest { events: (0..400).map(|_| event("task.started", &huge)).collect() };
    // Past the 16 MiB message limit: tonic refuses before decoding, with OUT_OF_RANGE.
    case!("PublishEvents", "an 80 MB batch", OutOfRange, None, cp.events(), publish_events, req);

    // Agent sessions.
    let hello = |zone: &str, capacity: u32| proto::AgentMessage {
        msg: Some(agent_message::Msg::Hello(proto::Hello {
            agent_id: "a".into(),
            zone: zone.into(),
            version: "1".into(),
            capacity,
            ..Default::default()
        })),
    };
    let credit = proto::AgentMessage { msg: Some(agent_message::Msg::Credit(proto::Credit { jobs: 5 })) };
    let sessions: Vec<(&str, Vec<proto::AgentMessage>, Code, Option<&str>)> = vec![
        ("no hello", vec![], Code::InvalidArgument, Some("hello")),
        ("credit before hello", vec![credit], Code::InvalidArgument, Some("hello")),
        ("zone with a space", vec![hello("eu west", 4)], Code::InvalidArgument, Some("hello.zone")),
        ("zone too long", vec![hello(&"z".repeat(64), 4)], Code::InvalidArgument, Some("hello.zone")),
        ("zero capacity", vec![hello("eu", 0)], Code::InvalidArgument, Some("hello.capacity")),
    ];
    for (what, messages, code, field) in sessions {
        let mut client = cp.agents_as(Some(TOKEN));
        cases.push(Case {
            rpc: "Session",
            what: what.into(),
            code,
            field: field.map(str::to_owned),
            call: Box::pin(async move { client.session(tokio_stream::iter(messages)).await.map(|_| ()) }),
        });
    }
    let req = tokio_stream::iter(vec![hello("eu", 4)]);
    case!("Session", "an API key as agent token", Unauthenticated, None, cp.agents_as(key), session, req);

    // Bytes that are not the request message at all: garbage, and strings that are not UTF-8.
    let garbage = vec![0xff, 0xff, 0xff, 0xff, 0x0f, 0x07];
    for path in [
        "/herald.v1.WebhookService/CreateWebhook",
        "/herald.v1.WebhookService/GetWebhook",
        "/herald.v1.WebhookService/ListWebhooks",
        "/herald.v1.WebhookService/UpdateWebhook",
        "/herald.v1.WebhookService/DeleteWebhook",
        "/herald.v1.WebhookService/RotateWebhookSecret",
        "/herald.v1.WebhookService/SendTestEvent",
        "/herald.v1.WebhookService/ListEventTypes",
        "/herald.v1.WebhookService/ListTemplates",
        "/herald.v1.EventService/PublishEvent",
        "/herald.v1.EventService/PublishEvents",
        "/herald.v1.EventService/GetEvent",
        "/herald.v1.DeliveryService/ListDeliveries",
        "/herald.v1.DeliveryService/GetDelivery",
        "/herald.v1.DeliveryService/RetryDelivery",
        "/herald.v1.DeliveryService/ReplayWebhook",
        "/herald.v1.AgentService/ListAgents",
    ] {
        let rpc = path.rsplit('/').next().unwrap();
        cases.push(Case {
            rpc: "raw",
            what: format!("{rpc}: bytes that are not protobuf"),
            code: Code::InvalidArgument,
            field: None,
            call: raw(&cp, path, garbage.clone()),
        });
    }
    let utf8 = [
        (
            "/herald.v1.WebhookService/CreateWebhook",
            with_invalid_utf8(
                &proto::CreateWebhookRequest { webhook: Some(webhook("SENTINEL", "https://example.com", &["*"])) },
                "SENTINEL",
            ),
            "Webhook.name",
        ),
        (
            "/herald.v1.EventService/PublishEvent",
            with_invalid_utf8(
                &proto::PublishEventRequest { event: Some(event("incident.created", r#"{"SENTINEL":1}"#)) },
                "SENTINEL",
            ),
            "Event.data_json",
        ),
        (
            "/herald.v1.WebhookService/GetWebhook",
            with_invalid_utf8(&proto::GetWebhookRequest { id: "wh_SENTINEL".into() }, "SENTINEL"),
            "GetWebhookRequest.id",
        ),
    ];
    for (path, bytes, field) in utf8 {
        cases.push(Case {
            rpc: "raw",
            what: format!("invalid UTF-8 in {field}"),
            code: Code::InvalidArgument,
            field: Some(format!("decode:{field}")),
            call: raw(&cp, path, bytes),
        });
    }

    let count = cases.len();
    let mut before = db.snapshot().await;
    for case in cases {
        let Case { rpc, what, code, field, call } = case;
        let err = call.await.expect_err(&format!("{rpc} / {what}: must be refused"));
        assert_eq!(err.code(), code, "{rpc} / {what}: {err:?}");
        match field.as_deref().map(|f| f.strip_prefix("decode:").ok_or(f)) {
            // A message that does not decode carries no BadRequest detail; prost names the field.
            Some(Ok(decoded)) => assert!(err.message().contains(decoded), "{rpc} / {what}: {err:?}"),
            Some(Err(f)) => {
                assert_eq!(bad_field(&err).as_deref(), Some(f), "{rpc} / {what}: {}", err.message());
                assert!(err.message().starts_with(f), "{rpc} / {what}: the message names the field");
            }
            None => assert!(!err.message().is_empty(), "{rpc} / {what}: a reason is given"),
        }
        let after = db.snapshot().await;
        assert!(after == before, "{rpc} / {what}: the database changed");
        before = after;
    }
    assert!(count >= 150, "the matrix has {count} cases");
    // Filtering by another workspace's webhook finds nothing, exactly as for an id of nothing:
    // the answer does not tell whether the id exists elsewhere.
    for webhook_id in [theirs.id.clone(), "wh_01aaaaaaaaaaaaaaaaaaaaaaaa".to_owned()] {
        let req = proto::ListDeliveriesRequest { webhook_id, ..Default::default() };
        let listed = cp.deliveries_as(key).list_deliveries(req).await.unwrap().into_inner();
        assert!(listed.deliveries.is_empty() && listed.next_page_token.is_empty());
    }
    println!("hostile-input matrix: {count} cases");
    cp.stop().await;
}
