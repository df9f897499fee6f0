//! Herald's sender agent: dials out to the control plane, holds an `AgentService.Session`, and for
//! each job signs, sends and reports one attempt.
//!
//! Architecture invariant: the agent keeps no state on disk and holds no database credentials. A
//! killed agent loses only its leases, which expire and are dispatched again. Results it could
//! not report (the session broke) are kept in memory and sent with the next session's hello.

pub mod egress;
pub mod metrics;
pub mod send;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use herald_shared::proto::{self, agent_message, agent_service_client::AgentServiceClient, control_message};
use rand::Rng as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

/// The stateless sender agent. No `Debug`: the token is a secret.
#[derive(Clone, Parser)]
#[command(name = "herald-agent", version, about)]
pub struct Args {
    /// Control-plane address; repeat for several (tried in turn).
    #[arg(long = "control-plane", env = "HERALD_CONTROL_PLANE", value_delimiter = ',', required = true)]
    pub control_planes: Vec<String>,
    /// The zone this agent serves.
    #[arg(long, env = "HERALD_ZONE", default_value = "default")]
    pub zone: String,
    /// Agent token, as configured on the control plane with `--agent-token`.
    #[arg(long, env = "HERALD_AGENT_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Stable id of this agent (for example the pod name); generated when absent.
    #[arg(long, env = "HERALD_AGENT_ID")]
    pub agent_id: Option<String>,
    /// Jobs held at once.
    #[arg(long, env = "HERALD_MAX_IN_FLIGHT", default_value_t = 256)]
    pub max_in_flight: u32,
    /// Threads that run the agent's work; one per available core when absent. On a machine
    /// whose cores are shared with other busy processes, fewer threads hop less between them
    /// (docs/BENCHMARKS.md item 49); more agents, not more threads, add capacity.
    #[arg(long, env = "HERALD_WORKER_THREADS")]
    pub worker_threads: Option<std::num::NonZeroUsize>,
    /// Address of the `/healthz` and `/readyz` probes (ready while a session is open) and of
    /// `/metrics`.
    #[arg(long, env = "HERALD_HTTP_ADDR", default_value = "127.0.0.1:9091")]
    pub http_addr: std::net::SocketAddr,
    /// Public address requests leave from, shown to customers for allowlists. Repeatable.
    #[arg(long, env = "HERALD_EGRESS_IP", value_delimiter = ',')]
    pub egress_ip: Vec<String>,
    /// Address range the egress guard lets through (development and tests). Repeatable.
    #[arg(long, env = "HERALD_ALLOW_CIDR", value_delimiter = ',')]
    pub allow_cidr: Vec<ipnet::IpNet>,
    /// PEM CA certificate to trust in addition to the system roots (receivers and control plane).
    #[arg(long, env = "HERALD_EXTRA_CA_CERT")]
    pub extra_ca_cert: Option<std::path::PathBuf>,
    /// Allow plain `http://` endpoints (development only).
    #[arg(long, env = "HERALD_ALLOW_HTTP")]
    pub allow_http: bool,
    /// PEM client certificate presented to control planes that require mTLS (`--client-ca`).
    #[arg(long, env = "HERALD_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<std::path::PathBuf>,
    /// PEM private key of `--client-cert`.
    #[arg(long, env = "HERALD_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<std::path::PathBuf>,
    /// How long a drain (SIGTERM) waits for in-flight attempts before giving up on them.
    #[arg(long, env = "HERALD_DRAIN_TIMEOUT", default_value = "75s", value_parser = humantime_duration)]
    pub drain_timeout: Duration,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("invalid duration {s:?}: use ms, s or m")),
    }
}

/// An open session as the outbox sees it: its outbound queue, the credit its finished jobs gave
/// back (see [`outbound`]), whether its control plane reads headers as JSON
/// (`Welcome.headers_json`) and whether it acknowledges recorded results (`Welcome.acks_results`).
type OpenSession = (mpsc::UnboundedSender<proto::AgentMessage>, Arc<AtomicU32>, bool, bool);

/// Where results go: the open session, or a list kept for the next one.
#[derive(Default)]
struct Outbox {
    /// The open session ([`OpenSession`]). Its queue is unbounded: it holds at most one result
    /// per job, and jobs are bounded by capacity.
    current: Mutex<Option<OpenSession>>,
    unreported: Mutex<Vec<proto::AttemptResult>>,
    /// Results sent to a control plane that acknowledges them, until it says they are recorded
    /// (`ResultsRecorded`), by `seq`, with when each was kept: those it never acknowledges go to
    /// the next session. Bounded ([`UNACKED_MAX`], [`UNACKED_FOR`]).
    unacked: Mutex<std::collections::BTreeMap<u64, (Instant, proto::AttemptResult)>>,
    /// The last `seq` given to a result.
    seq: std::sync::atomic::AtomicU64,
    in_flight: AtomicU32,
    /// While draining, finished jobs give back no credit.
    draining: AtomicBool,
}

