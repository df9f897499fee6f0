//! `herald webhooks|events|deliveries|agents|templates …`: the API from a terminal.
//!
//! Every command is one or a few gRPC calls with the key from `--api-key` (`HERALD_API_KEY`) to
//! `--addr` (`HERALD_ADDR`; `--server` and `HERALD_SERVER`, the names before, still work).
//! Results print as tables for people, or as JSON with `--json` for scripts; colours only when
//! stdout is a terminal and `NO_COLOR` is unset; a progress bar when a large file of events is
//! published from a terminal. Errors print the server's message, which names the field at fault,
//! and exit non-zero.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use herald_shared::proto::{
    self, agent_service_client::AgentServiceClient, delivery_service_client::DeliveryServiceClient,
    event_service_client::EventServiceClient, webhook_service_client::WebhookServiceClient,
};
use serde_json::{Value as Json, json};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// How to reach the API.
#[derive(Args, Clone, Debug)]
pub struct ClientArgs {
    /// The control plane's gRPC address (`https://…` for TLS) [default: http://127.0.0.1:7070,
    /// or `HERALD_SERVER` when set].
    #[arg(long, visible_alias = "server", global = true, env = "HERALD_ADDR")]
    pub addr: Option<String>,
    /// An API key of the workspace to act in.
    #[arg(long, global = true, env = "HERALD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// A PEM CA that signed the server's certificate, besides the system roots.
    #[arg(long, global = true, env = "HERALD_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Print JSON (one document, or one line per change for `watch`) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Where the client commands look for the control plane when told nothing.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:7070";

impl ClientArgs {
    /// The address to call: `--addr` (or `--server`), else `HERALD_ADDR`, else `HERALD_SERVER`
    /// (the variable's name before), else [`DEFAULT_ADDR`].
    pub fn addr(&self) -> String {
        self.addr
            .clone()
            .or_else(|| std::env::var("HERALD_SERVER").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| DEFAULT_ADDR.to_owned())
    }
}

#[derive(Subcommand, Debug)]
pub enum WebhooksCommand {
    /// Create a webhook; prints its signing secret, once.
    Create {
        #[command(flatten)]
        spec: WebhookFlags,
        /// The signing secret (default: a generated `whsec_…`).
        #[arg(long)]
        secret: Option<String>,
        /// Start from a template (`herald templates list`): its headers and transform.
        #[arg(long)]
        template: Option<String>,
    },
    /// List the workspace's webhooks.
    List,
    /// Show one webhook.
    Get { id: String },
    /// Change the fields given; leave the others.
    Update {
        id: String,
        #[command(flatten)]
        spec: WebhookFlags,
        /// Pause (`false`) or resume (`true`) deliveries.
        #[arg(long)]
        active: Option<bool>,
    },
    /// Delete a webhook; its open deliveries are cancelled.
    Delete { id: String },
    /// Replace the signing secret; the old one keeps signing during the grace period.
    RotateSecret {
        id: String,
        /// The new secret (default: a generated `whsec_…`).
        #[arg(long)]
        secret: Option<String>,
    },
    /// Send a test event (`webhook.test`, or a sample of `--event-type`).
    Test {
        id: String,
        #[arg(long, default_value = "")]
        event_type: String,
    },
}

/// Webhook fields, for create and update.
#[derive(Args, Debug, Default)]
pub struct WebhookFlags {
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub url: Option<String>,
    /// Event types or patterns, comma-separated (`incident.*,task.failed`, `*`).
    #[arg(long, value_delimiter = ',')]
    pub events: Option<Vec<String>>,
    #[arg(long)]
    pub zone: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
    /// A custom header, `Name: value` (repeatable).
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// A transform variable, `name=value` (repeatable).
    #[arg(long = "var")]
    pub vars: Vec<String>,
    /// `cloudthinker` or `standard-webhooks`.
    #[arg(long)]
    pub scheme: Option<String>,
    /// Per-attempt timeout, e.g. `10s`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<std::time::Duration>,
}

#[derive(Subcommand, Debug)]
pub enum EventsCommand {
    /// Publish events. One: `--type T '{"data":…}'`. Many: `--file events.jsonl` (`-` for
    /// stdin), one JSON object per line with `type`, `data` and optionally `id`.
    Publish {
        /// The event type of the single event given as DATA.
        #[arg(long = "type")]
        event_type: Option<String>,
        /// The publisher's id of the single event (for idempotency).
        #[arg(long)]
        id: Option<String>,
        /// The single event's data, a JSON object.
        data: Option<String>,
        /// A file of events, one JSON object per line; `-` reads stdin.
        #[arg(long, conflicts_with = "data")]
        file: Option<PathBuf>,
        /// Events per PublishEvents call.
        #[arg(long, default_value_t = 500)]
        batch: usize,
    },
}

/// Filters of `deliveries list` and `deliveries watch` (DESIGN.md's log filters).
#[derive(Args, Debug, Default)]
pub struct DeliveryFilters {
    #[arg(long)]
    pub webhook: Option<String>,
    /// `pending`, `in-flight`, `succeeded`, `failed` or `cancelled`.
    #[arg(long)]
    pub status: Option<String>,
    #[arg(long)]
    pub event_type: Option<String>,
    /// Created after: RFC 3339, or a duration ago (`1h`).
    #[arg(long)]
    pub since: Option<String>,
    /// Created before: RFC 3339, or a duration ago.
    #[arg(long)]
    pub until: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum DeliveriesCommand {
    /// List deliveries, newest first.
    List {
        #[command(flatten)]
        filters: DeliveryFilters,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Show one delivery with every attempt.
    Get { id: String },
    /// Make one more attempt now.
    Retry { id: String },
    /// Follow deliveries as they change, until interrupted.
    Watch {
        #[command(flatten)]
        filters: DeliveryFilters,
        /// Stop after this many changes.
        #[arg(long)]
        count: Option<usize>,
    },
}

#[derive(Subcommand, Debug)]
pub enum AgentsCommand {
    /// The connected agents, their zones and egress IPs.
    List {
        #[arg(long, default_value = "")]
        zone: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TemplatesCommand {
    /// The built-in templates (Slack, Jira, PagerDuty, GitHub Actions).
    List,
}

type Authed = InterceptedService<Channel, Bearer>;

#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A connection and the way to print.
pub struct Client {
    channel: Channel,
    bearer: Bearer,
    json: bool,
    colour: bool,
}

impl Client {
    pub async fn connect(args: &ClientArgs) -> anyhow::Result<Client> {
        let addr = args.addr();
        let mut endpoint = Channel::from_shared(addr.clone())
            .with_context(|| format!("{addr:?} (--addr, HERALD_ADDR) is not a URL"))?;
        if addr.starts_with("https://") {
            let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
            if let Some(ca) = &args.ca_cert {
                let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
            }
            endpoint = endpoint.tls_config(tls)?;
        }
        let channel = endpoint
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("cannot reach {addr}"))?;
        let key = args.api_key.as_deref().context("an API key is needed: --api-key or HERALD_API_KEY")?;
        let bearer = Bearer(Some(format!("Bearer {key}").parse().context("the API key is not valid in a header")?));
        let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        Ok(Client { channel, bearer, json: args.json, colour })
    }

    fn webhooks(&self) -> WebhookServiceClient<Authed> {
        WebhookServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    fn events(&self) -> EventServiceClient<Authed> {
        EventServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    fn deliveries(&self) -> DeliveryServiceClient<Authed> {
        DeliveryServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    fn agents(&self) -> AgentServiceClient<Authed> {
        AgentServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    /// Prints `value` as JSON, or `table` for people.
    fn print(&self, value: &Json, table: impl FnOnce() -> String) {
        let text = if self.json { serde_json::to_string_pretty(value).expect("JSON") } else { table() };
        println!("{text}");
    }

    /// A status, coloured by its first word on a terminal.
    fn status(&self, s: &str) -> String {
        let code = match s.split(' ').next().unwrap_or_default() {
            "succeeded" | "delivered" | "active" => "32",
            "failed" | "cancelled" => "31",
            "pending" | "in_flight" | "paused" => "33",
            _ => return s.to_owned(),
        };
        if self.colour { format!("\x1b[{code}m{s}\x1b[0m") } else { s.to_owned() }
    }
}

/// Turns a gRPC status into the error printed: the server's message names the field.
fn failed(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    for r in rows {
        t.add_row(r);
    }
    t.to_string()
}

fn time(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn delivery_status(v: i32) -> &'static str {
    match proto::DeliveryStatus::try_from(v).unwrap_or_default() {
        proto::DeliveryStatus::Pending => "pending",
        proto::DeliveryStatus::InFlight => "in_flight",
        proto::DeliveryStatus::Succeeded => "succeeded",
        proto::DeliveryStatus::Failed => "failed",
        proto::DeliveryStatus::Cancelled => "cancelled",
        proto::DeliveryStatus::Unspecified => "unspecified",
    }
}

fn webhook_json(w: &proto::Webhook) -> Json {
    json!({
        "id": w.id, "name": w.name, "url": w.url, "events": w.events, "zone": w.zone,
        "active": w.active.unwrap_or(true), "description": w.description,
        "secret": (!w.secret.is_empty()).then_some(&w.secret), "headers": w.headers,
        "transform": w.transform.as_ref().and_then(|t| crate::api::json::to_json(t, 0)),
        "transform_vars": w.transform_vars,
        "signature_scheme": proto::SignatureScheme::try_from(w.signature_scheme).unwrap_or_default().as_str_name(),
        "timeout_ms": w.timeout.map(|d| d.seconds * 1000 + i64::from(d.nanos) / 1_000_000),
        "rate_limit_per_second": w.rate_limit_per_second, "max_in_flight": w.max_in_flight,
        "created_at": time(&w.created_at), "updated_at": time(&w.updated_at),
        "rotation_grace_ends_at": w.rotation_grace_ends_at.is_some().then(|| time(&w.rotation_grace_ends_at)),
    })
}

fn attempt_json(a: &proto::Attempt) -> Json {
    json!({
        "number": a.number, "agent_id": a.agent_id, "zone": a.zone, "started_at": time(&a.started_at),
        "duration_ms": a.duration.map(|d| d.seconds * 1000 + i64::from(d.nanos) / 1_000_000),
        "response_status": a.response_status,
        "error_kind": proto::ErrorKind::try_from(a.error_kind).unwrap_or_default().as_str_name(),
        "error_message": a.error_message, "request_headers": a.request_headers, "request_body": a.request_body,
        "response_headers": a.response_headers, "response_body": a.response_body, "stale": a.stale, "manual": a.manual,
    })
}

fn delivery_json(d: &proto::Delivery) -> Json {
    json!({
        "id": d.id, "event_id": d.event_id, "webhook_id": d.webhook_id, "event_type": d.event_type,
        "status": delivery_status(d.status), "paused": d.paused, "zone": d.zone, "test": d.test,
        "waiting_for_agent": d.waiting_for_agent,
        "attempt_count": d.attempt_count,
        "next_attempt_at": d.next_attempt_at.is_some().then(|| time(&d.next_attempt_at)),
        "created_at": time(&d.created_at), "updated_at": time(&d.updated_at),
        "attempts": d.attempts.iter().map(attempt_json).collect::<Vec<_>>(),
    })
}

fn event_json(e: &proto::Event) -> Json {
    json!({
        "id": e.id, "type": e.r#type, "timestamp": time(&e.timestamp), "workspace_id": e.workspace_id,
        "deliveries": e.deliveries.iter().map(|d| json!({
            "id": d.id, "webhook_id": d.webhook_id, "status": delivery_status(d.status),
            "attempt_count": d.attempt_count,
        })).collect::<Vec<_>>(),
    })
}

fn pairs(items: &[String], sep: char, what: &str) -> anyhow::Result<std::collections::HashMap<String, String>> {
    items
        .iter()
        .map(|i| {
            let (k, v) = i.split_once(sep).with_context(|| format!("{what} {i:?} must read `name{sep}value`"))?;
            Ok((k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect()
}

/// The webhook the flags describe, and the mask of the fields they set.
fn webhook_from(f: &WebhookFlags) -> anyhow::Result<(proto::Webhook, Vec<&'static str>)> {
    let mut w = proto::Webhook::default();
    let mut mask = Vec::new();
    if let Some(v) = &f.name {
        w.name = v.clone();
        mask.push("name");
    }
    if let Some(v) = &f.url {
        w.url = v.clone();
        mask.push("url");
    }
    if let Some(v) = &f.events {
        w.events = v.clone();
        mask.push("events");
    }
    if let Some(v) = &f.zone {
        w.zone = v.clone();
        mask.push("zone");
    }
    if let Some(v) = &f.description {
        w.description = v.clone();
        mask.push("description");
    }
    if !f.headers.is_empty() {
        w.headers = pairs(&f.headers, ':', "--header")?;
        mask.push("headers");
    }
    if !f.vars.is_empty() {
        w.transform_vars = pairs(&f.vars, '=', "--var")?;
        mask.push("transform_vars");
    }
    if let Some(s) = &f.scheme {
        w.signature_scheme = match s.as_str() {
            "cloudthinker" => proto::SignatureScheme::Cloudthinker as i32,
            "standard-webhooks" => proto::SignatureScheme::StandardWebhooks as i32,
            other => bail!("--scheme must be cloudthinker or standard-webhooks, not {other:?}"),
        };
        mask.push("signature_scheme");
    }
    if let Some(t) = f.timeout {
        w.timeout = Some(prost_types::Duration { seconds: t.as_secs() as i64, nanos: t.subsec_nanos() as i32 });
        mask.push("timeout");
    }
    Ok((w, mask))
}

fn webhooks_table(hooks: &[proto::Webhook]) -> String {
    let rows = hooks
        .iter()
        .map(|w| {
            let state = if w.active.unwrap_or(true) { "active" } else { "paused" };
            vec![w.id.clone(), w.name.clone(), w.url.clone(), w.events.join(","), w.zone.clone(), state.to_owned()]
        })
        .collect();
    table(&["ID", "NAME", "URL", "EVENTS", "ZONE", "STATE"], rows)
}

fn webhook_detail(w: &proto::Webhook) -> String {
    let mut out = webhooks_table(std::slice::from_ref(w));
    if !w.secret.is_empty() {
        out.push_str(&format!("\nsigning secret (shown once): {}", w.secret));
    }
    if let Some(t) = &w.rotation_grace_ends_at {
        out.push_str(&format!("\nthe previous secret keeps signing until {}", time(&Some(*t))));
    }
    out
}

/// A template's headers, added where the user's own (`--header`) do not already name them, in
/// any case: the template's values are placeholders to fill in (`Basic <base64 of
/// email:api_token>`), the user's are the real ones.
fn add_template_headers(
    headers: &mut std::collections::HashMap<String, String>,
    template: std::collections::HashMap<String, String>,
) {
    for (name, value) in template {
        if !headers.keys().any(|given| given.eq_ignore_ascii_case(&name)) {
            headers.insert(name, value);
        }
    }
}

pub async fn webhooks(client: &ClientArgs, cmd: WebhooksCommand) -> anyhow::Result<()> {
    let c = Client::connect(client).await?;
    let mut api = c.webhooks();
    match cmd {
        WebhooksCommand::Create { spec, secret, template } => {
            let (mut w, _) = webhook_from(&spec)?;
            if let Some(name) = template {
                let all = api.list_templates(proto::ListTemplatesRequest {}).await.map_err(failed)?.into_inner();
                let t = all.templates.into_iter().find(|t| t.id == name || t.name == name);
                let t = t.with_context(|| format!("no template {name:?}: see `herald templates list`"))?;
                w.transform = t.transform;
                add_template_headers(&mut w.headers, t.headers);
                if w.events.is_empty() {
                    w.events = t.default_events;
                }
            }
            w.secret = secret.unwrap_or_default();
            let w = api.create_webhook(proto::CreateWebhookRequest { webhook: Some(w) }).await.map_err(failed)?;
            let w = w.into_inner();
            c.print(&webhook_json(&w), || webhook_detail(&w));
        }
        WebhooksCommand::List => {
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = api
                    .list_webhooks(proto::ListWebhooksRequest { page_size: 100, page_token })
                    .await
                    .map_err(failed)?
                    .into_inner();
                all.extend(page.webhooks);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            c.print(&Json::Array(all.iter().map(webhook_json).collect()), || webhooks_table(&all));
        }
        WebhooksCommand::Get { id } => {
            let w = api.get_webhook(proto::GetWebhookRequest { id }).await.map_err(failed)?.into_inner();
            c.print(&webhook_json(&w), || webhook_detail(&w));
        }
        WebhooksCommand::Update { id, spec, active } => {
            let (mut w, mut mask) = webhook_from(&spec)?;
            if let Some(a) = active {
                w.active = Some(a);
                mask.push("active");
            }
            if mask.is_empty() {
                bail!("nothing to change: give at least one of --name, --url, --events, --active, …");
            }
            w.id = id;
            let update_mask = Some(prost_types::FieldMask { paths: mask.iter().map(|p| (*p).to_owned()).collect() });
            let w = api.update_webhook(proto::UpdateWebhookRequest { webhook: Some(w), update_mask }).await;
            let w = w.map_err(failed)?.into_inner();
            c.print(&webhook_json(&w), || webhook_detail(&w));
        }
        WebhooksCommand::Delete { id } => {
            let r = api.delete_webhook(proto::DeleteWebhookRequest { id: id.clone() }).await.map_err(failed)?;
            let n = r.into_inner().cancelled_deliveries;
            c.print(&json!({"id": id, "deleted": true, "cancelled_deliveries": n}), || {
                format!("deleted {id}; {n} open deliveries cancelled")
            });
        }
        WebhooksCommand::RotateSecret { id, secret } => {
            let req = proto::RotateWebhookSecretRequest { id, secret: secret.unwrap_or_default() };
            let w = api.rotate_webhook_secret(req).await.map_err(failed)?.into_inner();
            c.print(&webhook_json(&w), || webhook_detail(&w));
        }
        WebhooksCommand::Test { id, event_type } => {
            let req = proto::SendTestEventRequest { webhook_id: id, event_type };
            let r = api.send_test_event(req).await.map_err(failed)?.into_inner();
            c.print(&json!({"event_id": r.event_id, "delivery_id": r.delivery_id}), || {
                format!(
                    "test event {} queued as delivery {}\nfollow it: herald deliveries get {}",
                    r.event_id, r.delivery_id, r.delivery_id
                )
            });
        }
    }
    Ok(())
}

/// One line of an events file: `{"type": …, "data": {…}, "id": …}`. `data` is sent byte for
/// byte as written (`150.00` stays `150.00`).
fn event_line(line: &str, n: usize) -> anyhow::Result<proto::Event> {
    #[derive(serde::Deserialize)]
    struct Line<'a> {
        #[serde(rename = "type")]
        event_type: String,
        #[serde(default)]
        id: String,
        #[serde(borrow)]
        data: Option<&'a serde_json::value::RawValue>,
    }
    let l: Line = serde_json::from_str(line).with_context(|| format!("line {n}: not an event object"))?;
    Ok(proto::Event {
        id: l.id,
        r#type: l.event_type,
        data_json: l.data.map_or_else(|| "{}".to_owned(), |d| d.get().to_owned()),
        ..Default::default()
    })
}

pub async fn events(client: &ClientArgs, cmd: EventsCommand) -> anyhow::Result<()> {
    let EventsCommand::Publish { event_type, id, data, file, batch } = cmd;
    let c = Client::connect(client).await?;
    let mut api = c.events();
    if let Some(path) = file {
        let reader: Box<dyn std::io::BufRead> = if path.as_os_str() == "-" {
            Box::new(std::io::stdin().lock())
        } else {
            Box::new(std::io::BufReader::new(
                std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?,
            ))
        };
        let mut events = Vec::new();
        for (i, line) in reader.lines().enumerate() {
            let line = line.context("cannot read the events")?;
            if !line.trim().is_empty() {
                events.push(event_line(&line, i + 1)?);
            }
        }
        let bar = indicatif::ProgressBar::new(events.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} events {per_sec} {eta}")
                .expect("a valid template"),
        );
        if !std::io::stderr().is_terminal() || events.len() < 1000 {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let mut published = Vec::new();
        for chunk in events.chunks(batch.clamp(1, 1000)) {
            let r = api.publish_events(proto::PublishEventsRequest { events: chunk.to_vec() }).await;
            let r = r.map_err(|s| failed(s).context(format!("after {} events were published", published.len())))?;
            bar.inc(chunk.len() as u64);
            published.extend(r.into_inner().events);
        }
        bar.finish_and_clear();
        let deliveries: usize = published.iter().map(|e| e.deliveries.len()).sum();
        c.print(&Json::Array(published.iter().map(event_json).collect()), || {
            format!("published {} events; {deliveries} deliveries queued", published.len())
        });
        return Ok(());
    }
    let event_type = event_type.context("give --type and DATA for one event, or --file for many")?;
    let data = match data.as_deref() {
        Some("-") | None => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("cannot read stdin")?;
            s
        }
        Some(d) => d.to_owned(),
    };
    let e = proto::Event {
        id: id.unwrap_or_default(),
        r#type: event_type,
        data_json: data.trim().to_owned(),
        ..Default::default()
    };
    let e = api.publish_event(proto::PublishEventRequest { event: Some(e) }).await.map_err(failed)?.into_inner();
    c.print(&event_json(&e), || {
        let rows = e
            .deliveries
            .iter()
            .map(|d| vec![d.id.clone(), d.webhook_id.clone(), delivery_status(d.status).to_owned()])
            .collect();
        format!("event {} ({})\n{}", e.id, e.r#type, table(&["DELIVERY", "WEBHOOK", "STATUS"], rows))
    });
    Ok(())
}

fn status_filter(s: &Option<String>) -> anyhow::Result<i32> {
    Ok(match s.as_deref() {
        None => 0,
        Some("pending") => proto::DeliveryStatus::Pending as i32,
        Some("in-flight" | "in_flight") => proto::DeliveryStatus::InFlight as i32,
        Some("succeeded") => proto::DeliveryStatus::Succeeded as i32,
        Some("failed") => proto::DeliveryStatus::Failed as i32,
        Some("cancelled") => proto::DeliveryStatus::Cancelled as i32,
        Some(other) => bail!("--status must be pending, in-flight, succeeded, failed or cancelled, not {other:?}"),
    })
}

/// RFC 3339, or a duration ago.
fn when(s: &str) -> anyhow::Result<prost_types::Timestamp> {
    let t = match humantime::parse_duration(s) {
        Ok(ago) => chrono::Utc::now() - chrono::Duration::from_std(ago).context("too long ago")?,
        Err(_) => chrono::DateTime::parse_from_rfc3339(s)
            .with_context(|| format!("{s:?} is neither RFC 3339 nor a duration like 1h"))?
            .with_timezone(&chrono::Utc),
    };
    Ok(prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 })
}

/// A delivery's status for people: `paused`, or pending with no agent of its zone connected.
fn shown_status(d: &proto::Delivery) -> String {
    if d.paused {
        "paused".to_owned()
    } else if d.waiting_for_agent {
        format!("pending (no agent in zone {})", d.zone)
    } else {
        delivery_status(d.status).to_owned()
    }
}

fn deliveries_table(ds: &[proto::Delivery]) -> String {
    let rows = ds
        .iter()
        .map(|d| {
            let status = shown_status(d);
            vec![
                d.id.clone(),
                d.event_type.clone(),
                d.webhook_id.clone(),
                status,
                d.attempt_count.to_string(),
                time(&d.created_at),
            ]
        })
        .collect();
    table(&["DELIVERY", "EVENT TYPE", "WEBHOOK", "STATUS", "ATTEMPTS", "CREATED"], rows)
}

fn delivery_detail(d: &proto::Delivery) -> String {
    let mut out = deliveries_table(std::slice::from_ref(d));
    let rows = d
        .attempts
        .iter()
        .map(|a| {
            let outcome = match a.response_status {
                0 => proto::ErrorKind::try_from(a.error_kind)
                    .unwrap_or_default()
                    .as_str_name()
                    .trim_start_matches("ERROR_KIND_")
                    .to_ascii_lowercase(),
                s => s.to_string(),
            };
            let ms = a.duration.map(|d| d.seconds * 1000 + i64::from(d.nanos) / 1_000_000).unwrap_or_default();
            vec![
                a.number.to_string(),
                time(&a.started_at),
                format!("{ms} ms"),
                outcome,
                a.agent_id.clone(),
                a.error_message.clone(),
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(&["#", "STARTED", "TOOK", "ANSWER", "AGENT", "ERROR"], rows));
    out
}

pub async fn deliveries(client: &ClientArgs, cmd: DeliveriesCommand) -> anyhow::Result<()> {
    let c = Client::connect(client).await?;
    let mut api = c.deliveries();
    match cmd {
        DeliveriesCommand::List { filters, limit } => {
            let mut req = proto::ListDeliveriesRequest {
                webhook_id: filters.webhook.unwrap_or_default(),
                status: status_filter(&filters.status)?,
                event_type: filters.event_type.unwrap_or_default(),
                created_after: filters.since.as_deref().map(when).transpose()?,
                created_before: filters.until.as_deref().map(when).transpose()?,
                page_size: limit.min(100) as i32,
                page_token: String::new(),
            };
            let mut all = Vec::new();
            while all.len() < limit {
                let page = api.list_deliveries(req.clone()).await.map_err(failed)?.into_inner();
                all.extend(page.deliveries);
                if page.next_page_token.is_empty() {
                    break;
                }
                req.page_token = page.next_page_token;
            }
            all.truncate(limit);
            c.print(&Json::Array(all.iter().map(delivery_json).collect()), || deliveries_table(&all));
        }
        DeliveriesCommand::Get { id } => {
            let d = api.get_delivery(proto::GetDeliveryRequest { id }).await.map_err(failed)?.into_inner();
            c.print(&delivery_json(&d), || delivery_detail(&d));
        }
        DeliveriesCommand::Retry { id } => {
            let d = api.retry_delivery(proto::RetryDeliveryRequest { id }).await.map_err(failed)?.into_inner();
            c.print(&delivery_json(&d), || {
                format!("one more attempt queued\n{}", deliveries_table(std::slice::from_ref(&d)))
            });
        }
        DeliveriesCommand::Watch { filters, count } => {
            let req = proto::WatchDeliveriesRequest {
                webhook_id: filters.webhook.unwrap_or_default(),
                status: status_filter(&filters.status)?,
                event_type: filters.event_type.unwrap_or_default(),
                created_after: filters.since.as_deref().map(when).transpose()?,
                created_before: filters.until.as_deref().map(when).transpose()?,
            };
            let mut stream = api.watch_deliveries(req).await.map_err(failed)?.into_inner();
            let mut seen = 0;
            let mut out = std::io::stdout();
            while count.is_none_or(|n| seen < n) {
                let Some(change) = stream.message().await.map_err(failed)? else { break };
                let Some(d) = change.delivery else { continue };
                seen += 1;
                if c.json {
                    writeln!(out, "{}", serde_json::to_string(&delivery_json(&d))?)?;
                } else {
                    let status = shown_status(&d);
                    writeln!(
                        out,
                        "{}  {}  {}  {}  attempts={}",
                        time(&d.updated_at),
                        d.id,
                        d.event_type,
                        c.status(&status),
                        d.attempt_count
                    )?;
                }
                out.flush()?;
            }
        }
    }
    Ok(())
}

pub async fn agents(client: &ClientArgs, cmd: AgentsCommand) -> anyhow::Result<()> {
    let AgentsCommand::List { zone } = cmd;
    let c = Client::connect(client).await?;
    let agents = c.agents().list_agents(proto::ListAgentsRequest { zone }).await.map_err(failed)?.into_inner().agents;
    let value = Json::Array(
        agents
            .iter()
            .map(|a| {
                json!({"id": a.id, "zone": a.zone, "version": a.version, "egress_ips": a.egress_ips,
                    "in_flight": a.in_flight, "capacity": a.capacity, "connected_since": time(&a.connected_since)})
            })
            .collect(),
    );
    c.print(&value, || {
        let rows = agents
            .iter()
            .map(|a| {
                vec![
                    a.id.clone(),
                    a.zone.clone(),
                    a.version.clone(),
                    a.egress_ips.join(","),
                    format!("{}/{}", a.in_flight, a.capacity),
                    time(&a.connected_since),
                ]
            })
            .collect();
        table(&["AGENT", "ZONE", "VERSION", "EGRESS IPS", "IN FLIGHT", "CONNECTED SINCE"], rows)
    });
    Ok(())
}

pub async fn templates(client: &ClientArgs, cmd: TemplatesCommand) -> anyhow::Result<()> {
    let TemplatesCommand::List = cmd;
    let c = Client::connect(client).await?;
    let all = c.webhooks().list_templates(proto::ListTemplatesRequest {}).await.map_err(failed)?.into_inner().templates;
    let value = Json::Array(
        all.iter()
            .map(|t| {
                json!({"id": t.id, "name": t.name, "description": t.description, "url_pattern": t.url_pattern,
                    "default_events": t.default_events, "required_vars": t.required_vars,
                    "transform": t.transform.as_ref().and_then(|v| crate::api::json::to_json(v, 0))})
            })
            .collect(),
    );
    c.print(&value, || {
        let rows = all
            .iter()
            .map(|t| {
                vec![
                    t.id.clone(),
                    t.name.clone(),
                    t.url_pattern.clone(),
                    t.required_vars.join(","),
                    t.description.clone(),
                ]
            })
            .collect();
        table(&["ID", "NAME", "URL", "VARIABLES", "WHAT"], rows)
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_templates_headers_never_replace_the_users_own() {
        let mut headers: std::collections::HashMap<String, String> =
            [("authorization".to_owned(), "Basic dXNlcjp0b2tlbg==".to_owned())].into();
        let template = [
            ("Authorization".to_owned(), "Basic <base64 of email:api_token>".to_owned()),
            ("X-Atlassian-Token".to_owned(), "no-check".to_owned()),
        ];
        add_template_headers(&mut headers, template.into());
        assert_eq!(headers.len(), 2, "{headers:?}");
        assert_eq!(headers["authorization"], "Basic dXNlcjp0b2tlbg==");
        assert_eq!(headers["X-Atlassian-Token"], "no-check");
    }
}
