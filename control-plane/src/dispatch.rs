//! The dispatcher: connected agents, their credit, and the loop that leases due deliveries to
//! them; and the result writer that applies what agents report, in batches.
//!
//! It wakes on publish, on credit, on results and at the next due retry or rate-limit slot,
//! never by polling the database in a tight loop. Jobs go only to agents of the webhook's zone,
//! least loaded first, within each agent's credit and each webhook's `max_in_flight` and
//! `rate_limit_per_second`.
//!
//! Architecture invariant: the dispatcher holds no delivery state the database does not also
//! hold; losing it (a restart) loses only leases, which expire and are dispatched again.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use herald_shared::proto::{self, ErrorKind, control_message};
use herald_shared::{envelope, ids};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::db::entity::delivery::{self, status};
use crate::metrics::{
    AttemptLabels, Metrics, Outcome, OutcomeLabels, Reason, ReasonLabels, Source, SourceLabels, Via, ViaLabels,
};
use crate::store::events::{LeaseTerms, PublishSink, StoredEvent};
use crate::store::queue::{Applied, AttemptReport, Claimed, Filter, Limits, QueuePolicy, Reserve, wake_by};
use crate::store::webhooks::{Changed, Webhook};
use crate::store::{Store, StoreError, now_millis};

/// Jobs leased to one agent in one claim at most.
const CLAIM_BATCH: u32 = 1024;
/// Results applied in one transaction at most.
const RESULT_BATCH: usize = 512;
/// A batch of fewer results than this waits [`RESULT_LINGER`] for more before it is written.
const RESULT_LINGER_BELOW: usize = 16;
/// How long a small batch of results waits for more (docs/BENCHMARKS.md item 44).
const RESULT_LINGER: Duration = Duration::from_millis(2);
/// Expired leases are looked for when the earliest known lease expires, and at least this often
/// (leases of another replica or an earlier run are not known in advance).
const RECLAIM_EVERY_MS: i64 = 30_000;
/// After taking back expired leases failed, the next try waits this long.
const RECLAIM_RETRY_MS: i64 = 1_000;
/// Bytes of envelopes of published events kept for dispatch.
const EVENT_CACHE_BYTES: usize = 32 << 20;
/// How often both sides send heartbeats; a session silent for three is closed.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// The longest the dispatcher sleeps with nothing to do, as a safety net.
const IDLE_WAKE_MS: i64 = 30_000;

type Outbound = mpsc::Sender<Result<proto::ControlMessage, Status>>;
/// Per-webhook rate limiters with the rate they were made for.
type Limiters = Arc<Mutex<HashMap<String, (i64, Arc<DefaultDirectRateLimiter>)>>>;

/// A connected agent session.
struct Session {
    agent_id: String,
    /// `agent@session`: the lease holder, unique per connection.
    holder: String,
    zone: String,
    version: String,
    egress_ips: Vec<String>,
    capacity: u32,
    credit: u32,
    in_flight: u32,
    connected_at: i64,
    /// The agent is draining (it returned a job unsent, or the control plane is shutting down
    /// and asked it to): it gets nothing more.
    draining: bool,
    tx: Outbound,
    /// Seqs of results recorded that its stream had no room to acknowledge yet: they go as soon
    /// as it has room (`Dispatcher::acknowledge_when_room`).
    unacked: Vec<u64>,
}

impl Session {
    /// Credit back, up to the agent's capacity.
    fn add_credit(&mut self, jobs: u32) {
        self.credit = self.credit.saturating_add(jobs).min(self.capacity.max(1));
    }

    /// Jobs reserved for it (leased at publish, or by a claim as it ran) that it will not get.
    fn unreserve(&mut self, jobs: u32) {
        self.add_credit(jobs);
        self.in_flight = self.in_flight.saturating_sub(jobs);
    }
}

/// The session of leases given out before this control plane started (sessions count from 1).
const NO_SESSION: u64 = 0;

/// What the dispatcher remembers of a job until its result arrives.
struct LeaseMeta {
    webhook_id: String,
    /// The session the job went to.
    session: u64,
    /// The body sent, when a transform applied (for the attempt log).
    request_body: Option<String>,
    /// When the lease expires.
    expires_at: i64,
}

/// A webhook as dispatching needs it, cached; dropped on any change through the API.
struct Hook {
    webhook: Webhook,
}

#[derive(Default)]
struct State {
    sessions: HashMap<u64, Session>,
    hooks: HashMap<String, Arc<Hook>>,
    /// Counts every forgetting of `hooks`: a webhook read from the database while one happened
    /// may be the copy just forgotten, and is used once but not cached.
    hooks_epoch: u64,
    leases: HashMap<String, LeaseMeta>,
    /// Leases of closed sessions, or given out before this control plane started, kept in
    /// `leases` (their webhooks' slots held) until their results come or they expire: see
    /// [`Dispatcher::close`] and [`Dispatcher::count_leases_of_before`].
    held: std::collections::HashSet<String>,
    next_session: u64,
    /// Zones whose due work this replica's last claim took entirely, with nothing known to have
    /// become due since: a delivery published into one may be leased as it is inserted
    /// ([`PublishSink`]), and the dispatch loop skips it when only credit came back. Anything
    /// that may make work due (a queued publish, a retry or replay, a reclaim, another replica's
    /// wake-up, a timer) empties it.
    caught_up: std::collections::HashSet<String>,
    /// Counts every emptying of `caught_up`: a round marks a zone caught up only if none happened
    /// since it began to look, or a wake-up meanwhile would be lost.
    uncaught: u64,
}

impl State {
    /// Something may have made work due anywhere: no zone is caught up.
    fn uncatch(&mut self) {
        self.caught_up.clear();
        self.uncaught += 1;
    }
}

/// Envelopes of published events whose deliveries this replica has yet to send, oldest first
/// out: the dispatcher sends what was just published without reading the event back. An entry
/// leaves once each delivery its publish created has taken it, which makes room for newer ones,
/// or, when the cache is full, as the oldest (deliveries another replica sent, a paused
/// webhook's, a zone without agents, or a backlog longer than the cache). A miss (a retry, a
/// replay, a restart, an event let out) reads the database; the cache is only ever a copy of
/// committed rows.
#[derive(Default)]
struct EventCache {
    map: HashMap<(String, String), Cached>,
    /// Entries by insertion, oldest first.
    order: std::collections::BTreeMap<u64, (String, String)>,
    next_seq: u64,
    bytes: usize,
    limit: usize,
}

struct Cached {
    envelope: Bytes,
    trace_context: Option<String>,
    /// When the event was stored: a delivery created by that same publish has this `created_at`,
    /// so an entry can never answer for an event pruned and later published again with the same
    /// id.
    created_at: i64,
    /// Deliveries of the publish that have not taken the envelope yet.
    unsent: usize,
    seq: u64,
}

impl EventCache {
    fn with_limit(limit: usize) -> Self {
        EventCache { limit, ..EventCache::default() }
    }