impl Outbox {
    /// Hands a finished job's result to the session, or keeps it, and gives the job's credit back
    /// to the session (not while draining). The job leaves `in_flight` under the lock a new
    /// session holds while it reads its opening credit, so each job is counted in one or the
    /// other, never both. The result is queued under that lock too: once a session is no
    /// longer current, no send to its queue is under way ([`Outbox::keep_unsent`]).
    fn report(&self, result: proto::AttemptResult) {
        let current = self.current.lock().expect("outbox lock");
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let Some((tx, credit, headers_json, acks)) = current.as_ref() else {
            // Kept under the lock a new session takes them with when it opens
            // ([`Outbox::open`]): a result is either taken then or finds the session.
            self.unreported.lock().expect("outbox lock").push(result);
            return;
        };
        // Counted before the result is queued, so the stream that takes the result finds its
        // credit too.
        if !self.draining.load(Ordering::SeqCst) {
            credit.fetch_add(1, Ordering::SeqCst);
        }
        // An attempt made during an earlier session may have written its headers for a control
        // plane of another version.
        let mut result = if *headers_json { result } else { with_header_maps(result) };
        if *acks {
            self.keep_until_recorded(&mut result);
        }
        if let Err(e) = tx.send(message(agent_message::Msg::Result(result)))
            && let Some(agent_message::Msg::Result(r)) = e.0.msg
        {
            self.unacked.lock().expect("outbox lock").remove(&r.seq);
            self.unreported.lock().expect("outbox lock").push(r);
        }
    }

    /// Numbers `result` (unless it has its number from an earlier session) and keeps a copy
    /// until its control plane says it is recorded.
    fn keep_until_recorded(&self, result: &mut proto::AttemptResult) {
        self.number(result);
        let mut unacked = self.unacked.lock().expect("outbox lock");
        unacked.insert(result.seq, (Instant::now(), result.clone()));
        // Copies are kept for as long as they can help: a result sent again after its lease
        // expired is only logged as stale, and a control plane that stops acknowledging (its
        // writes fail) must not make the agent hold every result it ever sent. The oldest go
        // first; seqs grow with time.
        while unacked.len() > UNACKED_MAX
            || unacked.first_key_value().is_some_and(|(_, (at, _))| at.elapsed() > UNACKED_FOR)
        {
            unacked.pop_first();
        }
    }

    /// Gives `result` a `seq`, unless it has one.
    fn number(&self, result: &mut proto::AttemptResult) {
        if result.seq == 0 {
            result.seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        }
    }

    /// The control plane recorded these results.
    fn recorded(&self, seqs: &[u64]) {
        if seqs.is_empty() {
            return;
        }
        let mut unacked = self.unacked.lock().expect("outbox lock");
        for seq in seqs {
            unacked.remove(seq);
        }
    }

    /// Makes `session` the open one. Returns the jobs it may be sent (`capacity` less those
    /// still in flight) and the results kept since its hello was built: jobs that finished while
    /// it was being opened, to be sent on it.
    fn open(&self, session: OpenSession, capacity: u32) -> (u32, Vec<proto::AttemptResult>) {
        let mut current = self.current.lock().expect("outbox lock");
        *current = Some(session);
        self.draining.store(false, Ordering::SeqCst);
        let kept = std::mem::take(&mut *self.unreported.lock().expect("outbox lock"));
        (capacity.saturating_sub(self.in_flight.load(Ordering::SeqCst)), kept)
    }

    /// Keeps, for the next session, the results an ended session's stream never took: a
    /// connection that died with results still queued did not carry them (they were lost with
    /// it, and their deliveries sent again once their leases expired). Called once the session
    /// is no longer current and its own sender is gone, so nothing is being queued meanwhile;
    /// the queue is closed, so nothing is queued after. Returns how many.
    ///
    /// Results sent but not acknowledged as recorded go with them: the control plane may have
    /// died, or the connection broken, before it wrote them.
    fn keep_unsent(&self, queue: &Queue) -> usize {
        let mut rx = queue.lock().expect("queue lock");
        rx.close();
        let mut unacked = self.unacked.lock().expect("outbox lock");
        let mut unreported = self.unreported.lock().expect("outbox lock");
        let before = unreported.len();
        while let Ok(m) = rx.try_recv() {
            if let Some(agent_message::Msg::Result(r)) = m.msg
                && !unacked.contains_key(&r.seq)
            {
                unreported.push(r);
            }
        }
        unreported.extend(take_unacked(&mut unacked));
        unreported.len() - before
    }
}

/// `result` with its headers as maps, for a control plane that does not read them as JSON (or
/// may not: results kept for the next session go in its `Hello`, before its `Welcome` says).
fn with_header_maps(mut result: proto::AttemptResult) -> proto::AttemptResult {
    use herald_shared::headers::to_map;
    if !result.request_headers_json.is_empty() {
        result.request_headers = to_map(&std::mem::take(&mut result.request_headers_json));
    }
    if !result.response_headers_json.is_empty() {
        result.response_headers = to_map(&std::mem::take(&mut result.response_headers_json));
    }
    result
}

/// Takes the copies kept until recorded that can still help: those kept for less than
/// [`UNACKED_FOR`] (an older one's lease has expired; sent again, it would only be stale).
fn take_unacked(
    unacked: &mut std::collections::BTreeMap<u64, (Instant, proto::AttemptResult)>,
) -> Vec<proto::AttemptResult> {
    std::mem::take(unacked).into_values().filter(|(at, _)| at.elapsed() <= UNACKED_FOR).map(|(_, r)| r).collect()
}

/// How many of `results`, from the first, fit in `max` bytes encoded.
fn fitting(results: &[proto::AttemptResult], max: usize) -> usize {
    use prost::Message as _;
    let mut total = 0;
    results
        .iter()
        .take_while(|r| {
            total += r.encoded_len() + 8;
            total <= max
        })
        .count()
}

fn message(msg: agent_message::Msg) -> proto::AgentMessage {
    proto::AgentMessage { msg: Some(msg) }
}

/// Credit given back is sent before other messages once this much has gathered.
const CREDIT_FLUSH: u32 = 32;

/// Most results kept until their control plane acknowledges them: far more than a few batches'
/// worth, which is all a working control plane leaves unacknowledged.
const UNACKED_MAX: usize = 4096;
/// Longest a result is kept until acknowledged: past the longest lease (a 60 s timeout plus the
/// default 10 s grace), a result sent again is only logged as stale.
const UNACKED_FOR: Duration = Duration::from_secs(90);
/// The most result bytes a hello carries (the control plane refuses messages past 16 MiB):
/// results kept past it are dropped, and their leases expire.
const HELLO_RESULTS_MAX: usize = 8 << 20;

/// A session's outbound queue, shared by its stream and the session: what the stream has not
/// taken when the session ends (the connection died first) was never sent, and its results are
/// kept for the next session ([`Outbox::keep_unsent`]).
type Queue = Arc<Mutex<mpsc::UnboundedReceiver<proto::AgentMessage>>>;

/// A session's outbound stream: the messages queued on `queue`, and the credit finished jobs
/// gave back (`credit`) as one `Credit` message whenever the queue runs dry or `CREDIT_FLUSH`
/// jobs' worth has gathered — one message for a burst of results rather than one per result.
fn outbound(queue: Queue, credit: Arc<AtomicU32>) -> impl futures::Stream<Item = proto::AgentMessage> {
    futures::stream::poll_fn(move |cx| {
        use std::task::Poll;
        let take_credit = || match credit.swap(0, Ordering::SeqCst) {
            0 => None,
            jobs => Some(message(agent_message::Msg::Credit(proto::Credit { jobs }))),
        };
        if credit.load(Ordering::SeqCst) >= CREDIT_FLUSH
            && let Some(m) = take_credit()
        {
            return Poll::Ready(Some(m));
        }
        match queue.lock().expect("queue lock").poll_recv(cx) {
            Poll::Ready(m) => Poll::Ready(m),
            Poll::Pending => take_credit().map_or(Poll::Pending, |m| Poll::Ready(Some(m))),
        }
    })
}

/// The running agent, shared by its session and its jobs.
struct Agent {
    args: Args,
    id: String,
    sender: send::Sender,
    outbox: Outbox,
    jobs: TaskTracker,
    ready: AtomicBool,
    metrics: metrics::Metrics,
}

/// How a session ended without an error.
enum End {
    /// The control plane closed the stream.
    Closed,
    /// Drained: every in-flight job finished and was reported.
    Drained,
}