    /// Caches an event's envelope for its `unsent` open deliveries, letting the oldest entries
    /// out to make room. A repeat of the same publish (an idempotent retry) leaves the entry as
    /// it is.
    fn insert(
        &mut self,
        key: (String, String),
        envelope: Bytes,
        trace_context: Option<String>,
        created_at: i64,
        unsent: usize,
    ) {
        if self.map.get(&key).is_some_and(|e| e.created_at == created_at) {
            return;
        }
        self.remove(&key);
        if unsent == 0 || envelope.len() > self.limit {
            return;
        }
        while self.bytes + envelope.len() > self.limit {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            self.remove(&oldest);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += envelope.len();
        self.order.insert(seq, key.clone());
        self.map.insert(key, Cached { envelope, trace_context, created_at, unsent, seq });
    }

    fn remove(&mut self, key: &(String, String)) {
        if let Some(e) = self.map.remove(key) {
            self.bytes -= e.envelope.len();
            self.order.remove(&e.seq);
        }
    }

    /// The envelope and publish trace of `d`'s event, if this cache holds that very event; the
    /// last of the event's deliveries to take it removes it.
    fn take(&mut self, workspace: &str, event: &str, created_at: i64) -> Option<(Bytes, Option<String>)> {
        let key = (workspace.to_owned(), event.to_owned());
        let hit = self.map.get_mut(&key).filter(|hit| hit.created_at == created_at)?;
        let out = (hit.envelope.clone(), hit.trace_context.clone());
        hit.unsent -= 1;
        if hit.unsent == 0 {
            self.remove(&key);
        }
        Some(out)
    }
}

/// A result as it arrived, waiting for the result writer.
struct Arrived {
    /// The session it came on, which is told once it is recorded (`ResultsRecorded`).
    session: u64,
    /// It came in the session's hello, kept from an earlier session.
    kept: bool,
    agent_id: String,
    zone: String,
    result: proto::AttemptResult,
    /// Not a result: answered once every result queued before it has been applied.
    flushed: Option<tokio::sync::oneshot::Sender<()>>,
}

struct Inner {
    store: Store,
    policy: QueuePolicy,
    header_prefix: String,
    response_body_limit: u32,
    state: Mutex<State>,
    /// Per-webhook jobs in flight, read by claims (`max_in_flight`).
    hook_in_flight: Arc<Mutex<HashMap<String, u32>>>,
    /// Envelopes of events just published.
    events: Mutex<EventCache>,
    /// Per-webhook rate limiters, consulted by claims.
    limiters: Limiters,
    /// The earliest time a rate-limited webhook may send again (ms), or 0.
    rate_wake: Arc<AtomicI64>,
    /// The earliest known due time of a pending retry (ms), or 0.
    due_wake: AtomicI64,
    /// The earliest known lease expiry (ms), or 0.
    lease_wake: AtomicI64,
    /// When the dispatch loop, asleep, wakes next (ms) unless woken sooner.
    planned_wake: AtomicI64,
    wake: Notify,
    results: mpsc::Sender<Arrived>,
    /// Stops the result writer: cancelled by [`Dispatcher::finish`] once what the sessions
    /// reported is recorded (not at shutdown: draining agents still report then).
    results_done: CancellationToken,
    /// Delivery changes for `WatchDeliveries`.
    changes: tokio::sync::broadcast::Sender<Change>,
    metrics: Arc<Metrics>,
    /// This control plane among replicas (its id skips its own change notifications).
    peers: Arc<crate::store::Peers>,
    /// Changed delivery ids for other replicas' watchers (PostgreSQL only; see [`tell_replicas`]).
    replicas: Option<mpsc::UnboundedSender<Vec<String>>>,
    /// Agent sessions opened and closed, for the `agents` table (PostgreSQL only; see
    /// [`Dispatcher::agents_loop`]).
    agent_writes: Option<mpsc::UnboundedSender<AgentWrite>>,
    /// The zones other replicas' agents serve, as the `agents` table last said (PostgreSQL only,
    /// read every heartbeat by [`Dispatcher::agents_loop`]).
    served_elsewhere: Mutex<std::collections::HashSet<String>>,
}

/// A change of this replica's agent sessions, for the `agents` table.
enum AgentWrite {
    Seen(crate::db::entity::agent::Model),
    Gone { id: String, connected_at: i64 },
}

/// What `WatchDeliveries` hears of.
#[derive(Debug, Clone)]
pub enum Change {
    /// A delivery as it now stands.
    Row(Arc<crate::db::entity::delivery::Model>),
    /// More of one webhook's deliveries changed at once (a pause, a zone change, a deletion, a
    /// replay) than watchers are sent one by one ([`Changed::LISTED`]): how many.
    Many { workspace: String, webhook: String, count: u64 },
}

/// How a [`Change::Many`] travels to other replicas: `+<count> <webhook> <workspace>` among the
/// ids given to [`tell_replicas`], and as a notification of its own. Delivery ids never start
/// with it.
const MANY: char = '+';

/// How long changes wait for others before they are announced to other replicas together.
const CHANGES_COALESCE: Duration = Duration::from_millis(5);

/// Announces changed deliveries to other replicas' watchers (`pg_notify` on
/// `herald_changes`, 250 ids per notification). Changes arriving within [`CHANGES_COALESCE`] of
/// one another share notifications: one per changed batch cost a round trip, and a wake-up of
/// every listening replica, per claim and per result (about one per delivery at 1,000 events/s).
/// A replica alone ([`crate::store::Peers::others`]) announces nothing. Ends when the dispatcher
/// is dropped.
async fn tell_replicas(
    db: sea_orm::DatabaseConnection,
    peers: Arc<crate::store::Peers>,
    mut rx: mpsc::UnboundedReceiver<Vec<String>>,
) {
    while let Some(mut ids) = rx.recv().await {
        tokio::time::sleep(CHANGES_COALESCE).await;
        while let Ok(more) = rx.try_recv() {
            ids.extend(more);
        }
        if !peers.others(now_millis()) {
            continue;
        }
        let (many, ids): (Vec<String>, Vec<String>) = ids.into_iter().partition(|id| id.starts_with(MANY));
        for told in many.into_iter().chain(ids.chunks(250).map(|chunk| chunk.join(","))) {
            let payload = format!("{} {told}", peers.id);
            let notify = crate::store::notify(crate::store::events::CHANGES_CHANNEL, payload);
            if let Err(e) = sea_orm::ConnectionTrait::execute_raw(&db, notify).await {
                tracing::debug!(error = %e, "cannot tell other replicas' watchers of changes");
            }
        }
    }
}

/// A handle to the dispatcher. Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

impl Dispatcher {
    /// Starts the dispatcher and result writer. Dispatching stops when `shutdown` fires; the
    /// result writer goes on until [`Dispatcher::finish`], recording what draining agents report.
    pub fn spawn(
        store: Store,
        policy: QueuePolicy,
        header_prefix: String,
        response_body_limit: usize,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Dispatcher {
        let (results, rx) = mpsc::channel(8192);
        let peers = store.peers.clone();
        let replicas = (store.db.get_database_backend() == sea_orm::DbBackend::Postgres).then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(tell_replicas(store.db.clone(), peers.clone(), rx));
            tx
        });
        let (agent_writes, agent_rx) = if store.shares_agents() {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let inner = Arc::new(Inner {
            agent_writes,
            served_elsewhere: Mutex::default(),
            store,
            policy,
            header_prefix,
            response_body_limit: u32::try_from(response_body_limit).unwrap_or(65536),
            state: Mutex::default(),
            hook_in_flight: Arc::default(),
            events: Mutex::new(EventCache::with_limit(EVENT_CACHE_BYTES)),
            limiters: Arc::default(),
            rate_wake: Arc::new(AtomicI64::new(0)),
            due_wake: AtomicI64::new(0),
            lease_wake: AtomicI64::new(0),
            planned_wake: AtomicI64::new(0),
            wake: Notify::new(),
            results,
            results_done: CancellationToken::new(),
            changes: tokio::sync::broadcast::channel(4096).0,
            metrics,
            peers,
            replicas,
        });
        let d = Dispatcher { inner };
        d.inner.store.set_sink(Arc::new(Publishes(Arc::downgrade(&d.inner))));
        tokio::spawn(d.clone().dispatch_loop(shutdown.clone()));
        if let Some(rx) = agent_rx {
            tokio::spawn(d.clone().agents_loop(rx, shutdown.clone()));
        }
        tokio::spawn(d.clone().result_loop(rx));
        d
    }

    /// At shutdown, after the server stopped: waits (at most `within`) for every session to end
    /// (agents drain: [`Dispatcher::drain`]), then for the results they reported to be recorded,
    /// then stops the result writer.
    pub async fn finish(&self, within: Duration) {
        let until = tokio::time::Instant::now() + within;
        while !self.inner.state.lock().expect("dispatcher lock").sessions.is_empty()
            && tokio::time::Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !self.flush_results().await {
            tracing::warn!("the last results were not recorded within 10 s; their leases will expire");
        }
        self.inner.results_done.cancel();
    }

    /// Waits (at most 10 s) until every result queued so far is recorded; false if it was not.
    pub async fn flush_results(&self) -> bool {
        let (flushed, done) = tokio::sync::oneshot::channel();
        let marker = Arrived {
            session: 0,
            kept: false,
            agent_id: String::new(),
            zone: String::new(),
            result: Default::default(),
            flushed: Some(flushed),
        };
        let flush = async { self.inner.results.send(marker).await.is_ok() && done.await.is_ok() };
        tokio::time::timeout(Duration::from_secs(10), flush).await.unwrap_or(false)
    }

    /// Stops the result writer when dropped (a control plane that returns before [`finish`]).
    ///
    /// [`finish`]: Dispatcher::finish
    pub fn results_guard(&self) -> tokio_util::sync::DropGuard {
        self.inner.results_done.clone().drop_guard()
    }

    /// Something may have become due (a publish, a re-activation, a replay): look again now, in
    /// every zone.
    pub fn wake(&self) {
        self.inner.state.lock().expect("dispatcher lock").uncatch();
        self.inner.wake.notify_one();
    }

    /// Agents have room again, but nothing new is due: look again in zones not caught up.
    fn nudge(&self) {
        self.inner.wake.notify_one();
    }

    /// Events just stored and acknowledged: their envelopes are kept so that dispatching them
    /// reads nothing back from the database.
    fn published(&self, stored: &[&StoredEvent]) {
        let built: Vec<_> = stored
            .iter()
            .filter(|s| !s.deliveries.is_empty())
            .map(|s| {
                let e = &s.event;
                let envelope =
                    Bytes::from(envelope::build(&e.id, &e.event_type, &e.timestamp, &e.workspace_id, &e.data));
                let key = (e.workspace_id.clone(), e.id.clone());
                // Those still to be sent: none, for a repeat of a publish already delivered.
                let open = s.deliveries.iter().filter(|d| matches!(d.status, status::PENDING | status::IN_FLIGHT));
                (key, envelope, e.trace_context.clone(), e.created_at, open.count())
            })
            .collect();
        let mut cache = self.inner.events.lock().expect("event cache lock");
        for (key, envelope, trace_context, created_at, unsent) in built {
            cache.insert(key, envelope, trace_context, created_at, unsent);
        }
    }

    /// Follows delivery changes (for `WatchDeliveries`).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.inner.changes.subscribe()
    }

    /// These deliveries changed: tell watchers, if there are any (reading the rows costs a query).
    pub fn changed(&self, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        // Watchers of other replicas on the same PostgreSQL hear of it too.
        if let Some(replicas) = &self.inner.replicas {
            let _ = replicas.send(ids.clone());
        }
        self.changed_here(ids);
    }