/// Runs the agent until `shutdown`, then drains: stops taking jobs, finishes and reports what is
/// in flight, and closes.
pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    let sender = send::Sender::new(
        egress::Guard { allow: args.allow_cidr.clone() },
        args.allow_http,
        args.extra_ca_cert.as_deref(),
        args.max_in_flight.max(1) as usize,
    )?;
    let id = args.agent_id.clone().unwrap_or_else(|| herald_shared::ids::new_id(herald_shared::ids::AGENT));
    let agent = Arc::new(Agent {
        id,
        sender,
        outbox: Outbox::default(),
        jobs: TaskTracker::new(),
        ready: AtomicBool::new(false),
        metrics: metrics::Metrics::default(),
        args,
    });
    let probes = tokio::net::TcpListener::bind(agent.args.http_addr).await?;
    tracing::info!(addr = %probes.local_addr()?, "HTTP listening");
    let probe_agent = agent.clone();
    // The probes and /metrics stay up through the drain, until the agent has stopped.
    let stopped = CancellationToken::new();
    let probe_stop = stopped.clone();
    tokio::spawn(async move {
        let ready_agent = probe_agent.clone();
        let app = axum::Router::new()
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .route(
                "/readyz",
                axum::routing::get(move || {
                    let ready = ready_agent.ready.load(Ordering::SeqCst);
                    async move {
                        if ready {
                            (axum::http::StatusCode::OK, "ready")
                        } else {
                            (axum::http::StatusCode::SERVICE_UNAVAILABLE, "no session")
                        }
                    }
                }),
            )
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let a = probe_agent.clone();
                    async move {
                        let m = &a.metrics;
                        m.in_flight.set(i64::from(a.outbox.in_flight.load(Ordering::SeqCst)));
                        m.connected.set(i64::from(a.ready.load(Ordering::SeqCst)));
                        m.unreported.set(a.outbox.unreported.lock().expect("outbox lock").len() as i64);
                        let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
                        ([(axum::http::header::CONTENT_TYPE, content_type)], m.encode())
                    }
                }),
            );
        let _ = axum::serve(probes, app).with_graceful_shutdown(probe_stop.cancelled_owned()).await;
    });

    let mut backoff = Duration::from_millis(100);
    let mut next = 0usize;
    loop {
        let endpoint = agent.args.control_planes[next % agent.args.control_planes.len()].clone();
        next += 1;
        match session(&agent, &endpoint, &shutdown).await {
            Ok(End::Drained) if shutdown.is_cancelled() => break,
            Ok(End::Drained) | Ok(End::Closed) => {
                tracing::info!(%endpoint, "session ended");
                backoff = Duration::from_millis(100);
            }
            Err(status) => {
                tracing::warn!(%endpoint, code = ?status.code(), message = status.message(), "session failed");
                if status.code() == Code::Unauthenticated || status.code() == Code::PermissionDenied {
                    backoff = Duration::from_secs(10);
                }
            }
        }
        if shutdown.is_cancelled() {
            break;
        }
        let jitter = rand::rng().random_range(0..=backoff.as_millis() as u64 / 2);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(backoff + Duration::from_millis(jitter)) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
    // Jobs still running when no session is left (the control plane is gone) finish anyway.
    agent.jobs.close();
    let _ = tokio::time::timeout(agent.args.drain_timeout, agent.jobs.wait()).await;
    let lost = agent.outbox.unreported.lock().expect("outbox lock").len();
    if lost > 0 {
        tracing::warn!(
            results = lost,
            "exiting with results no control plane acknowledged; those it did not record have their leases expire"
        );
    }
    tracing::info!("agent stopped");
    stopped.cancel();
    Ok(())
}

async fn connect(
    agent: &Agent,
    endpoint: &str,
) -> Result<
    AgentServiceClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, impl tonic::service::Interceptor>,
    >,
    Status,
> {
    let mut ep = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .map_err(|e| Status::invalid_argument(format!("bad control-plane address {endpoint}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    if endpoint.starts_with("https://") {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| Status::failed_precondition(format!("{}: {e}", path.display())))
        };
        let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
        if let Some(ca) = &agent.args.extra_ca_cert {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&agent.args.client_cert, &agent.args.client_key) {
            tls = tls.identity(tonic::transport::Identity::from_pem(read(cert)?, read(key)?));
        }
        ep = ep.tls_config(tls).map_err(|e| Status::failed_precondition(format!("TLS: {e}")))?;
    }
    let channel = ep.connect().await.map_err(|e| Status::unavailable(format!("cannot connect: {e}")))?;
    let token: MetadataValue<_> = format!("Bearer {}", agent.args.token)
        .parse()
        .map_err(|_| Status::invalid_argument("the token is not valid in a header"))?;
    Ok(AgentServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", token.clone());
        Ok(req)
    })
    .max_decoding_message_size(64 << 20))
}

async fn session(agent: &Arc<Agent>, endpoint: &str, shutdown: &CancellationToken) -> Result<End, Status> {
    let mut client = connect(agent, endpoint).await?;
    let capacity = agent.args.max_in_flight.max(1);
    let (tx, rx) = mpsc::unbounded_channel();
    let queue: Queue = Arc::new(Mutex::new(rx));
    let credit = Arc::new(AtomicU32::new(0));
    let mut pending = std::mem::take(&mut *agent.outbox.unreported.lock().expect("outbox lock"));
    // Numbered for a control plane that acknowledges them.
    for result in &mut pending {
        agent.outbox.number(result);
    }
    let fits = fitting(&pending, HELLO_RESULTS_MAX);
    if fits < pending.len() {
        tracing::warn!(
            results = pending.len() - fits,
            "more results kept than a hello carries; the rest are dropped and their leases will expire"
        );
        pending.truncate(fits);
    }
    let hello = proto::Hello {
        agent_id: agent.id.clone(),
        zone: agent.args.zone.clone(),
        version: herald_shared::VERSION.to_owned(),
        capacity,
        egress_ips: agent.args.egress_ip.clone(),
        pending_results: pending.iter().cloned().map(with_header_maps).collect(),
    };
    let restore =
        |pending: Vec<proto::AttemptResult>| agent.outbox.unreported.lock().expect("outbox lock").extend(pending);
    if tx.send(message(agent_message::Msg::Hello(hello))).is_err() {
        restore(pending);
        return Err(Status::internal("session channel closed"));
    }
    let mut inbound = match client.session(outbound(queue.clone(), credit.clone())).await {
        Ok(r) => r.into_inner(),
        Err(e) => {
            restore(pending);
            return Err(e);
        }
    };
    let welcome = match tokio::time::timeout(Duration::from_secs(15), inbound.message()).await {
        Ok(Ok(Some(proto::ControlMessage { msg: Some(control_message::Msg::Welcome(w)) }))) => w,
        Ok(Err(e)) => {
            restore(pending);
            return Err(e);
        }
        _ => {
            restore(pending);
            return Err(Status::unavailable("no welcome from the control plane"));
        }
    };
    // The hello, with its pending results, was accepted.
    let heartbeat = welcome
        .heartbeat_interval
        .map(|d| Duration::new(d.seconds.max(1) as u64, 0))
        .unwrap_or(Duration::from_secs(10));
    let body_limit = welcome.response_body_limit.max(1) as usize;
    let headers_json = welcome.headers_json;
    let acks = welcome.acks_results;
    tracing::info!(%endpoint, zone = %agent.args.zone, agent = %agent.id, "session open");
    if acks {
        // The hello's results are kept until they are recorded too.
        let now = Instant::now();
        agent.outbox.unacked.lock().expect("outbox lock").extend(pending.into_iter().map(|r| (r.seq, (now, r))));
    }
    let (free, kept) = agent.outbox.open((tx.clone(), credit, headers_json, acks), capacity);
    // Jobs that finished after the hello was built: their credit is in `free` already.
    for result in kept {
        let mut result = if headers_json { result } else { with_header_maps(result) };
        if acks {
            agent.outbox.keep_until_recorded(&mut result);
        }
        let _ = tx.send(message(agent_message::Msg::Result(result)));
    }
    agent.ready.store(true, Ordering::SeqCst);
    let _ = tx.send(message(agent_message::Msg::Credit(proto::Credit { jobs: free })));

    let mut draining = false;
    let mut last_heard = Instant::now();
    let mut beat = tokio::time::interval(heartbeat);
    let mut drain_check = tokio::time::interval(Duration::from_millis(20));
    let end = loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(m)) => {
                    last_heard = Instant::now();
                    match m.msg {
                        Some(control_message::Msg::Job(job)) => {
                            agent.outbox.in_flight.fetch_add(1, Ordering::SeqCst);
                            if draining {
                                let result = proto::AttemptResult {
                                    lease_id: job.lease_id.clone(),
                                    delivery_id: job.delivery_id.clone(),
                                    attempt: job.attempt,
                                    not_sent: true,
                                    ..Default::default()
                                };
                                agent.outbox.report(result);
                                continue;
                            }
                            let a = agent.clone();
                            agent.jobs.spawn(async move {
                                let mut job = job;
                                let span = attempt_span(&mut job);
                                let result = a.sender.attempt(&job, body_limit, "X-CloudThinker", headers_json).await;
                                if let Some(span) = span {
                                    end_attempt_span(span, &result);
                                }
                                a.metrics.attempt(&result);
                                a.outbox.report(result);
                            });
                        }
                        Some(control_message::Msg::Recorded(r)) => agent.outbox.recorded(&r.seqs),
                        Some(control_message::Msg::Drain(d)) => {
                            tracing::info!(reason = %d.reason, "drain requested by the control plane");
                            draining = true;
                            agent.outbox.draining.store(true, Ordering::SeqCst);
                        }
                        _ => {}
                    }
                }
                Ok(None) => break Ok(End::Closed),
                Err(e) => break Err(e),
            },
            _ = beat.tick() => {
                if last_heard.elapsed() > heartbeat * 3 {
                    break Err(Status::unavailable("the control plane went silent"));
                }
                let now = chrono::Utc::now();
                let hb = proto::Heartbeat { sent_at: Some(prost_types::Timestamp { seconds: now.timestamp(), nanos: 0 }) };
                let _ = tx.send(message(agent_message::Msg::Heartbeat(hb)));
            }
            _ = shutdown.cancelled(), if !draining => {
                tracing::info!(in_flight = agent.outbox.in_flight.load(Ordering::SeqCst), "draining");
                draining = true;
                agent.outbox.draining.store(true, Ordering::SeqCst);
            }
            _ = drain_check.tick(), if draining => {
                if agent.outbox.in_flight.load(Ordering::SeqCst) == 0 {
                    break Ok(End::Drained);
                }
            }
        }
    };
    *agent.outbox.current.lock().expect("outbox lock") = None;
    agent.ready.store(false, Ordering::SeqCst);
    drop(tx);
    // Whether the connection may still carry what is queued: a drained session whose control
    // plane has not yet read everything (the stream goes on being sent after this returns).
    let mut still_sending = false;
    if matches!(end, Ok(End::Drained)) {
        // Let the last results leave before the stream closes: the control plane ends the
        // stream once it has read everything we sent.
        // It also tells which of them it recorded.
        let read = async {
            while let Ok(Some(m)) = inbound.message().await {
                if let Some(control_message::Msg::Recorded(r)) = m.msg {
                    agent.outbox.recorded(&r.seqs);
                }
            }
        };
        still_sending = tokio::time::timeout(Duration::from_secs(5), read).await.is_err();
    }
    if still_sending {
        // Queued results are left to the connection; those it sent but was not told are recorded
        // go to the next session (a control plane that recorded them logs them once).
        let unacked = take_unacked(&mut agent.outbox.unacked.lock().expect("outbox lock"));
        agent.outbox.unreported.lock().expect("outbox lock").extend(unacked);
    } else {
        let kept = agent.outbox.keep_unsent(&queue);
        if kept > 0 {
            tracing::info!(results = kept, "results the session did not carry are kept for the next one");
        }
    }
    end
}