    /// Tells this replica's watchers that these deliveries changed (read from the database).
    pub fn changed_here(&self, ids: Vec<String>) {
        if self.inner.changes.receiver_count() == 0 || ids.is_empty() {
            return;
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            match inner.store.deliveries_by_ids(ids).await {
                Ok(rows) => {
                    for row in rows {
                        let _ = inner.changes.send(Change::Row(Arc::new(row)));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read changed deliveries for watchers"),
            }
        });
    }

    /// These deliveries of `webhook` changed at once: watchers are told of each, or, past
    /// [`Changed::LISTED`], of how many.
    pub fn changed_many(&self, workspace: &str, webhook: &str, changed: Changed) {
        if changed.unwatched {
            return;
        }
        if changed.listed() {
            return self.changed(changed.ids);
        }
        if let Some(replicas) = &self.inner.replicas {
            let _ = replicas.send(vec![format!("{MANY}{} {webhook} {workspace}", changed.count)]);
        }
        self.many_here(workspace.to_owned(), webhook.to_owned(), changed.count);
    }

    fn many_here(&self, workspace: String, webhook: String, count: u64) {
        if self.inner.changes.receiver_count() > 0 {
            let _ = self.inner.changes.send(Change::Many { workspace, webhook, count });
        }
    }

    /// Changes another replica announced on `herald_changes`: ids separated by commas, or
    /// many of one webhook's at once ([`MANY`]).
    pub fn heard_changes(&self, told: &str) {
        let Some(many) = told.strip_prefix(MANY) else {
            return self.changed_here(told.split(',').map(str::to_owned).collect());
        };
        let mut parts = many.splitn(3, ' ');
        match (parts.next().and_then(|c| c.parse().ok()), parts.next(), parts.next()) {
            (Some(count), Some(webhook), Some(workspace)) => {
                self.many_here(workspace.to_owned(), webhook.to_owned(), count)
            }
            _ => tracing::debug!(told, "cannot read another replica's changes"),
        }
    }

    /// This control plane among replicas.
    pub fn peers(&self) -> &crate::store::Peers {
        &self.inner.peers
    }

    /// A webhook changed or was deleted (here, or on another replica): forget what is cached of
    /// it, and look for work again.
    pub fn forget(&self, webhook_id: &str) {
        {
            let mut state = self.inner.state.lock().expect("dispatcher lock");
            state.hooks.remove(webhook_id);
            state.hooks_epoch += 1;
        }
        self.inner.store.webhooks_changed();
        self.wake();
    }

    /// Forgets every cached webhook: this replica may have missed other replicas' changes (its
    /// listener was not connected).
    pub fn forget_all(&self) {
        {
            let mut state = self.inner.state.lock().expect("dispatcher lock");
            state.hooks.clear();
            state.hooks_epoch += 1;
        }
        self.inner.store.webhooks_changed();
        self.wake();
    }

    /// Registers an agent session that said hello; answers the welcome and the session id.
    pub fn open(&self, hello: &proto::Hello, tx: Outbound) -> (u64, proto::Welcome) {
        let mut state = self.inner.state.lock().expect("dispatcher lock");
        state.next_session += 1;
        let session = state.next_session;
        let agent_id = if hello.agent_id.is_empty() { ids::new_id(ids::AGENT) } else { hello.agent_id.clone() };
        state.sessions.insert(
            session,
            Session {
                holder: format!("{agent_id}@{}", ids::new_id("s")),
                agent_id: agent_id.clone(),
                zone: hello.zone.clone(),
                version: hello.version.clone(),
                egress_ips: hello.egress_ips.clone(),
                capacity: hello.capacity,
                credit: 0,
                in_flight: 0,
                connected_at: now_millis(),
                draining: false,
                tx,
                unacked: Vec::new(),
            },
        );
        // Queued under the lock, so that the table sees opens and closes in the order they happened.
        if let (Some(writes), Some(s)) = (&self.inner.agent_writes, state.sessions.get(&session)) {
            let _ = writes.send(AgentWrite::Seen(session_row(s, now_millis())));
        }
        let welcome = proto::Welcome {
            agent_id,
            heartbeat_interval: Some(prost_types::Duration { seconds: HEARTBEAT.as_secs() as i64, nanos: 0 }),
            response_body_limit: self.inner.response_body_limit,
            headers_json: true,
            acks_results: true,
        };
        (session, welcome)
    }

    /// Results an agent kept from an earlier session, reported with its hello.
    pub async fn pending_results(&self, session: u64, results: Vec<proto::AttemptResult>) {
        for result in results {
            self.arrived(session, result, false).await;
        }
    }

    /// The control plane is shutting down and has asked this session's agent to drain: it is
    /// sent nothing more (not even leases a publish would take).
    pub fn drain(&self, session: u64) {
        if let Some(s) = self.inner.state.lock().expect("dispatcher lock").sessions.get_mut(&session) {
            s.draining = true;
            s.credit = 0;
        }
    }

    /// More credit from an agent.
    pub fn credit(&self, session: u64, jobs: u32) {
        if let Some(s) = self.inner.state.lock().expect("dispatcher lock").sessions.get_mut(&session)
            && !s.draining
        {
            s.add_credit(jobs);
        }
        self.nudge();
    }

    /// A result from an agent of this session.
    pub async fn result(&self, session: u64, result: proto::AttemptResult) {
        self.arrived(session, result, true).await;
    }

    async fn arrived(&self, session: u64, result: proto::AttemptResult, live: bool) {
        let (agent_id, zone) = {
            let mut state = self.inner.state.lock().expect("dispatcher lock");
            match state.sessions.get_mut(&session) {
                Some(s) => {
                    if live {
                        s.in_flight = s.in_flight.saturating_sub(1);
                    }
                    if live && result.not_sent {
                        // Only a draining agent returns jobs unsent: send it nothing more. A result
                        // kept from an earlier session says nothing of this one: an agent that
                        // drained for a control plane going away reconnects to take work again.
                        s.draining = true;
                        s.credit = 0;
                    }
                    (s.agent_id.clone(), s.zone.clone())
                }
                None => return,
            }
        };
        let arrived = Arrived { session, kept: !live, agent_id, zone, result, flushed: None };
        let _ = self.inner.results.send(arrived).await;
    }

    /// The session ended: its leases go back to the queue at once, without using an attempt —
    /// except those of webhooks with a `max_in_flight`, which hold their slots until the agent
    /// reports them (it may only be cut off, and still sending) or they expire — and unless
    /// `reclaim` is false (the control plane is shutting down: the agent reported what it
    /// finished during its drain, and reports what it still runs to its next session, under
    /// leases that are still current).
    pub async fn close(&self, session: u64, reclaim: bool) {
        let holder = {
            let mut state = self.inner.state.lock().expect("dispatcher lock");
            let Some(s) = state.sessions.remove(&session) else { return };
            if let Some(writes) = &self.inner.agent_writes {
                let _ = writes.send(AgentWrite::Gone { id: s.agent_id.clone(), connected_at: s.connected_at });
            }
            s.holder
        };
        if !reclaim {
            return;
        }
        // Results the agent sent before it left are applied first: a lease it finished is not
        // dispatched again.
        self.flush_results().await;
        let held = match self.inner.store.reclaim_leases(Some(&holder), now_millis(), &self.inner.policy).await {
            Ok(reclaimed) => {
                let leases = reclaimed.leases;
                if !leases.is_empty() {
                    tracing::info!(holder, leases = leases.len(), "an agent left; its leases are dispatched again");
                    self.inner.metrics.leases_reclaimed.get_or_create(&agent_left()).inc_by(leases.len() as u64);
                }
                if !reclaimed.held.is_empty() {
                    tracing::info!(
                        holder,
                        leases = reclaimed.held.len(),
                        "an agent left; its leases of webhooks with max_in_flight keep their slots until reported or expired"
                    );
                }
                self.count_outcomes(&reclaimed.applied);
                self.release_leases(&leases);
                reclaimed.held
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot take back the leases of a closed session; they will expire");
                // Nothing was taken back: each lease keeps its slot until it expires.
                let state = self.inner.state.lock().expect("dispatcher lock");
                state
                    .leases
                    .iter()
                    .filter(|(_, meta)| meta.session == session)
                    .map(|(lease, _)| lease.clone())
                    .collect()
            }
        };
        // Leases of this session that another replica took back when they expired are not among
        // those: forget them too, or their webhook's slots would stay taken. Held leases are
        // forgotten when their result comes or they expire.
        self.release_session(session, held);
        self.wake();
    }

    /// Counts what results (or lost-lease attempts) made of their deliveries.
    fn count_outcomes(&self, applied: &[Applied]) {
        for a in applied {
            let outcome = match a {
                Applied::Succeeded => Outcome::succeeded,
                Applied::Retry { .. } => Outcome::retrying,
                Applied::Failed => Outcome::failed,
                Applied::Released | Applied::Stale => continue,
            };
            self.inner.metrics.deliveries.get_or_create(&OutcomeLabels { outcome }).inc();
        }
    }

    /// How many agent sessions are open, per zone.
    pub fn zones(&self) -> HashMap<String, i64> {
        let state = self.inner.state.lock().expect("dispatcher lock");
        let mut zones = HashMap::new();
        for s in state.sessions.values() {
            *zones.entry(s.zone.clone()).or_default() += 1;
        }
        zones
    }

    /// The connected agents, optionally of one zone.
    pub fn agents(&self, zone: &str) -> Vec<proto::Agent> {
        let state = self.inner.state.lock().expect("dispatcher lock");
        let mut agents: Vec<proto::Agent> = state
            .sessions
            .values()
            .filter(|s| zone.is_empty() || s.zone == zone)
            .map(|s| proto::Agent {
                id: s.agent_id.clone(),
                zone: s.zone.clone(),
                version: s.version.clone(),
                egress_ips: s.egress_ips.clone(),
                in_flight: s.in_flight,
                capacity: s.capacity,
                connected_since: Some(crate::api::timestamp(s.connected_at)),
            })
            .collect();
        agents.sort_by(|a, b| (&a.zone, &a.id).cmp(&(&b.zone, &b.id)));
        agents
    }

    /// Whether an agent of `zone` takes work: one connected here and not draining, or, on
    /// PostgreSQL, one another replica announced at its last heartbeat (read every heartbeat here).
    pub fn zone_served(&self, zone: &str) -> bool {
        let here =
            self.inner.state.lock().expect("dispatcher lock").sessions.values().any(|s| s.zone == zone && !s.draining);
        here || self.inner.served_elsewhere.lock().expect("zones lock").contains(zone)
    }

    /// The connected agents of every replica on the same PostgreSQL (as their replicas last wrote
    /// them, at most a heartbeat old), this replica's own as they are now; on SQLite, this
    /// replica's.
    pub async fn all_agents(&self, zone: &str) -> Vec<proto::Agent> {
        let mut agents = self.agents(zone);
        if !self.inner.store.shares_agents() {
            return agents;
        }
        let since = now_millis() - crate::store::agents::AGENT_SEEN_MS;
        let rows = match self.inner.store.agents_seen_since(zone, since).await {
            Ok(rows) => rows,
            Err(e) => {
                // This replica's own agents are the part that is exact: answer with them.
                tracing::warn!(error = %e, "cannot read other replicas' agents; listing this replica's");
                return agents;
            }
        };
        let here: std::collections::HashSet<String> = agents.iter().map(|a| a.id.clone()).collect();
        agents.extend(rows.into_iter().filter(|r| !here.contains(&r.id)).map(|r| proto::Agent {
            egress_ips: serde_json::from_str(&r.egress_ips).unwrap_or_default(),
            in_flight: u32::try_from(r.in_flight).unwrap_or(0),
            capacity: u32::try_from(r.capacity).unwrap_or(0),
            connected_since: Some(crate::api::timestamp(r.connected_at)),
            id: r.id,
            zone: r.zone,
            version: r.version,
        }));
        agents.sort_by(|a, b| (&a.zone, &a.id).cmp(&(&b.zone, &b.id)));
        agents
    }

    /// Writes this replica's sessions for the others (PostgreSQL only): each open and close as it
    /// happens, in order, and every session every heartbeat. One task writes them all, so that
    /// the table sees them in the order the dispatcher did.
    async fn agents_loop(self, mut writes: mpsc::UnboundedReceiver<AgentWrite>, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(HEARTBEAT);
        loop {
            let store = &self.inner.store;
            let written = tokio::select! {
                _ = shutdown.cancelled() => return,
                write = writes.recv() => match write {
                    None => return,
                    Some(AgentWrite::Seen(row)) => store.agents_seen(vec![row]).await,
                    Some(AgentWrite::Gone { id, connected_at }) => store.agent_gone(&id, connected_at).await,
                },
                _ = every.tick() => {
                    let now = now_millis();
                    let rows: Vec<_> = {
                        let state = self.inner.state.lock().expect("dispatcher lock");
                        state.sessions.values().map(|s| session_row(s, now)).collect()
                    };
                    let here: std::collections::HashSet<String> = rows.iter().map(|r| r.id.clone()).collect();
                    let written = match store.agents_seen(rows).await {
                        Ok(()) => store.forget_old_agents(now).await,
                        Err(e) => Err(e),
                    };
                    // Which zones the other replicas' agents serve (`zone_served`).
                    match store.agents_seen_since("", now - crate::store::agents::AGENT_SEEN_MS).await {
                        Ok(seen) => {
                            *self.inner.served_elsewhere.lock().expect("zones lock") =
                                seen.into_iter().filter(|a| !here.contains(&a.id)).map(|a| a.zone).collect();
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot read which zones other replicas' agents serve"),
                    }
                    written
                }
            };
            if let Err(e) = written {
                tracing::warn!(error = %e, "cannot record this replica's agents for the others");
            }
        }
    }

    /// Gives a session back credit that a publish's leases or a claim reserved but did not use.
    fn give_back(&self, session: u64, jobs: u32) {
        let mut state = self.inner.state.lock().expect("dispatcher lock");
        if let Some(s) = state.sessions.get_mut(&session) {
            s.unreserve(jobs);
        }
    }

    /// Sends what a publish leased as it committed. Jobs that cannot go are handed back (due
    /// again at once, no attempt used), each by its own lease: those of a session that closed
    /// before the publish committed (its `close` could not see them), and those whose commit took
    /// longer than the lease grace (the lease could expire while the agent still sends).
    async fn send_leased(&self, leased: Vec<(u64, Claimed)>) {
        let grace = self.inner.policy.lease_grace_ms;
        let mut by_session: std::collections::BTreeMap<u64, Vec<Claimed>> = std::collections::BTreeMap::new();
        for (session, c) in leased {
            by_session.entry(session).or_default().push(c);
        }
        for (session, claimed) in by_session {
            let now = now_millis();
            let (late, timely): (Vec<Claimed>, Vec<Claimed>) =
                claimed.into_iter().partition(|c| now - c.delivery.updated_at >= grace);
            let mut back: Vec<(String, String)> =
                late.iter().map(|c| (c.lease_id.clone(), c.delivery.id.clone())).collect();
            if !late.is_empty() {
                self.give_back(session, late.len() as u32);
            }
            if !timely.is_empty() {
                back.extend(self.send_jobs(session, timely, now, Via::publish).await);
            }
            self.hand_back(back).await;
        }
    }

    /// Hands back leases whose jobs were never sent (their session closed or began to drain
    /// before they went): the deliveries are due again, no attempt used.
    async fn hand_back(&self, back: Vec<(String, String)>) {
        if back.is_empty() {
            return;
        }
        let reports = back
            .into_iter()
            .map(|(lease_id, delivery_id)| AttemptReport {
                lease_id,
                delivery_id,
                not_sent: true,
                ..Default::default()
            })
            .collect();
        if let Err(e) = self.inner.store.record_results(reports, now_millis(), &self.inner.policy).await {
            tracing::warn!(error = %e, "cannot hand back leases of jobs not sent; they will expire");
        }
        self.wake();
    }

    /// Whether any of these results ends a lease of a webhook with `max_in_flight` (or of one
    /// not cached here, which may have it): its slot is free only once the result is written,
    /// so such a batch does not wait for more.
    fn frees_a_slot(&self, batch: &[Arrived]) -> bool {
        let state = self.inner.state.lock().expect("dispatcher lock");
        batch.iter().any(|a| {
            state
                .leases
                .get(&a.result.lease_id)
                .is_some_and(|m| state.hooks.get(&m.webhook_id).is_none_or(|h| h.webhook.spec.max_in_flight.is_some()))
        })
    }

    /// Forgets leases that ended (results, reclaims): frees their webhook's in-flight slot.
    fn release_leases(&self, leases: &[String]) {
        let mut state = self.inner.state.lock().expect("dispatcher lock");
        let mut counts = self.inner.hook_in_flight.lock().expect("in-flight lock");
        for lease in leases {
            state.held.remove(lease);
            if let Some(meta) = state.leases.remove(lease)
                && let Some(n) = counts.get_mut(&meta.webhook_id)
            {
                *n = n.saturating_sub(1);
            }
        }
    }

    /// Forgets every lease still remembered of a closed session but those `held`, freeing their
    /// webhooks' slots. Held leases are forgotten by [`Self::release_expired`] once
    /// they expire, if no result or reclaim ended them before.
    fn release_session(&self, session: u64, held: Vec<String>) {
        let mut state = self.inner.state.lock().expect("dispatcher lock");
        let mut counts = self.inner.hook_in_flight.lock().expect("in-flight lock");
        let State { leases, held: kept, .. } = &mut *state;
        for lease in held {
            if let Some(meta) = leases.get(&lease) {
                // The dispatch loop wakes to forget it, whatever ends its row meanwhile.
                wake_by(&self.inner.lease_wake, meta.expires_at);
                kept.insert(lease);
            }
        }
        leases.retain(|lease, meta| {
            if meta.session != session || kept.contains(lease) {
                return true;
            }
            if let Some(n) = counts.get_mut(&meta.webhook_id) {
                *n = n.saturating_sub(1);
            }
            false
        });
    }

    /// Forgets the held leases of closed sessions that expired before `now`: the reclaim that
    /// just ran took them back, or another replica's did.
    fn release_expired(&self, now: i64) {
        let expired: Vec<String> = {
            let state = self.inner.state.lock().expect("dispatcher lock");
            let expired = |lease: &&String| state.leases.get(*lease).is_none_or(|m| m.expires_at < now);
            state.held.iter().filter(expired).cloned().collect()
        };
        if !expired.is_empty() {
            self.release_leases(&expired);
        }
    }

    /// SQLite, at start: counts the leases a control plane before this one gave out to webhooks
    /// with a `max_in_flight` in their slots until their results come or they expire, as it
    /// counted them (their agents may still be sending; on PostgreSQL claims count the
    /// database's rows). A result recorded between this read and the count keeps a slot taken
    /// until the lease's expiry, never longer.
    async fn count_leases_of_before(&self) {
        if self.inner.store.db.get_database_backend() != sea_orm::DbBackend::Sqlite {
            return;
        }
        let leases = match self.inner.store.limited_leases().await {
            Ok(leases) => leases,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the leases in flight; webhooks' max_in_flight may be exceeded until they expire");
                return;
            }
        };
        if leases.is_empty() {
            return;
        }
        tracing::info!(leases = leases.len(), "leases in flight of webhooks with max_in_flight count in their slots");
        let mut state = self.inner.state.lock().expect("dispatcher lock");
        let mut counts = self.inner.hook_in_flight.lock().expect("in-flight lock");
        for (lease, webhook_id, expires_at) in leases {
            if state.leases.contains_key(&lease) {
                continue;
            }
            *counts.entry(webhook_id.clone()).or_default() += 1;
            wake_by(&self.inner.lease_wake, expires_at);
            state.held.insert(lease.clone());
            let meta = LeaseMeta { webhook_id, session: NO_SESSION, request_body: None, expires_at };
            state.leases.insert(lease, meta);
        }
    }

    async fn dispatch_loop(self, shutdown: CancellationToken) {
        self.count_leases_of_before().await;
        let mut last_reclaim = 0i64;
        let mut next_expiry = 0i64;
        // The earliest known time work becomes due (a retry, a rate-limit slot), or 0. Kept across
        // wake-ups: rounds skip zones caught up, so they do not find it again by themselves.
        let mut due_at = 0i64;
        // When every zone was last looked at: at least every `IDLE_WAKE_MS`, however often wake-ups
        // come (a safety net that steady traffic cannot starve).
        let mut swept = now_millis();
        loop {
            let now = now_millis();
            if (due_at > 0 && now >= due_at) || now - swept >= IDLE_WAKE_MS {
                due_at = 0;
                swept = now;
                self.inner.state.lock().expect("dispatcher lock").uncatch();
            }
            if now - last_reclaim >= RECLAIM_EVERY_MS || (next_expiry > 0 && now > next_expiry) {
                last_reclaim = now;
                let reclaimed = self.inner.store.reclaim_leases(None, now, &self.inner.policy).await;
                let refused = reclaimed.is_err();
                match reclaimed {
                    Ok(reclaimed) if !reclaimed.leases.is_empty() => {
                        let leases = reclaimed.leases;
                        tracing::info!(leases = leases.len(), "expired leases taken back");
                        self.inner.metrics.leases_reclaimed.get_or_create(&expired()).inc_by(leases.len() as u64);
                        self.count_outcomes(&reclaimed.applied);
                        self.release_leases(&leases);
                        self.inner.state.lock().expect("dispatcher lock").uncatch();
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot take back expired leases"),
                }
                if !refused {
                    self.release_expired(now);
                }
                next_expiry = if refused {
                    // The database reads but does not write (a full disk, a read-only failover):
                    // the lease that expired is still there, and waking for it at once would spin.
                    now + RECLAIM_RETRY_MS
                } else {
                    let held = {
                        let state = self.inner.state.lock().expect("dispatcher lock");
                        state.held.iter().filter_map(|lease| state.leases.get(lease)).map(|m| m.expires_at).min()
                    };
                    match (self.inner.store.next_lease_expiry().await.ok().flatten(), held) {
                        (Some(at), Some(held)) => at.min(held),
                        (at, held) => at.or(held).unwrap_or(0),
                    }
                };
            }
            let mut next_wake = now + IDLE_WAKE_MS.min(RECLAIM_EVERY_MS);
            let soonest = |due_at: i64, at: i64| if due_at == 0 { at } else { due_at.min(at) };
            match self.dispatch_round().await {
                Ok(Some(due)) => due_at = soonest(due_at, due),
                Ok(None) => {}
                Err(e) => {
                    // Zones marked caught up before the failure may hide what the round did not
                    // get to say (their next due time): look at every zone again next time.
                    self.inner.state.lock().expect("dispatcher lock").uncatch();
                    tracing::warn!(error = %e, "dispatch round failed");
                }
            }
            // Leases given out in this round may expire before anything else wakes us.
            let hinted = self.inner.lease_wake.swap(0, Ordering::SeqCst);
            if hinted > 0 {
                next_expiry = if next_expiry == 0 { hinted } else { next_expiry.min(hinted) };
            }
            if next_expiry > 0 {
                next_wake = next_wake.min(next_expiry + 1);
            }
            for hint in [&self.inner.rate_wake, &self.inner.due_wake] {
                let at = hint.swap(0, Ordering::SeqCst);
                if at > 0 {
                    due_at = soonest(due_at, at);
                }
            }
            if due_at > 0 {
                next_wake = next_wake.min(due_at);
            }
            self.inner.planned_wake.store(next_wake, Ordering::SeqCst);
            let sleep = Duration::from_millis(u64::try_from(next_wake - now_millis()).unwrap_or(0));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.inner.wake.notified() => {}
                // Work came due, a lease may have expired, or the safety net: every zone is looked
                // at.
                _ = tokio::time::sleep(sleep) => self.inner.state.lock().expect("dispatcher lock").uncatch(),
            }
        }
    }

    /// Leases due work to every agent with credit, least loaded first; returns the earliest due
    /// time of work left pending in a drained zone.
    async fn dispatch_round(&self) -> Result<Option<i64>, StoreError> {
        let mut earliest: Option<i64> = None;
        let mut drained: Vec<String> = Vec::new();
        loop {
            // The least loaded agent with credit in a zone that may still have work.
            let (pick, uncaught) = {
                let state = self.inner.state.lock().expect("dispatcher lock");
                let pick = state
                    .sessions
                    .iter()
                    .filter(|(_, s)| {
                        s.credit > 0 && !s.draining && !drained.contains(&s.zone) && !state.caught_up.contains(&s.zone)
                    })
                    .min_by_key(|(_, s)| (s.in_flight, s.connected_at))
                    .map(|(id, s)| (*id, s.holder.clone(), s.zone.clone()));
                (pick, state.uncaught)
            };
            let Some((session, holder, zone)) = pick else { return Ok(earliest) };
            let now = now_millis();
            // The claim's size is the credit the agent has when the claim runs, reserved then.
            let reserved = Arc::new(AtomicU32::new(0));
            let mut filter = self.filter(now);
            filter.reserve = Some(self.reserve(session, reserved.clone()));
            let claimed = self
                .inner
                .store
                .claim_where(&zone, &holder, u64::from(CLAIM_BATCH), now, &self.inner.policy, filter)
                .await;
            let want = reserved.load(Ordering::SeqCst);
            let claimed = match claimed {
                Ok(claimed) => claimed,
                Err(e) => {
                    self.give_back(session, want);
                    return Err(e);
                }
            };
            let got = claimed.len() as u32;
            self.give_back(session, want - got);
            if want == 0 {
                // The session closed or began to drain meanwhile: nothing was looked for.
                continue;
            }
            if got > 0 {
                // Jobs for a session that closed or began to drain meanwhile are handed back.
                let back = self.send_jobs(session, claimed, now, Via::claim).await;
                self.hand_back(back).await;
            }
            if got < want {
                // Drained for now. Work due later sets the next wake-up; work due already but held
                // back by a webhook's limits waits for a result or its rate-limit slot instead.
                let due = self.inner.store.next_due(&zone).await?;
                if let Some(due) = due
                    && due > now
                {
                    earliest = Some(earliest.map_or(due, |e: i64| e.min(due)));
                }
                // Nothing due is left behind: new deliveries of the zone may be leased as they are
                // published, unless something makes work due first (see `State::caught_up`).
                if due.is_none_or(|due| due > now) {
                    let mut state = self.inner.state.lock().expect("dispatcher lock");
                    if state.uncaught == uncaught {
                        state.caught_up.insert(zone.clone());
                    }
                }
                drained.push(zone);
            }
        }
    }

    /// Reserves a claim's credit when it runs: up to its limit of the session's credit, taken
    /// and counted in flight as a lease at publish is; the amount is left in `into`. A session
    /// gone or draining gets nothing.
    fn reserve(&self, session: u64, into: Arc<AtomicU32>) -> Reserve {
        let inner = self.inner.clone();
        Box::new(move |limit| {
            let mut state = inner.state.lock().expect("dispatcher lock");
            let Some(s) = state.sessions.get_mut(&session).filter(|s| !s.draining) else { return 0 };
            let n = s.credit.min(u32::try_from(limit).unwrap_or(u32::MAX));
            s.credit -= n;
            s.in_flight += n;
            into.store(n, Ordering::SeqCst);
            u64::from(n)
        })
    }

    /// The claim filter: each webhook's free `max_in_flight` slots and its rate limiter.
    fn filter(&self, now: i64) -> Filter {
        let in_flight = self.inner.hook_in_flight.clone();
        let limiters = self.inner.limiters.clone();
        let rate_wake = self.inner.rate_wake.clone();
        let mut taken: HashMap<String, i64> = HashMap::new();
        Filter {
            reserve: None,
            exclude: Vec::new(),
            rate_wake: Some(self.inner.rate_wake.clone()),
            allow: Some(Box::new(move |d, limits: Limits| {
                if let Some(max) = limits.max_in_flight {
                    let busy =
                        i64::from(in_flight.lock().expect("in-flight lock").get(&d.webhook_id).copied().unwrap_or(0));
                    let mine = taken.get(&d.webhook_id).copied().unwrap_or(0);
                    if busy + mine >= max {
                        return false;
                    }
                }
                if let Some(rate) = limits.rate_limit_per_second {
                    let limiter = {
                        let mut all = limiters.lock().expect("limiter lock");
                        let entry = all.entry(d.webhook_id.clone()).or_insert_with(|| (rate, limiter(rate)));
                        if entry.0 != rate {
                            *entry = (rate, limiter(rate));
                        }
                        entry.1.clone()
                    };
                    if limiter.check().is_err() {
                        wake_by(&rate_wake, now + (1000 / rate.max(1)).max(1));
                        return false;
                    }
                }
                *taken.entry(d.webhook_id.clone()).or_default() += 1;
                true
            })),
        }
    }

    async fn hook(&self, id: &str) -> Result<Arc<Hook>, StoreError> {
        let epoch = {
            let state = self.inner.state.lock().expect("dispatcher lock");
            if let Some(h) = state.hooks.get(id) {
                return Ok(h.clone());
            }
            state.hooks_epoch
        };
        let webhook = self.inner.store.get_webhook_any(id).await?;
        let hook = Arc::new(Hook { webhook });
        let mut state = self.inner.state.lock().expect("dispatcher lock");
        if state.hooks_epoch == epoch {
            state.hooks.insert(id.to_owned(), hook.clone());
        }
        Ok(hook)
    }

    /// Sends jobs to a session that has their credit reserved (taken, and counted in flight when
    /// a publish leased them or a claim ran); what is not sent gives it back. `via`: leased at
    /// publish, or claimed. Returns the jobs (lease, delivery) not sent because the session had
    /// closed or begun to drain, or its stream refused them, for the caller to hand back (`close`
    /// takes a claim's back too, but not at shutdown, and may have run before a publish's
    /// committed).
    async fn send_jobs(&self, session: u64, claimed: Vec<Claimed>, now: i64, via: Via) -> Vec<(String, String)> {
        let leased = claimed.len() as u32;
        let claimed_expiry = claimed.iter().map(|c| c.lease_expires_at).min().unwrap_or(now);
        let rows: Vec<&crate::db::entity::delivery::Model> = claimed.iter().map(|c| &c.delivery).collect();
        let claimed_rows: Vec<crate::db::entity::delivery::Model> = if self.inner.changes.receiver_count() > 0 {
            claimed.iter().map(|c| c.delivery.clone()).collect()
        } else {
            Vec::new()
        };
        // Each event's envelope and publish trace: from the cache, else read back and built once.
        let mut events: HashMap<(String, String), (Bytes, Option<String>)> = HashMap::new();
        let mut missing = Vec::new();
        {
            let mut cache = self.inner.events.lock().expect("event cache lock");
            for d in &rows {
                match cache.take(&d.workspace_id, &d.event_id, d.created_at) {
                    Some(hit) => _ = events.insert((d.workspace_id.clone(), d.event_id.clone()), hit),
                    None => missing.push(*d),
                }
            }
        }
        let envelopes = &self.inner.metrics.envelopes;
        envelopes.get_or_create(&SourceLabels { source: Source::cache }).inc_by((rows.len() - missing.len()) as u64);
        envelopes.get_or_create(&SourceLabels { source: Source::database }).inc_by(missing.len() as u64);
        if !missing.is_empty() {
            match self.inner.store.events_of(&missing).await {
                Ok(read) => {
                    for (key, e) in read {
                        let envelope = envelope::build(&e.id, &e.event_type, &e.timestamp, &e.workspace_id, &e.data);
                        events.insert(key, (Bytes::from(envelope), e.trace_context));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot load events of claimed deliveries; their leases will expire");
                    self.give_back(session, leased);
                    return Vec::new();
                }
            }
        }
        let mut undeliverable = Vec::new();
        let mut unsent = Vec::new();
        let mut jobs = Vec::with_capacity(claimed.len());
        for c in claimed {
            let d = &c.delivery;
            let key = (d.workspace_id.clone(), d.event_id.clone());
            let Some((envelope, publish_trace)) = events.get(&key) else {
                undeliverable.push((c, "the event is gone (retention)".to_owned()));
                continue;
            };
            let hook = match self.hook(&d.webhook_id).await {
                Ok(h) => h,
                Err(StoreError::NotFound(_)) => {
                    undeliverable.push((c, "the webhook was deleted".to_owned()));
                    continue;
                }
                // Herald's own trouble: the lease is handed back, no attempt is used.
                Err(e) => {
                    tracing::warn!(error = %e, delivery = %d.id, "cannot load the webhook; the delivery waits");
                    unsent.push(c);
                    continue;
                }
            };
            let envelope = envelope.clone();
            let spec = &hook.webhook.spec;
            let (body, request_body) = match &spec.transform {
                None => (envelope, None),
                Some(t) => match crate::transform::render(t, &envelope, &spec.transform_vars) {
                    Ok(b) => {
                        let text = crate::transform::redact(&String::from_utf8_lossy(&b), &spec.transform_vars);
                        (Bytes::from(b), Some(text))
                    }
                    Err(e) => {
                        undeliverable.push((c, e.to_string()));
                        continue;
                    }
                },
            };
            let w = &hook.webhook;
            let rotating = w.previous_secret.is_some() && w.previous_secret_until.is_some_and(|until| until > now);
            let signing = proto::Signing {
                secret: if rotating { w.previous_secret.clone().unwrap_or_default() } else { w.secret.clone() },
                next_secret: if rotating { w.secret.clone() } else { String::new() },
                scheme: spec.signature_scheme,
                header_prefix: self.inner.header_prefix.clone(),
            };
            let timeout_ms = spec.timeout_ms.unwrap_or(crate::store::queue::DEFAULT_TIMEOUT_MS);
            jobs.push((
                proto::Job {
                    lease_id: c.lease_id.clone(),
                    delivery_id: d.id.clone(),
                    event_id: d.event_id.clone(),
                    event_type: d.event_type.clone(),
                    attempt: c.attempt,
                    url: spec.url.clone(),
                    headers: spec.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    body,
                    signing: Some(signing),
                    timeout: Some(prost_types::Duration {
                        seconds: timeout_ms / 1000,
                        nanos: ((timeout_ms % 1000) * 1_000_000) as i32,
                    }),
                    traceparent: dispatch_span(d, c.attempt, publish_trace.as_deref()),
                },
                d.webhook_id.clone(),
                request_body,
                c.lease_expires_at,
            ));
        }
        let handed_back = !unsent.is_empty() || !undeliverable.is_empty();
        if !unsent.is_empty() {
            let reports = unsent
                .iter()
                .map(|c| AttemptReport {
                    lease_id: c.lease_id.clone(),
                    delivery_id: c.delivery.id.clone(),
                    not_sent: true,
                    ..Default::default()
                })
                .collect();
            if let Err(e) = self.inner.store.record_results(reports, now, &self.inner.policy).await {
                tracing::warn!(error = %e, "cannot hand back leases; they will expire");
            }
        }
        // Jobs that cannot be built fail their attempt now, with the reason in the log.
        for (c, why) in undeliverable {
            tracing::warn!(delivery = %c.delivery.id, %why, "cannot build the job");
            let report = AttemptReport {
                lease_id: c.lease_id.clone(),
                delivery_id: c.delivery.id.clone(),
                agent_id: "control-plane".into(),
                zone: c.delivery.zone.clone(),
                started_at: now,
                error_kind: ErrorKind::Other,
                error_message: why,
                ..Default::default()
            };
            if let Err(e) = self.inner.store.record_results(vec![report], now, &self.inner.policy).await {
                tracing::warn!(error = %e, "cannot record a failed job; its lease will expire");
            }
        }
        if handed_back {
            // Deliveries handed back are due again, and a last attempt failed here queues its
            // `webhook.delivery.failed` notification.
            self.wake();
        }
        let tx = {
            let mut state = self.inner.state.lock().expect("dispatcher lock");
            if state.sessions.get(&session).is_none_or(|s| s.draining) {
                // The session closed or began to drain meanwhile (a job sent after the agent
                // drained would be dropped unread): the caller hands these leases back.
                return jobs.iter().map(|(job, ..)| (job.lease_id.clone(), job.delivery_id.clone())).collect();
            }
            let mut counts = self.inner.hook_in_flight.lock().expect("in-flight lock");
            for (job, webhook_id, request_body, expires_at) in &jobs {
                *counts.entry(webhook_id.clone()).or_default() += 1;
                let meta = LeaseMeta {
                    webhook_id: webhook_id.clone(),
                    session,
                    request_body: request_body.clone(),
                    expires_at: *expires_at,
                };
                state.leases.insert(job.lease_id.clone(), meta);
            }
            drop(counts);
            match state.sessions.get_mut(&session) {
                Some(s) => {
                    s.unreserve(leased - jobs.len() as u32);
                    Some(s.tx.clone())
                }
                None => None,
            }
        };
        if self.inner.changes.receiver_count() > 0 {
            for c in &claimed_rows {
                let _ = self.inner.changes.send(Change::Row(Arc::new(c.clone())));
            }
        }
        // A session that went away meanwhile has its leases taken back by `close`.
        let Some(tx) = tx else { return Vec::new() };
        wake_by(&self.inner.lease_wake, claimed_expiry);
        // Leases taken at publish are sent outside the dispatch loop: if one expires before the
        // loop would next wake, it must plan again.
        if via == Via::publish && claimed_expiry < self.inner.planned_wake.load(Ordering::SeqCst) {
            self.nudge();
        }
        // Never wait on one agent's stream: the channel holds the agent's whole credit, so a
        // full channel means a stuck session. Jobs it did not take never reached the agent: the
        // caller hands them back.
        let mut sent = 0u64;
        let mut unsent = Vec::new();
        let mut jobs = jobs.into_iter();
        for (job, ..) in jobs.by_ref() {
            let message = proto::ControlMessage { msg: Some(control_message::Msg::Job(job)) };
            if let Err(refused) = tx.try_send(Ok(message)) {
                if let Ok(proto::ControlMessage { msg: Some(control_message::Msg::Job(job)) }) = refused.into_inner() {
                    unsent.push((job.lease_id, job.delivery_id));
                }
                break;
            }
            sent += 1;
        }
        unsent.extend(jobs.map(|(job, ..)| (job.lease_id, job.delivery_id)));
        if !unsent.is_empty() {
            tracing::warn!(
                session,
                jobs = unsent.len(),
                "an agent's stream is full or closed; its jobs are handed back"
            );
            self.release_leases(&unsent.iter().map(|(lease, _)| lease.clone()).collect::<Vec<_>>());
            self.unreserve_when_room(session, tx, unsent.len() as u32);
        }
        self.inner.metrics.jobs_sent.get_or_create(&ViaLabels { via }).inc_by(sent);
        unsent
    }

    /// Gives a session back the credit of `jobs` its stream refused, and takes them out of its
    /// count in flight, once the stream has room for them all: the agent never got them, so it
    /// will never give their credit back itself, and a stream that was only behind for a moment
    /// would otherwise leave its agent a smaller window for the rest of the session. Not sooner:
    /// the credit would only claim jobs the stream refuses again, each refusal a claim and a
    /// hand-back written for nothing. A stream that closes first ends its session anyway; a
    /// draining session gets no credit, only its count.
    fn unreserve_when_room(&self, session: u64, tx: Outbound, jobs: u32) {
        let this = self.clone();
        tokio::spawn(async move {
            let room = (jobs as usize).clamp(1, tx.max_capacity());
            if tx.reserve_many(room).await.is_err() {
                return;
            }
            if let Some(s) = this.inner.state.lock().expect("dispatcher lock").sessions.get_mut(&session) {
                if s.draining {
                    s.in_flight = s.in_flight.saturating_sub(jobs);
                } else {
                    s.unreserve(jobs);
                }
            }
            this.nudge();
        });
    }

    /// Tells each session which of its results (by `seq`) are now recorded: its agent keeps them
    /// no longer. A session whose stream is full is told as soon as it has room
    /// ([`Self::acknowledge_when_room`]); one that is gone is not told, and its agent sends them
    /// again in its next hello (recognised then, and logged once: `store::queue::logged_attempts`).
    fn acknowledge(&self, acks: Vec<(u64, u64)>) {
        if acks.is_empty() {
            return;
        }
        let mut by_session: HashMap<u64, Vec<u64>> = HashMap::new();
        for (session, seq) in acks {
            by_session.entry(session).or_default().push(seq);
        }
        let mut state = self.inner.state.lock().expect("dispatcher lock");
        for (session, seqs) in by_session {
            let Some(s) = state.sessions.get_mut(&session) else { continue };
            if !s.unacked.is_empty() {
                // Waiting for room already: these go with the others.
                s.unacked.extend(seqs);
                continue;
            }
            let recorded = control_message::Msg::Recorded(proto::ResultsRecorded { seqs });
            if let Err(mpsc::error::TrySendError::Full(Ok(m))) =
                s.tx.try_send(Ok(proto::ControlMessage { msg: Some(recorded) }))
                && let Some(control_message::Msg::Recorded(r)) = m.msg
            {
                s.unacked = r.seqs;
                self.acknowledge_when_room(session, s.tx.clone());
            }
        }
    }

    /// Sends a session the acknowledgements its full stream refused (`Session::unacked`, and
    /// any added meanwhile) once it has room, rather than with its next acknowledgement, which
    /// after the last result of a burst never comes: until told, the agent keeps its copies and
    /// sends them again in its next hello.
    fn acknowledge_when_room(&self, session: u64, tx: Outbound) {
        let this = self.clone();
        tokio::spawn(async move {
            let Ok(permit) = tx.reserve().await else { return };
            let seqs = match this.inner.state.lock().expect("dispatcher lock").sessions.get_mut(&session) {
                Some(s) => std::mem::take(&mut s.unacked),
                None => return,
            };
            let recorded = control_message::Msg::Recorded(proto::ResultsRecorded { seqs });
            permit.send(Ok(proto::ControlMessage { msg: Some(recorded) }));
        });
    }

    async fn result_loop(self, mut rx: mpsc::Receiver<Arrived>) {
        let done = self.inner.results_done.clone();
        let mut buf = Vec::with_capacity(RESULT_BATCH);
        loop {
            tokio::select! {
                n = rx.recv_many(&mut buf, RESULT_BATCH) => if n == 0 { return },
                _ = done.cancelled() => return,
            }
            // At a low rate each result would be a write of its own (on SQLite also two changes
            // of the sync level, one each way): a small batch waits a moment for more, unless a
            // flush is waiting on it or it frees a `max_in_flight` slot. What arrived is recorded
            // even if the writer is told to stop meanwhile.
            if buf.len() < RESULT_LINGER_BELOW && buf.iter().all(|a| a.flushed.is_none()) && !self.frees_a_slot(&buf) {
                tokio::select! {
                    _ = tokio::time::sleep(RESULT_LINGER) => {}
                    _ = done.cancelled() => {}
                }
                while buf.len() < RESULT_BATCH {
                    let Ok(a) = rx.try_recv() else { break };
                    buf.push(a);
                }
            }
            let (markers, batch): (Vec<Arrived>, Vec<Arrived>) =
                std::mem::take(&mut buf).into_iter().partition(|a| a.flushed.is_some());
            if batch.is_empty() {
                markers.into_iter().filter_map(|m| m.flushed).for_each(|f| _ = f.send(()));
                continue;
            }
            let leases: Vec<String> = batch.iter().map(|a| a.result.lease_id.clone()).collect();
            let acks: Vec<(u64, u64)> =
                batch.iter().filter(|a| a.result.seq != 0).map(|a| (a.session, a.result.seq)).collect();
            let delivery_ids: Vec<String> = batch.iter().map(|a| a.result.delivery_id.clone()).collect();
            let metrics = &self.inner.metrics;
            // Each lease's webhook and request body (`None` for a lease this replica did not give).
            let known: Vec<Option<(String, Option<String>)>> = {
                let state = self.inner.state.lock().expect("dispatcher lock");
                batch
                    .iter()
                    .map(|a| {
                        state.leases.get(&a.result.lease_id).map(|m| (m.webhook_id.clone(), m.request_body.clone()))
                    })
                    .collect()
            };
            // Built outside the lock: checking or writing an agent's headers takes time in
            // proportion to their size. Attempts are counted once per webhook and class of
            // answer (a batch is mostly one of each), not looked up in the family per result.
            let mut counted: HashMap<(String, u32, ErrorKind), u64> = HashMap::new();
            let reports: Vec<AttemptReport> = batch
                .into_iter()
                .zip(known)
                .map(|(a, known)| {
                    let (webhook_id, request_body) = known.unzip();
                    let report = report(a, request_body.flatten());
                    if let (Some(webhook_id), false) = (webhook_id, report.not_sent) {
                        // The status stands for its class (`2xx`), the kind for an attempt without one.
                        let (status, kind) = match report.status {
                            100..=599 => (report.status / 100 * 100, ErrorKind::Unspecified),
                            _ => (0, report.error_kind),
                        };
                        *counted.entry((webhook_id, status, kind)).or_default() += 1;
                        metrics.attempt_seconds.observe(report.duration_ms as f64 / 1000.0);
                    }
                    report
                })
                .collect();
            for ((webhook_id, status, kind), n) in counted {
                let webhook = metrics.webhook_label(&webhook_id);
                let class = herald_shared::attempt_class(status, kind);
                metrics.attempts.get_or_create(&AttemptLabels { webhook, class }).inc_by(n);
            }
            let now = now_millis();
            // Whether these results made work due now: a lease handed back, an immediate retry,
            // or a failed delivery's `webhook.delivery.failed` notification.
            let mut due_now = false;
            match self.inner.store.record_results(reports, now, &self.inner.policy).await {
                Ok(applied) => {
                    self.acknowledge(acks);
                    self.count_outcomes(&applied);
                    for a in applied {
                        match a {
                            Applied::Retry { at } if at <= now => due_now = true,
                            Applied::Retry { at } => wake_by(&self.inner.due_wake, at),
                            Applied::Released | Applied::Failed => due_now = true,
                            _ => {}
                        }
                    }
                }
                // The leases stay in flight and expire: the deliveries are sent again (at least once).
                Err(e) => {
                    tracing::warn!(error = %e, results = leases.len(), "cannot record results; their leases will expire")
                }
            }
            self.release_leases(&leases);
            self.changed(delivery_ids);
            if due_now {
                self.wake();
            } else {
                self.nudge();
            }
            markers.into_iter().filter_map(|m| m.flushed).for_each(|f| _ = f.send(()));
        }
    }
}

/// The dispatcher as publishing sees it (a weak handle: the store it holds does not keep the
/// dispatcher alive).
struct Publishes(std::sync::Weak<Inner>);

impl PublishSink for Publishes {
    fn lease(&self, rows: &mut [delivery::Model], terms: &HashMap<&str, LeaseTerms>, now: i64) -> Vec<(u64, Claimed)> {
        let Some(inner) = self.0.upgrade() else { return Vec::new() };
        let grace = inner.policy.lease_grace_ms;
        let mut state = inner.state.lock().expect("dispatcher lock");
        let State { sessions, caught_up, .. } = &mut *state;
        let mut prefix: Option<String> = None;
        let mut leased = Vec::new();
        for d in rows.iter_mut() {
            if caught_up.is_empty() {
                break;
            }
            if d.status != status::PENDING || d.next_attempt_at > now || !caught_up.contains(&d.zone) {
                continue;
            }
            // Webhooks with limits are claimed, where the limits are counted (across replicas on
            // PostgreSQL). Their rows queue (and wake the dispatch loop) without holding back the
            // zone's others.
            let timeout = match terms.get(d.webhook_id.as_str()) {
                Some(t) if !t.limited => t.timeout_ms.unwrap_or(crate::store::queue::DEFAULT_TIMEOUT_MS),
                _ => continue,
            };
            let agent = sessions
                .iter_mut()
                .filter(|(_, s)| s.zone == d.zone && s.credit > 0 && !s.draining)
                .min_by_key(|(_, s)| (s.in_flight, s.connected_at));
            let Some((&session, s)) = agent else {
                // This row waits in the queue for room: later ones of its zone queue behind it.
                caught_up.remove(&d.zone);
                continue;
            };
            s.credit -= 1;
            s.in_flight += 1;
            // The same lease a claim gives: `<prefix>.<delivery id>`, expiring after the timeout.
            let prefix = prefix.get_or_insert_with(|| ids::new_id(ids::LEASE));
            let lease_id = format!("{prefix}.{}", d.id);
            let lease_expires_at = now + timeout + grace;
            d.status = status::IN_FLIGHT;
            d.lease_id = Some(lease_id.clone());
            d.lease_agent = Some(s.holder.clone());
            d.lease_expires_at = Some(lease_expires_at);
            d.updated_at = now;
            leased.push((session, Claimed { delivery: d.clone(), lease_id, lease_expires_at, attempt: 1 }));
        }
        leased
    }

    fn committed(&self, stored: &[&StoredEvent], leased: Vec<(u64, Claimed)>, queued: bool) {
        let Some(inner) = self.0.upgrade() else { return };
        let d = Dispatcher { inner };
        d.published(stored);
        // Watchers hear of new deliveries here, where the write is answered, rather than from
        // the caller's handler: a caller that goes away does not leave them unheard of.
        if d.inner.replicas.is_some() || d.inner.changes.receiver_count() > 0 {
            d.changed(stored.iter().flat_map(|e| e.deliveries.iter().map(|r| r.id.clone())).collect());
        }
        if queued {
            d.wake();
        }
        if !leased.is_empty() {
            tokio::spawn(async move { d.send_leased(leased).await });
        }
    }

    fn abandoned(&self, leased: Vec<(u64, Claimed)>) {
        let Some(inner) = self.0.upgrade() else { return };
        let d = Dispatcher { inner };
        for (session, _) in &leased {
            d.give_back(*session, 1);
        }
        d.wake();
    }

    fn watched(&self) -> bool {
        self.0.upgrade().is_some_and(|inner| inner.replicas.is_some() || inner.changes.receiver_count() > 0)
    }
}

/// A session as the `agents` table holds it, seen at `now`.
fn session_row(s: &Session, now: i64) -> crate::db::entity::agent::Model {
    crate::db::entity::agent::Model {
        id: s.agent_id.clone(),
        zone: s.zone.clone(),
        version: s.version.clone(),
        egress_ips: serde_json::to_string(&s.egress_ips).unwrap_or_else(|_| "[]".to_owned()),
        capacity: i32::try_from(s.capacity).unwrap_or(i32::MAX),
        connected_at: s.connected_at,
        last_seen_at: now,
        in_flight: i32::try_from(s.in_flight).unwrap_or(i32::MAX),
    }
}

/// An agent's result as the queue takes it.
fn report(a: Arrived, request_body: Option<String>) -> AttemptReport {
    let r = a.result;
    // Saturating: the numbers come from the agent (a `Retry-After` of any size).
    let ms = |seconds: i64, nanos: i32| seconds.saturating_mul(1000).saturating_add(i64::from(nanos / 1_000_000));
    let request_headers = logged_headers(r.request_headers_json, r.request_headers, &a.agent_id, &r.delivery_id);
    let response_headers = logged_headers(r.response_headers_json, r.response_headers, &a.agent_id, &r.delivery_id);
    AttemptReport {
        lease_id: r.lease_id,
        delivery_id: r.delivery_id,
        agent_id: a.agent_id,
        zone: a.zone,
        started_at: r.started_at.map_or_else(now_millis, |t| ms(t.seconds, t.nanos)),
        duration_ms: r.duration.map_or(0, |d| ms(d.seconds, d.nanos)),
        status: r.status,
        response_headers,
        response_body: r.response_body,
        error_kind: ErrorKind::try_from(r.error_kind).unwrap_or(ErrorKind::Other),
        error_message: r.error_message,
        request_headers,
        request_body,
        not_sent: r.not_sent,
        retry_after_ms: r.retry_after.map(|d| ms(d.seconds, d.nanos)),
        kept: a.kept,
    }
}

/// Headers an agent reported, as the attempt log stores them: its JSON object as it came (agents
/// told `headers_json`), or its map written as one (older agents). A JSON text that is not an
/// object of strings sorted by name, each name once, is not stored: the map is, if the agent
/// sent one too, or no headers.
fn logged_headers(json: String, map: HashMap<String, String>, agent: &str, delivery: &str) -> String {
    if !json.is_empty() {
        if herald_shared::headers::is_object(&json) {
            return json;
        }
        tracing::warn!(
            agent,
            delivery,
            "an agent reported headers that are not a sorted JSON object of strings; they are not logged as sent"
        );
    }
    if map.is_empty() {
        return String::new();
    }
    let mut pairs: Vec<(String, String)> = map.into_iter().collect();
    pairs.sort_unstable();
    herald_shared::headers::to_json(&pairs)
}

fn limiter(rate: i64) -> Arc<DefaultDirectRateLimiter> {
    let per_second = NonZeroU32::new(u32::try_from(rate).unwrap_or(u32::MAX).max(1)).expect("positive");
    Arc::new(RateLimiter::direct(Quota::per_second(per_second)))
}

/// Records the `herald.dispatch` span of one job (when traces are exported) and returns the
/// `traceparent` the job carries: a trace per delivery, a span per dispatch, linked to the
/// publish that created the delivery and to the dispatch before this one — the one whose lease
/// was lost, or (for a retry) the first dispatch of the previous attempt.
fn dispatch_span(d: &crate::db::entity::delivery::Model, attempt: u32, publish: Option<&str>) -> String {
    use herald_shared::telemetry;
    use opentelemetry::KeyValue;
    use opentelemetry::trace::{Link, Span as _, SpanKind};
    let lost = u32::try_from(d.lost_leases).unwrap_or(0);
    let cx = telemetry::dispatch_context(&d.id, attempt, lost);
    if telemetry::enabled() {
        let mut links: Vec<Link> =
            publish.and_then(telemetry::parse_traceparent).map(Link::with_context).into_iter().collect();
        if lost > 0 {
            links.push(Link::with_context(telemetry::dispatch_context(&d.id, attempt, lost - 1)));
        } else if attempt > 1 {
            links.push(Link::with_context(telemetry::dispatch_context(&d.id, attempt - 1, 0)));
        }
        let builder = opentelemetry::trace::SpanBuilder::from_name("herald.dispatch")
            .with_kind(SpanKind::Producer)
            .with_links(links)
            .with_attributes([
                KeyValue::new("herald.delivery_id", d.id.clone()),
                KeyValue::new("herald.webhook_id", d.webhook_id.clone()),
                KeyValue::new("herald.event_id", d.event_id.clone()),
                KeyValue::new("herald.attempt", i64::from(attempt)),
                KeyValue::new("herald.zone", d.zone.clone()),
            ]);
        telemetry::start_with_ids(builder, &cx).end();
    }
    telemetry::traceparent(&cx)
}

fn expired() -> ReasonLabels {
    ReasonLabels { reason: Reason::expired }
}

fn agent_left() -> ReasonLabels {
    ReasonLabels { reason: Reason::agent_left }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(event: &str) -> (String, String) {
        ("ws".to_owned(), event.to_owned())
    }

    fn envelope(len: usize) -> Bytes {
        Bytes::from(vec![b'x'; len])
    }

    #[test]
    fn a_full_event_cache_lets_the_oldest_out() {
        let mut cache = EventCache::with_limit(300);
        for event in ["e1", "e2", "e3", "e4"] {
            cache.insert(key(event), envelope(100), None, 7, 1);
        }
        assert_eq!((cache.bytes, cache.map.len(), cache.order.len()), (300, 3, 3));
        assert!(cache.take("ws", "e1", 7).is_none(), "the oldest made room");
        assert_eq!(cache.take("ws", "e4", 7).map(|(b, _)| b.len()), Some(100));
        // e4's only delivery took it, which made room for the next one without letting e2 out.
        cache.insert(key("e5"), envelope(100), Some("trace".to_owned()), 7, 1);
        assert_eq!(cache.take("ws", "e5", 7), Some((envelope(100), Some("trace".to_owned()))));
        assert!(cache.take("ws", "e2", 7).is_some());
        assert!(cache.take("ws", "e4", 7).is_none(), "a taken entry is gone");
        assert_eq!((cache.bytes, cache.map.len(), cache.order.len()), (100, 1, 1));
        cache.insert(key("big"), envelope(301), None, 7, 1);
        assert_eq!((cache.bytes, cache.map.len()), (100, 1), "an envelope larger than the cache is not cached");
    }

    #[test]
    fn an_event_cache_entry_leaves_after_its_last_delivery() {
        let mut cache = EventCache::with_limit(1_000);
        cache.insert(key("e1"), envelope(100), None, 7, 3);
        assert!(cache.take("ws", "e1", 8).is_none(), "another publish of the same id is not this entry");
        for taken in 1..=3 {
            assert!(cache.take("ws", "e1", 7).is_some(), "delivery {taken} of 3 finds the envelope");
        }
        assert!(cache.take("ws", "e1", 7).is_none());
        assert_eq!((cache.bytes, cache.map.len(), cache.order.len()), (0, 0, 0));
        cache.insert(key("e2"), envelope(100), None, 7, 0);
        assert!(cache.map.is_empty(), "an event without deliveries to send is not cached");
    }

    #[test]
    fn a_repeated_publish_keeps_its_event_cache_entry() {
        let mut cache = EventCache::with_limit(1_000);
        cache.insert(key("e1"), envelope(100), None, 7, 2);
        assert!(cache.take("ws", "e1", 7).is_some());
        cache.insert(key("e1"), envelope(100), None, 7, 2);
        assert!(cache.take("ws", "e1", 7).is_some(), "the second delivery finds it");
        assert!(cache.take("ws", "e1", 7).is_none(), "the repeat did not count its deliveries again");
        // The same id published again after the first was pruned is another event.
        cache.insert(key("e1"), envelope(100), None, 7, 1);
        cache.insert(key("e1"), envelope(50), None, 9, 1);
        assert_eq!((cache.bytes, cache.map.len(), cache.order.len()), (50, 1, 1));
        assert!(cache.take("ws", "e1", 7).is_none());
        assert_eq!(cache.take("ws", "e1", 9).map(|(b, _)| b.len()), Some(50));
        assert_eq!((cache.bytes, cache.map.len(), cache.order.len()), (0, 0, 0));
    }
}