/// Starts the `herald.attempt` span of a job (when traces are exported), a child of the
/// control plane's dispatch span, and makes the job's `traceparent` (sent to the receiver) this
/// span's, so that the customer's trace joins the attempt.
fn attempt_span(job: &mut proto::Job) -> Option<opentelemetry::global::BoxedSpan> {
    use herald_shared::telemetry;
    use opentelemetry::KeyValue;
    use opentelemetry::trace::{Span as _, SpanKind, TraceContextExt as _, Tracer as _};
    if !telemetry::enabled() {
        return None;
    }
    let parent = telemetry::parse_traceparent(&job.traceparent)
        .map_or_else(opentelemetry::Context::new, |sc| opentelemetry::Context::new().with_remote_span_context(sc));
    let host = url::Url::parse(&job.url).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default();
    let tracer = telemetry::tracer();
    let span = tracer
        .span_builder("herald.attempt")
        .with_kind(SpanKind::Client)
        .with_attributes([
            KeyValue::new("herald.delivery_id", job.delivery_id.clone()),
            KeyValue::new("herald.event_id", job.event_id.clone()),
            KeyValue::new("herald.attempt", i64::from(job.attempt)),
            KeyValue::new("server.address", host),
            KeyValue::new("http.request.method", "POST"),
        ])
        .start_with_context(&tracer, &parent);
    job.traceparent = telemetry::traceparent(span.span_context());
    Some(span)
}

fn end_attempt_span(mut span: opentelemetry::global::BoxedSpan, result: &proto::AttemptResult) {
    use opentelemetry::KeyValue;
    use opentelemetry::trace::Span as _;
    if result.status > 0 {
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(result.status)));
    }
    if !(200..300).contains(&result.status) {
        let kind = proto::ErrorKind::try_from(result.error_kind).unwrap_or_default();
        span.set_attribute(KeyValue::new("error.type", herald_shared::attempt_class(result.status, kind)));
        span.set_status(opentelemetry::trace::Status::error(result.error_message.clone()));
    }
    span.end();
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt as _;

    /// Every flag has an environment twin, as containers and Helm charts set them (`--help` and
    /// `--version` aside).
    #[test]
    fn every_flag_has_an_environment_twin() {
        use clap::CommandFactory as _;
        let missing: Vec<_> = Args::command()
            .get_arguments()
            .filter(|a| !["help", "version"].contains(&a.get_id().as_str()) && a.get_env().is_none())
            .map(|a| a.get_id().to_string())
            .collect();
        assert!(missing.is_empty(), "flags without an environment twin: {missing:?}");
    }

    fn result(n: u32) -> proto::AgentMessage {
        message(agent_message::Msg::Result(proto::AttemptResult { attempt: n, ..Default::default() }))
    }

    /// A job that finishes after the hello took the kept results, but before the session opens,
    /// is handed to that session when it opens (before, it stayed kept until the session after,
    /// which might be days away, and its lease expired: the delivery was sent again).
    #[test]
    fn a_result_reported_while_a_session_opens_is_sent_on_it() {
        let outbox = Outbox::default();
        outbox.in_flight.store(2, Ordering::SeqCst);
        let in_hello = std::mem::take(&mut *outbox.unreported.lock().unwrap());
        assert!(in_hello.is_empty());
        let finished = |lease: &str| proto::AttemptResult { lease_id: lease.into(), ..Default::default() };
        outbox.report(finished("during-the-handshake"));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let credit = Arc::new(AtomicU32::new(0));
        let (free, kept) = outbox.open((tx, credit.clone(), true, false), 4);
        assert_eq!(free, 3, "the finished job's room is free");
        assert_eq!(kept.iter().map(|r| r.lease_id.as_str()).collect::<Vec<_>>(), ["during-the-handshake"]);
        assert!(outbox.unreported.lock().unwrap().is_empty(), "nothing is left for a later session");
        assert_eq!(credit.load(Ordering::SeqCst), 0, "its credit is in `free`, not given twice");
        // A job finishing now goes straight to the open session, with its credit.
        outbox.report(finished("after"));
        assert_eq!(credit.load(Ordering::SeqCst), 1);
        match rx.try_recv().unwrap().msg {
            Some(agent_message::Msg::Result(r)) => assert_eq!(r.lease_id, "after"),
            other => panic!("a result: {other:?}"),
        }
        assert_eq!(outbox.in_flight.load(Ordering::SeqCst), 0);
    }

    fn credit_of(m: &proto::AgentMessage) -> Option<u32> {
        match &m.msg {
            Some(agent_message::Msg::Credit(c)) => Some(c.jobs),
            _ => None,
        }
    }

    #[tokio::test]
    async fn credit_given_back_goes_out_once_the_results_before_it_are_taken() {
        let (tx, rx) = mpsc::unbounded_channel();
        let credit = Arc::new(AtomicU32::new(0));
        let mut out = Box::pin(outbound(Arc::new(Mutex::new(rx)), credit.clone()));
        for n in 1..=3 {
            credit.fetch_add(1, Ordering::SeqCst);
            tx.send(result(n)).unwrap();
        }
        for n in 1..=3 {
            let m = out.next().await.unwrap();
            assert!(matches!(m.msg, Some(agent_message::Msg::Result(ref r)) if r.attempt == n), "{m:?}");
        }
        assert_eq!(credit_of(&out.next().await.unwrap()), Some(3), "one credit for the three results");
        assert_eq!(credit.load(Ordering::SeqCst), 0);
        // Nothing queued and no credit: the stream waits.
        assert!(futures::poll!(out.next()).is_pending());

        // Past CREDIT_FLUSH, credit goes out ahead of the results still queued.
        for n in 0..CREDIT_FLUSH + 5 {
            credit.fetch_add(1, Ordering::SeqCst);
            tx.send(result(n)).unwrap();
        }
        let first = out.next().await.unwrap();
        assert_eq!(credit_of(&first), Some(CREDIT_FLUSH + 5));
        let mut results = 0;
        while let std::task::Poll::Ready(Some(m)) = futures::poll!(out.next()) {
            assert_eq!(credit_of(&m), None, "no credit left to send: {m:?}");
            results += 1;
        }
        assert_eq!(results, CREDIT_FLUSH + 5);
        drop(tx);
        assert!(out.next().await.is_none(), "the stream ends with its queue");
    }

    #[tokio::test]
    async fn a_report_from_another_task_wakes_the_waiting_stream_with_its_credit() {
        let (tx, rx) = mpsc::unbounded_channel();
        let credit = Arc::new(AtomicU32::new(0));
        let outbox = Arc::new(Outbox::default());
        outbox.in_flight.store(2, Ordering::SeqCst);
        *outbox.current.lock().unwrap() = Some((tx, credit.clone(), true, false));
        let mut out = Box::pin(outbound(Arc::new(Mutex::new(rx)), credit));
        assert!(futures::poll!(out.next()).is_pending(), "nothing to send yet");
        let reporter = outbox.clone();
        tokio::spawn(async move { reporter.report(proto::AttemptResult { attempt: 7, ..Default::default() }) });
        let wait = Duration::from_secs(5);
        let m: proto::AgentMessage =
            tokio::time::timeout(wait, out.next()).await.expect("woken by the report").unwrap();
        assert!(matches!(m.msg, Some(agent_message::Msg::Result(ref r)) if r.attempt == 7), "{m:?}");
        let m: proto::AgentMessage = tokio::time::timeout(wait, out.next()).await.expect("the credit follows").unwrap();
        assert_eq!(credit_of(&m), Some(1));
        assert_eq!(outbox.in_flight.load(Ordering::SeqCst), 1);

        // While draining, a finished job gives no credit back.
        outbox.draining.store(true, Ordering::SeqCst);
        outbox.report(proto::AttemptResult { attempt: 8, ..Default::default() });
        let m: proto::AgentMessage = tokio::time::timeout(wait, out.next()).await.unwrap().unwrap();
        assert!(matches!(m.msg, Some(agent_message::Msg::Result(ref r)) if r.attempt == 8), "{m:?}");
        assert!(futures::poll!(out.next()).is_pending(), "no credit while draining");
    }

    #[tokio::test]
    async fn results_a_closed_session_never_carried_are_kept_for_the_next() {
        let (tx, rx) = mpsc::unbounded_channel();
        let queue: Queue = Arc::new(Mutex::new(rx));
        let outbox = Outbox::default();
        outbox.in_flight.store(3, Ordering::SeqCst);
        // A sender the queue outlives (the session's own, or one a late caller holds).
        let late = tx.clone();
        *outbox.current.lock().unwrap() = Some((tx, Arc::new(AtomicU32::new(0)), true, false));
        let mut out = Box::pin(outbound(queue.clone(), Arc::new(AtomicU32::new(0))));
        let result = |attempt| proto::AttemptResult { attempt, ..Default::default() };
        outbox.report(result(1));
        outbox.report(result(2));
        // The stream takes the first result; then the connection dies with the second queued.
        let m = out.next().await.unwrap();
        assert!(matches!(m.msg, Some(agent_message::Msg::Result(ref r)) if r.attempt == 1), "{m:?}");
        *outbox.current.lock().unwrap() = None;
        // A job finishing after the session ended is kept as before.
        outbox.report(result(3));
        assert_eq!(outbox.keep_unsent(&queue), 1);
        let mut kept: Vec<u32> = outbox.unreported.lock().unwrap().iter().map(|r| r.attempt).collect();
        kept.sort_unstable();
        assert_eq!(kept, [2, 3], "the result taken by the stream is not kept twice");
        // The queue is closed: nothing more goes into it, and the stream ends though a sender
        // still lives.
        assert!(late.send(message(agent_message::Msg::Result(result(4)))).is_err());
        assert!(out.next().await.is_none(), "the stream ends: its queue is closed and empty");
        assert_eq!(outbox.keep_unsent(&queue), 0);
    }

    /// With a control plane that acknowledges results, a result the stream took is kept until
    /// it is acknowledged as recorded: one the control plane received but never recorded (it
    /// died first) goes to the next session under the same `seq`, one it recorded does not, and
    /// one still queued is kept once, not twice.
    #[tokio::test]
    async fn results_sent_but_not_recorded_are_kept_for_the_next_session() {
        let (tx, rx) = mpsc::unbounded_channel();
        let queue: Queue = Arc::new(Mutex::new(rx));
        let outbox = Outbox::default();
        outbox.in_flight.store(3, Ordering::SeqCst);
        *outbox.current.lock().unwrap() = Some((tx, Arc::new(AtomicU32::new(0)), true, true));
        let mut out = Box::pin(outbound(queue.clone(), Arc::new(AtomicU32::new(0))));
        let result = |attempt| proto::AttemptResult { attempt, ..Default::default() };
        for attempt in 1..=3 {
            outbox.report(result(attempt));
        }
        let mut seqs = Vec::new();
        for _ in 0..2 {
            match out.next().await.unwrap().msg {
                Some(agent_message::Msg::Result(r)) => seqs.push((r.attempt, r.seq)),
                other => panic!("a result: {other:?}"),
            }
        }
        assert_eq!(seqs.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2]);
        assert!(seqs[0].1 != 0 && seqs[1].1 != 0 && seqs[0].1 != seqs[1].1, "numbered: {seqs:?}");
        // The first is recorded; the second was taken by the stream and never acknowledged; the
        // third never left the queue.
        outbox.recorded(&[seqs[0].1]);
        *outbox.current.lock().unwrap() = None;
        assert_eq!(outbox.keep_unsent(&queue), 2);
        let mut kept: Vec<(u32, u64)> = outbox.unreported.lock().unwrap().iter().map(|r| (r.attempt, r.seq)).collect();
        kept.sort_unstable();
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[0], seqs[1], "the unacknowledged result, under its number");
        assert_eq!(kept[1].0, 3, "the queued one, once");
        assert!(outbox.unacked.lock().unwrap().is_empty());
    }

    /// A control plane that stops acknowledging (its writes fail) does not make the agent keep
    /// every result it sends: past [`UNACKED_MAX`] the oldest copies go.
    #[test]
    fn copies_kept_until_recorded_are_bounded() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let outbox = Outbox::default();
        *outbox.current.lock().unwrap() = Some((tx, Arc::new(AtomicU32::new(0)), true, true));
        let n = UNACKED_MAX as u32 + 10;
        outbox.in_flight.store(n, Ordering::SeqCst);
        for attempt in 1..=n {
            outbox.report(proto::AttemptResult { attempt, ..Default::default() });
        }
        let unacked = outbox.unacked.lock().unwrap();
        assert_eq!(unacked.len(), UNACKED_MAX);
        assert_eq!(unacked.first_key_value().unwrap().1.1.attempt, 11, "the oldest went first");
    }

    /// A hello carries the results kept that fit in its budget, first first.
    #[test]
    fn a_hello_carries_what_fits() {
        let big = |attempt| proto::AttemptResult { attempt, response_body: vec![7; 1000], ..Default::default() };
        let results: Vec<_> = (1..=10).map(big).collect();
        assert_eq!(fitting(&results, usize::MAX), 10);
        assert_eq!(fitting(&results, 3500), 3);
        assert_eq!(fitting(&results, 10), 0);
    }

    #[tokio::test]
    async fn results_go_out_with_the_headers_form_their_session_reads() {
        let headed = || proto::AttemptResult {
            request_headers_json: r#"{"content-type":"application/json","x-a":"1"}"#.into(),
            response_headers_json: r#"{"server":"s"}"#.into(),
            ..Default::default()
        };
        for headers_json in [true, false] {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let outbox = Outbox::default();
            outbox.in_flight.store(1, Ordering::SeqCst);
            *outbox.current.lock().unwrap() = Some((tx, Arc::new(AtomicU32::new(0)), headers_json, false));
            outbox.report(headed());
            let Some(agent_message::Msg::Result(r)) = rx.recv().await.unwrap().msg else { panic!("a result") };
            if headers_json {
                assert_eq!(r, headed(), "a control plane that reads JSON gets it as written");
            } else {
                assert!(r.request_headers_json.is_empty() && r.response_headers_json.is_empty());
                assert_eq!(r.request_headers.len(), 2);
                assert_eq!(r.request_headers["x-a"], "1");
                assert_eq!(r.response_headers["server"], "s");
            }
        }
        // Kept for the next session, whose control plane is not known when the hello goes out.
        let kept = with_header_maps(headed());
        assert_eq!(kept.request_headers["content-type"], "application/json");
        assert!(kept.request_headers_json.is_empty());
    }
}
