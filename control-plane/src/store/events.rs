//! Publishing: events and their delivery rows, written in one transaction, idempotent by id.

use std::collections::{HashMap, HashSet};

use sea_orm::{ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, QueryFilter, QuerySelect};

use super::insert::{self, CHUNK, insert_rows_then};
use super::{Store, StoreError, now_millis};
use crate::db::entity::delivery::{self, status};
use crate::db::entity::{event, webhook};
use herald_shared::{catalog, ids};

/// A validated event to publish.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub id: String,
    pub event_type: String,
    /// RFC 3339 UTC, as it will be delivered.
    pub timestamp: String,
    pub timestamp_supplied: bool,
    /// A JSON object, byte for byte as given.
    pub data: String,
    /// The `traceparent` of the publish call (see `herald_shared::telemetry`).
    pub trace_context: Option<String>,
}

/// The PostgreSQL notification channel on which replicas tell each other that deliveries were
/// queued.
pub const WAKE_CHANNEL: &str = "herald_wake";

/// The channel on which replicas tell each other which deliveries changed (`<replica> <id>,<id>…`),
/// for `WatchDeliveries` on any replica.
pub const CHANGES_CHANNEL: &str = "herald_changes";

/// Where an event stands, derived from its deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventStatus {
    Pending,
    Delivered,
    Failed,
}

/// A stored event and the summaries of its deliveries.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub event: event::Model,
    pub deliveries: Vec<DeliverySummary>,
}

/// One delivery of an event, in brief.
#[derive(Debug, Clone)]
pub struct DeliverySummary {
    pub id: String,
    pub webhook_id: String,
    pub status: i16,
    pub attempt_count: i32,
}

impl StoredEvent {
    /// Pending while any delivery is open, else failed if any failed, else delivered.
    pub fn status(&self) -> EventStatus {
        if self.deliveries.iter().any(|d| status::OPEN.contains(&d.status)) {
            EventStatus::Pending
        } else if self.deliveries.iter().any(|d| d.status == status::FAILED) {
            EventStatus::Failed
        } else {
            EventStatus::Delivered
        }
    }
}

/// Compares two JSON values as data: numbers by value (`150.00` equals `150`), objects regardless
/// of key order.
pub fn json_equal(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value as V;
    match (a, b) {
        (V::Number(x), V::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => match (x.as_u64(), y.as_u64()) {
                (Some(x), Some(y)) => x == y,
                _ => x.as_f64() == y.as_f64(),
            },
        },
        (V::Array(x), V::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_equal(x, y)),
        (V::Object(x), V::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_equal(v, w)))
        }
        _ => a == b,
    }
}

/// The field that names event `index` of a call: `event.id` for a single publish,
/// `events[i].id` in a batch.
fn id_field(batch: bool, index: usize) -> String {
    if batch { format!("events[{index}].id") } else { "event.id".to_owned() }
}

/// An active webhook's subscription, as publishing needs it.
pub(crate) struct Subscriber {
    pub id: String,
    pub zone: String,
    pub events: Vec<String>,
    /// What leasing its deliveries at publish needs, read with the subscription.
    pub terms: LeaseTerms,
}

/// A webhook's settings that a lease taken at publish depends on, as the publish's transaction
/// reads them (never from a cache that a change may not have reached yet).
#[derive(Debug, Clone, Copy)]
pub struct LeaseTerms {
    pub timeout_ms: Option<i64>,
    /// It has `max_in_flight` or a rate limit: its deliveries are claimed, where those are counted.
    pub limited: bool,
}

/// The workspace's active webhooks. On PostgreSQL their rows stay share-locked until the publish
/// commits, so a pause, zone change or delete committing meanwhile waits for it and then also
/// parks, moves or cancels the deliveries it made (publishes commit beside other writers there).
pub(crate) async fn subscribers(txn: &DatabaseTransaction, workspace: &str) -> Result<Vec<Subscriber>, StoreError> {
    let mut q = webhook::Entity::find();
    if txn.get_database_backend() == sea_orm::DbBackend::Postgres {
        q = q.lock_shared();
    }
    type Row = (String, String, String, Option<i64>, Option<i64>, Option<i64>);
    let rows: Vec<Row> = q
        .select_only()
        .column(webhook::Column::Id)
        .column(webhook::Column::Zone)
        .column(webhook::Column::Events)
        .column(webhook::Column::TimeoutMs)
        .column(webhook::Column::MaxInFlight)
        .column(webhook::Column::RateLimitPerSecond)
        .filter(webhook::Column::WorkspaceId.eq(workspace))
        .filter(webhook::Column::Active.eq(true))
        .filter(webhook::Column::DeletedAt.is_null())
        .into_tuple()
        .all(txn)
        .await?;
    rows.into_iter()
        .map(|(id, zone, events, timeout_ms, max_in_flight, rate)| {
            let events = serde_json::from_str(&events).map_err(|e| StoreError::Internal(e.to_string()))?;
            let terms = LeaseTerms { timeout_ms, limited: max_in_flight.is_some() || rate.is_some() };
            Ok(Subscriber { id, zone, events, terms })
        })
        .collect()
}

/// What a new pending delivery row is made of.
pub(crate) struct NewDelivery<'a> {
    pub workspace: &'a str,
    pub event_id: &'a str,
    pub event_type: &'a str,
    pub webhook_id: &'a str,
    pub zone: &'a str,
    pub test: bool,
    pub created_at: i64,
    /// When attempt 1 is due.
    pub due: i64,
}

impl NewDelivery<'_> {
    pub(crate) fn model(&self) -> delivery::Model {
        delivery::Model {
            id: ids::new_id(ids::DELIVERY),
            workspace_id: self.workspace.to_owned(),
            event_id: self.event_id.to_owned(),
            webhook_id: self.webhook_id.to_owned(),
            event_type: self.event_type.to_owned(),
            zone: self.zone.to_owned(),
            status: status::PENDING,
            test: self.test,
            attempt_count: 0,
            lost_leases: 0,
            next_attempt_at: self.due,
            lease_id: None,
            lease_agent: None,
            lease_expires_at: None,
            last_status: None,
            last_error: None,
            created_at: self.created_at,
            updated_at: self.created_at,
            manual_from: None,
        }
    }

    pub(crate) fn row(&self) -> delivery::ActiveModel {
        self.model().into()
    }
}

/// One caller's publish, waiting to be written with others.
pub(crate) struct PublishRequest {
    call: Call,
    reply: tokio::sync::oneshot::Sender<Result<Vec<StoredEvent>, StoreError>>,
    /// Set to the loop that takes it into a write.
    taken: Taken,
}

/// What one publish call asks to store.
struct Call {
    workspace: String,
    events: Vec<NewEvent>,
    /// `PublishEvents` (errors name `events[i].id`) rather than `PublishEvent` (`event.id`).
    batch: bool,
    first_delay_ms: i64,
}

impl Call {
    /// The event data it carries.
    fn bytes(&self) -> usize {
        self.events.iter().map(|e| e.data.len()).sum()
    }
}

/// Publish calls merged into one write at most, and their events at most.
const MERGE_CALLS: usize = 256;
const MERGE_EVENTS: usize = 8192;
/// Deliveries a merged write is meant to hold at most, judged by the deliveries per event of each
/// workspace's last write in the loop ([`FanOut`]): a workspace whose events go to a thousand webhooks fills a write with a
/// few calls, not [`MERGE_EVENTS`] events (eight million rows, minutes of work and gigabytes).
/// A write takes at least one call whatever it holds.
const MERGE_DELIVERIES: f64 = 65_536.0;
/// Event data a merged write holds at most (a call may hold 16 MiB): each write copies its
/// events' data into rows and statements, and 8,192 events of 256 KiB would be 2 GiB a copy.
const MERGE_BYTES: usize = 64 << 20;

/// What a merged write holds so far.
#[derive(Default)]
struct Merge {
    calls: usize,
    events: usize,
    bytes: usize,
    deliveries: f64,
}

impl Merge {
    /// Whether `call` joins the write: the first call always does, a later one while the write
    /// stays within [`MERGE_CALLS`], [`MERGE_EVENTS`], [`MERGE_BYTES`] and, as `fan_out`
    /// judges it, [`MERGE_DELIVERIES`].
    fn admits(&self, call: &Call, fan_out: &FanOut) -> bool {
        self.calls == 0
            || (self.calls < MERGE_CALLS
                && self.events + call.events.len() <= MERGE_EVENTS
                && self.bytes + call.bytes() <= MERGE_BYTES
                && self.deliveries + fan_out.deliveries(call) <= MERGE_DELIVERIES)
    }

    fn add(&mut self, call: &Call, fan_out: &FanOut) {
        self.calls += 1;
        self.events += call.events.len();
        self.bytes += call.bytes();
        self.deliveries += fan_out.deliveries(call);
    }
}

/// Deliveries per event of each workspace's last write in one publish loop, learned since the
/// last webhook change (a workspace that adds a thousand webhooks must not be judged by the one
/// it had: its next call is written alone, as a workspace's first).
#[derive(Default)]
struct FanOut(HashMap<String, f64>, u64);

impl FanOut {
    /// Forgets every workspace's fan-out if webhooks changed since it learned them.
    fn refresh(&mut self, generation: u64) {
        if self.1 != generation {
            self.0.clear();
            self.1 = generation;
        }
    }

    /// The deliveries `call` is expected to make. A workspace not written yet counts as filling
    /// a write, so that its first call is written alone.
    fn deliveries(&self, call: &Call) -> f64 {
        let per_event = self.0.get(&call.workspace).copied().unwrap_or(MERGE_DELIVERIES);
        call.events.len() as f64 * per_event
    }

    /// Learns from a write's answers.
    fn learn<'a>(&mut self, stored: impl Iterator<Item = &'a StoredEvent>) {
        let mut seen: HashMap<&str, (usize, usize)> = HashMap::new();
        for s in stored {
            let (events, deliveries) = seen.entry(&s.event.workspace_id).or_default();
            *events += 1;
            *deliveries += s.deliveries.len();
        }
        for (workspace, (events, deliveries)) in seen {
            self.0.insert(workspace.to_owned(), deliveries as f64 / events as f64);
        }
    }
}

/// When the publish path last moved: a statement of a publish write finished, or the control
/// plane finished a step of building one. A publish is answered `UNAVAILABLE` when the path has
/// not moved for the publish timeout (`--publish-timeout`), so a database that stops answering is
/// a quick error, while a large write that keeps moving (a call whose events go to a thousand
/// webhooks) is waited for. The writer's own bound (`--write-timeout`, 30 s) is on progress too: the
/// same marks keep it from abandoning the write.
///
/// Each publish loop (a lane) keeps its own mark: a call taken into a write is judged by its own
/// loop, so that another loop that moves does not keep it waiting on a connection that stopped;
/// a call still queued by any loop that moves.
pub struct Progress {
    /// The last move of each lane, and of any.
    lanes: Vec<super::writer::Moves>,
    any: super::writer::Moves,
}

/// Which publish loop took a call: [`QUEUED`] until one does.
pub(crate) type Taken = std::sync::Arc<std::sync::atomic::AtomicUsize>;
const QUEUED: usize = usize::MAX;

impl Progress {
    pub fn new(lanes: usize) -> Progress {
        Progress { lanes: (0..lanes).map(|_| super::writer::Moves::new()).collect(), any: super::writer::Moves::new() }
    }

    /// Publish loop `lane` moved now.
    pub fn mark(&self, lane: usize) {
        self.lanes[lane].mark();
        self.any.mark();
    }

    /// Loop `lane` takes the calls of `taken` into a write: they are judged by its moves from
    /// now on, the first of which is taking them (it may have been idle for a long time).
    fn take<'a>(&self, lane: usize, taken: impl Iterator<Item = &'a Taken>) {
        self.lanes[lane].mark();
        for t in taken {
            t.store(lane, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// When what `taken` names last moved: its loop, or any loop while it is queued.
    fn last(&self, taken: &Taken) -> std::time::Instant {
        self.lanes.get(taken.load(std::sync::atomic::Ordering::SeqCst)).unwrap_or(&self.any).last()
    }

    /// Runs `call`, a publish begun now, until it answers, or until what `taken` names has not
    /// moved for `timeout` since the later of the call's start and its last move: then
    /// `Stalled`.
    pub(crate) async fn bound<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
        taken: &Taken,
        timeout: std::time::Duration,
    ) -> Result<T, StoreError> {
        let started = std::time::Instant::now();
        let deadline = || started.max(self.last(taken)).checked_add(timeout);
        super::writer::until(call, deadline).await.unwrap_or_else(|| {
            Err(StoreError::Stalled(format!(
                "the database made no progress on this publish for {}; the event may or may not be stored: publish it again with the same id",
                humantime::format_duration(timeout)
            )))
        })
    }
}

/// Publish calls waiting to be merged, shared by the publish loops.
pub(crate) type PublishQueue = std::sync::Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<PublishRequest>>>;

/// The event ids that publish loops are writing now, when there are several loops, each with the
/// loop writing it: a call naming an id that another loop is writing waits for that write to
/// commit, so that calls repeating an id behave as if one after another (the later one finds the
/// stored event) rather than conflict. It waits set aside, not in the way: the loop writes the
/// other calls meanwhile (a publish made again while its first attempt's write is stuck must not
/// hold up every other publish).
#[derive(Default)]
pub(crate) struct Writing {
    held: std::sync::Mutex<Held>,
    done: tokio::sync::Notify,
}

#[derive(Default)]
struct Held {
    /// By workspace, then id: the loop writing it.
    ids: HashMap<String, HashMap<String, usize>>,
    /// Calls set aside: the loop whose write each waits for, the loop holding it, its `Taken`.
    aside: Vec<(usize, usize, Taken)>,
}

impl Writing {
    /// Claims for loop `lane` the ids of each of `calls` that names no id another loop is writing,
    /// and returns those calls and their ids. The others go to `aside`, each judged by the loop
    /// whose write it waits for until that write ends, then by `lane` again.
    fn claim_free(
        &self,
        calls: Vec<PublishRequest>,
        lane: usize,
        aside: &mut Vec<PublishRequest>,
    ) -> (Vec<PublishRequest>, Vec<(String, String)>) {
        let mut held = self.held.lock().expect("publish ids lock");
        let (mut mine, mut keys) = (Vec::new(), Vec::new());
        for r in calls {
            let workspace = &r.call.workspace;
            let ids = held.ids.get(workspace);
            let holder = r.call.events.iter().find_map(|e| ids?.get(&e.id).copied().filter(|&l| l != lane));
            match holder {
                Some(other) => {
                    r.taken.store(other, std::sync::atomic::Ordering::SeqCst);
                    held.aside.push((other, lane, r.taken.clone()));
                    aside.push(r);
                }
                None => {
                    let ids = held.ids.entry(workspace.clone()).or_default();
                    for e in &r.call.events {
                        ids.insert(e.id.clone(), lane);
                        keys.push((workspace.clone(), e.id.clone()));
                    }
                    mine.push(r);
                }
            }
        }
        (mine, keys)
    }

    /// Loop `lane` takes back the calls it set aside, to claim them again.
    fn retry(&self, lane: usize) {
        self.held.lock().expect("publish ids lock").aside.retain(|&(_, waiter, _)| waiter != lane);
    }

    /// Loop `lane`'s write of `keys` ended: the calls waiting for it are judged by the loops
    /// holding them again (one busy with a long write of its own must not let them be refused
    /// for this loop's idleness), and those loops are woken.
    fn release(&self, keys: &[(String, String)], lane: usize) {
        let mut held = self.held.lock().expect("publish ids lock");
        for (workspace, id) in keys {
            if let Some(ids) = held.ids.get_mut(workspace) {
                ids.remove(id);
                if ids.is_empty() {
                    held.ids.remove(workspace);
                }
            }
        }
        held.aside.retain(|(holder, waiter, taken)| {
            if *holder == lane {
                taken.store(*waiter, std::sync::atomic::Ordering::SeqCst);
            }
            *holder != lane
        });
        drop(held);
        self.done.notify_waiters();
    }
}

/// Merges concurrent publish calls: every call waiting when this loop's previous write finished
/// goes into one write operation (one existence check, one subscriber read per workspace, one
/// multi-row insert per table), which the writer then commits with whatever else is waiting. Each
/// call still gets its own answer: a call whose event conflicts with a stored one fails alone.
///
/// On PostgreSQL several loops, each with a writer of its own, take turns at the queue, so that
/// one merged write is built and committed while another waits for its fsync. A call naming an
/// id that another loop is writing is set aside until that write ends (`Writing`), so two loops
/// never store one new id at once; only another replica can (`CONCURRENT_ID`).
pub(crate) async fn publish_loop(writer: super::writer::Writer, shared: Shared) {
    let Shared { queue, writing, peers, sink, progress, lane, webhooks } = shared;
    let mut carried: Option<PublishRequest> = None;
    // Calls naming an id another loop is writing (`Writing`): tried again first, each time.
    let mut aside: Vec<PublishRequest> = Vec::new();
    let mut fan_out = FanOut::default();
    loop {
        // Registered before the calls set aside are tried, so that a write ending in between
        // still wakes this loop when they are all it has.
        let ended = writing.as_ref().map(|w| w.done.notified());
        let mut waiting: Vec<PublishRequest>;
        let mut keys: Vec<(String, String)> = Vec::new();
        let generation;
        {
            // A call carried from the last write, or set aside, is tried now, with whatever else
            // is queued if the queue is free: the other loop may be holding it while it waits for
            // a call, and these must not wait for new traffic. One set aside whose caller has gone
            // (refused meanwhile) is dropped: it was told the outcome is unknown.
            let mut held: Vec<PublishRequest> = carried.take().into_iter().collect();
            if let Some(writing) = writing.as_ref().filter(|_| !aside.is_empty()) {
                writing.retry(lane);
                aside.retain(|r| !r.reply.is_closed());
                held.append(&mut aside);
            }
            let mut rx = if held.is_empty() {
                let mut rx = queue.lock().await;
                match rx.recv().await {
                    Some(r) => held.push(r),
                    None => return,
                }
                Some(rx)
            } else {
                queue.try_lock().ok()
            };
            // Fan-outs learned before a webhook change are forgotten; what this write learns
            // counts only if no change came while it was merged and written.
            generation = webhooks.load(std::sync::atomic::Ordering::SeqCst);
            fan_out.refresh(generation);
            // Only the calls this write takes count towards its bounds.
            let claim = |calls: Vec<PublishRequest>, keys: &mut Vec<_>, aside: &mut Vec<_>| match &writing {
                Some(writing) => {
                    let (mine, claimed) = writing.claim_free(calls, lane, aside);
                    keys.extend(claimed);
                    mine
                }
                None => calls,
            };
            waiting = claim(held, &mut keys, &mut aside);
            let mut merge = Merge::default();
            for r in &waiting {
                merge.add(&r.call, &fan_out);
            }
            let mut fresh = Vec::new();
            while let Some(r) = rx.as_mut().and_then(|rx| rx.try_recv().ok()) {
                if !merge.admits(&r.call, &fan_out) {
                    // This loop's from now: judged by its moves, not by another loop's.
                    progress.take(lane, std::iter::once(&r.taken));
                    carried = Some(r);
                    break;
                }
                merge.add(&r.call, &fan_out);
                fresh.push(r);
            }
            waiting.extend(claim(fresh, &mut keys, &mut aside));
            drop(rx);
        }
        if waiting.is_empty() {
            // Every call waits for another loop's write: wait for a write to end, taking the
            // next new call meanwhile, unless one was carried (it is tried at once).
            let Some(ended) = ended.filter(|_| carried.is_none()) else { continue };
            tokio::select! {
                _ = ended => {}
                r = async { queue.lock().await.recv().await } => match r {
                    Some(r) => carried = Some(r),
                    None => return,
                },
            }
            continue;
        }
        // The calls are this loop's now, and judged by its moves from here.
        progress.take(lane, waiting.iter().map(|r| &r.taken));
        let (calls, replies): (Vec<Call>, Vec<_>) = waiting.into_iter().map(|r| (r.call, r.reply)).unzip();
        let write = Write {
            peers: peers.clone(),
            sink: sink.get().cloned(),
            leased: std::sync::Arc::default(),
            queued: std::sync::Arc::default(),
            progress: progress.clone(),
            lane,
            writer_moves: writer.moves(),
        };
        let (leased, queued, sink) = (write.leased.clone(), write.queued.clone(), write.sink.clone());
        let answer = writer
            .write(move |txn| {
                Box::pin(async move {
                    // On PostgreSQL the insert itself finds stored ids; only a write that meets
                    // one (a publish retried) checks first, on a second pass.
                    if txn.get_database_backend() == sea_orm::DbBackend::Postgres
                        && let Some(answers) = publish_many(txn, &calls, &write, Check::OnInsert).await?
                    {
                        return Ok(answers);
                    }
                    publish_many(txn, &calls, &write, Check::First)
                        .await?
                        .ok_or_else(|| StoreError::Internal("a checked publish asked to be checked".into()))
                })
            })
            .await;
        // Only what the database answered is progress: a write that failed at once (a refused
        // connection) must not keep the calls waiting elsewhere from being answered.
        if answer.is_ok() {
            progress.mark(lane);
        }
        if let Some(writing) = &writing {
            writing.release(&keys, lane);
        }
        if let Ok(each) = &answer
            && webhooks.load(std::sync::atomic::Ordering::SeqCst) == generation
        {
            fan_out.learn(each.iter().filter_map(|r| r.as_ref().ok()).flatten());
        }
        let leased = std::mem::take(&mut *leased.lock().expect("leased lock"));
        let queued = queued.load(std::sync::atomic::Ordering::Relaxed);
        // Handing the write to the dispatcher (its envelopes cached, its leases sent) and
        // answering its callers happen beside the next write rather than before it: on SQLite
        // this loop is the only one, and the writer would wait for it (docs/BENCHMARKS.md item 43).
        tokio::spawn(async move { finish(answer, replies, sink, leased, queued) });
    }
}

/// Tells the dispatcher what a merged write committed (or that it failed), then answers each of
/// its calls: the dispatcher has the envelopes before any caller learns the events are stored.
fn finish(
    answer: Result<Vec<Result<Vec<StoredEvent>, StoreError>>, StoreError>,
    replies: Vec<tokio::sync::oneshot::Sender<Result<Vec<StoredEvent>, StoreError>>>,
    sink: Option<std::sync::Arc<dyn PublishSink>>,
    leased: Vec<(u64, super::queue::Claimed)>,
    queued: bool,
) {
    match answer {
        Ok(each) => {
            if let Some(sink) = &sink {
                let stored: Vec<&StoredEvent> = each.iter().filter_map(|r| r.as_ref().ok()).flatten().collect();
                sink.committed(&stored, leased, queued);
            }
            for (reply, result) in replies.into_iter().zip(each) {
                let _ = reply.send(result);
            }
        }
        Err(e) => {
            if let Some(sink) = &sink {
                sink.abandoned(leased);
            }
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// What every publish loop shares: the queue of calls, the ids being written, the replicas, and
/// the dispatcher once it runs.
pub(crate) struct Shared {
    pub queue: PublishQueue,
    pub writing: Option<std::sync::Arc<Writing>>,
    pub peers: std::sync::Arc<super::Peers>,
    pub sink: std::sync::Arc<std::sync::OnceLock<std::sync::Arc<dyn PublishSink>>>,
    pub progress: std::sync::Arc<Progress>,
    /// This loop's lane in `progress`.
    pub lane: usize,
    /// Webhook changes so far (`Store::webhooks_changed`).
    pub webhooks: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Where publishing hands its deliveries: the dispatcher.
///
/// A delivery due at once, in a zone whose queue this replica has drained, is leased to one of
/// the zone's agents in the publish's own transaction (`lease`): it is inserted in flight, and
/// sent as soon as the write commits (`committed`), without a claim transaction, a wake-up of
/// the dispatch loop or a read of its row. The lease is the same as a claim's: if the control
/// plane stops before sending, it expires and the delivery is sent again (at least once). Any
/// delivery not leased (no agent with room, a webhook with `max_in_flight` or a rate limit,
/// work already waiting in the zone) is queued as before and the dispatcher woken.
pub trait PublishSink: Send + Sync {
    /// Leases what it may of `rows` (new, pending) to agents, in place; returns each lease taken
    /// with the agent session it is for.
    fn lease(
        &self,
        rows: &mut [delivery::Model],
        terms: &HashMap<&str, LeaseTerms>,
        now: i64,
    ) -> Vec<(u64, super::queue::Claimed)>;
    /// The write committed: every stored event (for the dispatcher's envelope cache), the leases
    /// it took, and whether it also queued deliveries for the dispatch loop.
    fn committed(&self, stored: &[&StoredEvent], leased: Vec<(u64, super::queue::Claimed)>, queued: bool);
    /// The write failed (or its outcome is unknown): what `lease` took is given back. Rows that
    /// did commit after all keep their leases until they expire.
    fn abandoned(&self, leased: Vec<(u64, super::queue::Claimed)>);
    /// Whether anyone may be watching deliveries change (`WatchDeliveries` here, or on another
    /// replica): what changes many rows at once reports their ids only then.
    fn watched(&self) -> bool;
}

/// One merged write's context: the replicas to wake, the dispatcher, and what it leased and
/// queued (read after the write, whatever its outcome).
struct Write {
    peers: std::sync::Arc<super::Peers>,
    sink: Option<std::sync::Arc<dyn PublishSink>>,
    leased: std::sync::Arc<std::sync::Mutex<Vec<(u64, super::queue::Claimed)>>>,
    queued: std::sync::Arc<std::sync::atomic::AtomicBool>,
    progress: std::sync::Arc<Progress>,
    lane: usize,
    /// The writer's marks, which bound the batch this write is in.
    writer_moves: super::writer::Moves,
}

impl Write {
    /// The write moved: for its callers (`Progress`) and for its writer (`--write-timeout`).
    fn moved(&self) {
        self.progress.mark(self.lane);
        self.writer_moves.mark();
    }
}

/// Why merged publish calls fail when another replica stored one of their ids meanwhile.
const CONCURRENT_ID: &str =
    "an event with one of these ids was stored concurrently by another replica; publish again with the same ids";

/// How [`publish_many`] learns which ids are stored already.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Reads them before writing (a probe of the primary key per id).
    First,
    /// Assumes none is, and lets the insert find out (`ON CONFLICT DO NOTHING`, PostgreSQL):
    /// the probe is a second descent of the index the insert descends anyway. If any id is
    /// stored, the write undoes its inserts and asks to be run again with [`Check::First`].
    OnInsert,
}

/// Writes merged publish calls in `txn`: each call's answer, or the error that fails them all.
/// `None` when `check` is [`Check::OnInsert`] and an id was stored already: nothing is written,
/// and the calls are to be written again with [`Check::First`].
async fn publish_many(
    txn: &DatabaseTransaction,
    calls: &[Call],
    write: &Write,
    check: Check,
) -> Result<Option<Vec<Result<Vec<StoredEvent>, StoreError>>>, StoreError> {
    let now = now_millis();
    // What is stored already, per workspace, for every id of every call.
    let mut existing: HashMap<String, HashMap<String, event::Model>> = HashMap::new();
    if check == Check::First {
        let mut ids_by_workspace: HashMap<&str, Vec<String>> = HashMap::new();
        for c in calls {
            ids_by_workspace.entry(&c.workspace).or_default().extend(c.events.iter().map(|e| e.id.clone()));
        }
        for (workspace, ids) in ids_by_workspace {
            existing.insert(workspace.to_owned(), existing_events(txn, workspace, ids).await?);
            write.moved();
        }
    }
    let mut subs: HashMap<String, Vec<Subscriber>> = HashMap::new();
    let mut answers: Vec<Result<Vec<StoredEvent>, StoreError>> = Vec::with_capacity(calls.len());
    // Events new in this write, by workspace and id: (call, position in its answer), so that a
    // later call repeating one is answered idempotently.
    let mut fresh: HashMap<String, HashMap<String, (usize, usize)>> = HashMap::new();
    // (call, position in its answer) of the events this write stores.
    let mut new_events: Vec<(usize, usize)> = Vec::new();
    let mut new_deliveries: Vec<delivery::Model> = Vec::new();
    // (call, position in its answer) of events that were stored before this write.
    let mut reused: Vec<(usize, usize)> = Vec::new();
    for (call, Call { workspace, events, batch, first_delay_ms }) in calls.iter().enumerate() {
        let (batch, first_delay_ms) = (*batch, *first_delay_ms);
        let mut out = Vec::with_capacity(events.len());
        let (mut staged_events, mut staged_deliveries, mut staged_reused) = (Vec::new(), Vec::new(), Vec::new());
        let mut conflict = None;
        for (index, e) in events.iter().enumerate() {
            let before = existing.get(workspace).and_then(|m| m.get(&e.id));
            let earlier = fresh.get(workspace).and_then(|m| m.get(&e.id)).and_then(|&(c, p)| match &answers[c] {
                Ok(out) => out.get(p),
                Err(_) => None,
            });
            if let Some(stored) = before.or(earlier.map(|f| &f.event)) {
                let parse = |text: &str| serde_json::from_str::<serde_json::Value>(text);
                let same_data = parse(&stored.data)
                    .and_then(|stored| parse(&e.data).map(|given| json_equal(&stored, &given)))
                    .unwrap_or(false);
                let same_time = !e.timestamp_supplied || e.timestamp == stored.timestamp;
                if stored.event_type != e.event_type || !same_data || !same_time || stored.test {
                    conflict = Some(StoreError::AlreadyExists {
                        field: id_field(batch, index),
                        message: format!("event {} already exists with a different type, data or timestamp", e.id),
                    });
                    break;
                }
                match earlier {
                    Some(f) if before.is_none() => out.push(f.clone()),
                    _ => {
                        staged_reused.push(out.len());
                        out.push(StoredEvent { event: stored.clone(), deliveries: Vec::new() });
                    }
                }
                continue;
            }
            let subs = match subs.get(workspace) {
                Some(s) => s,
                None => {
                    let read = subscribers(txn, workspace).await?;
                    write.moved();
                    subs.entry(workspace.clone()).or_insert(read)
                }
            };
            let mut deliveries = Vec::new();
            for s in subs.iter().filter(|s| catalog::subscribes(&s.events, &e.event_type)) {
                let row = NewDelivery {
                    workspace,
                    event_id: &e.id,
                    event_type: &e.event_type,
                    webhook_id: &s.id,
                    zone: &s.zone,
                    test: false,
                    created_at: now,
                    due: now + first_delay_ms,
                }
                .model();
                deliveries.push(DeliverySummary {
                    id: row.id.clone(),
                    webhook_id: s.id.clone(),
                    status: status::PENDING,
                    attempt_count: 0,
                });
                staged_deliveries.push(row);
                if staged_deliveries.len() % 1024 == 0 {
                    write.moved();
                }
            }
            let model = event::Model {
                workspace_id: workspace.clone(),
                id: e.id.clone(),
                event_type: e.event_type.clone(),
                timestamp: e.timestamp.clone(),
                timestamp_supplied: e.timestamp_supplied,
                data: e.data.clone(),
                test: false,
                created_at: now,
                trace_context: e.trace_context.clone(),
            };
            staged_events.push(out.len());
            out.push(StoredEvent { event: model, deliveries });
        }
        if let Some(e) = conflict {
            // This call fails alone; nothing of it is written.
            answers.push(Err(e));
            continue;
        }
        let ids = fresh.entry(workspace.clone()).or_default();
        for (position, stored) in out.iter().enumerate() {
            ids.entry(stored.event.id.clone()).or_insert((call, position));
        }
        new_events.extend(staged_events.into_iter().map(|i| (call, i)));
        new_deliveries.append(&mut staged_deliveries);
        reused.extend(staged_reused.into_iter().map(|i| (call, i)));
        answers.push(Ok(out));
        write.moved();
    }
    let stored: Vec<&event::Model> =
        new_events.iter().filter_map(|&(call, i)| answers[call].as_ref().ok().map(|out| &out[i].event)).collect();
    let moved = || write.moved();
    if check == Check::OnInsert {
        if !insert_new_events(txn, &stored, &moved).await? {
            return Ok(None);
        }
    } else {
        // A unique violation here means another replica stored one of these ids in the meantime.
        // Every merged call fails, retryably: published again, each gets the idempotent answer.
        insert_rows_then::<event::Model, _>(txn, &stored, &moved).await.map_err(|e| match e {
            StoreError::AlreadyExists { .. } => StoreError::Unavailable(CONCURRENT_ID.to_owned()),
            other => other,
        })?;
    }
    // Deliveries this replica's agents can take now are leased as they are inserted.
    if let Some(sink) = &write.sink
        && !new_deliveries.is_empty()
    {
        let terms: HashMap<&str, LeaseTerms> = subs.values().flatten().map(|s| (s.id.as_str(), s.terms)).collect();
        let leased = sink.lease(&mut new_deliveries, &terms, now);
        if !leased.is_empty() {
            let ids: HashSet<&str> = leased.iter().map(|(_, c)| c.delivery.id.as_str()).collect();
            for out in answers.iter_mut().filter_map(|a| a.as_mut().ok()) {
                for d in out.iter_mut().flat_map(|e| e.deliveries.iter_mut()) {
                    if ids.contains(d.id.as_str()) {
                        d.status = status::IN_FLIGHT;
                    }
                }
            }
        }
        write.leased.lock().expect("leased lock").extend(leased);
    }
    let queued = new_deliveries.iter().any(|d| d.status == status::PENDING);
    insert_rows_then::<delivery::Model, _>(txn, &new_deliveries, &moved).await?;
    // Other replicas on this PostgreSQL wake to dispatch what is queued.
    if queued {
        write.queued.store(true, std::sync::atomic::Ordering::Relaxed);
        super::wake_others(txn, &write.peers).await?;
    }
    // Events stored before: their deliveries as they stand.
    let mut wanted: HashMap<String, Vec<String>> = HashMap::new();
    for &(call, i) in &reused {
        if let Ok(out) = &answers[call] {
            wanted.entry(out[i].event.workspace_id.clone()).or_default().push(out[i].event.id.clone());
        }
    }
    let mut summaries: HashMap<String, HashMap<String, Vec<DeliverySummary>>> = HashMap::new();
    for (workspace, ids) in wanted {
        let found = delivery_summaries(txn, &workspace, ids, &moved).await?;
        summaries.insert(workspace, found);
    }
    for (call, i) in reused {
        if let Ok(out) = &mut answers[call] {
            let e = &out[i].event;
            let found = summaries.get(&e.workspace_id).and_then(|m| m.get(&e.id)).cloned().unwrap_or_default();
            out[i].deliveries = found;
        }
    }
    Ok(Some(answers))
}

/// Inserts `rows` (PostgreSQL) with `ON CONFLICT DO NOTHING`, and says whether every one went
/// in. If one was stored already (by an earlier publish, or by another replica that committed
/// it meanwhile), those inserted are deleted again and nothing of the call is left: the caller
/// writes it again, checking first.
async fn insert_new_events(
    txn: &DatabaseTransaction,
    rows: &[&event::Model],
    moved: &(dyn Fn() + Sync),
) -> Result<bool, StoreError> {
    let backend = txn.get_database_backend();
    let mut inserted: Vec<(String, String)> = Vec::with_capacity(rows.len());
    let returning = " ON CONFLICT DO NOTHING RETURNING workspace_id, id";
    for statement in insert::statements::<event::Model, _>(backend, rows, returning) {
        for row in txn.query_all_raw(statement).await? {
            let get = |e: sea_orm::DbErr| StoreError::Internal(e.to_string());
            inserted.push((row.try_get_by_index(0).map_err(get)?, row.try_get_by_index(1).map_err(get)?));
        }
        moved();
    }
    if inserted.len() == rows.len() {
        return Ok(true);
    }
    let mut by_workspace: HashMap<String, Vec<String>> = HashMap::new();
    for (workspace, id) in inserted {
        by_workspace.entry(workspace).or_default().push(id);
    }
    for (workspace, ids) in by_workspace {
        for chunk in ids.chunks(CHUNK) {
            event::Entity::delete_many()
                .filter(event::Column::WorkspaceId.eq(&workspace))
                .filter(event::Column::Id.is_in(chunk.iter().cloned()))
                .exec(txn)
                .await?;
            moved();
        }
    }
    Ok(false)
}

impl Store {
    /// Publishes `events` for `workspace`, all or nothing, with one delivery row per matching
    /// active webhook. Existing ids with the same content are returned as stored; a different
    /// content is `AlreadyExists` naming the event's field. `first_delay_ms` is the retry
    /// schedule's delay before attempt 1. Concurrent calls are written together
    /// ([`publish_loop`]); each is acknowledged only once its rows are committed and synced.
    /// `Stalled` once the publish path has not moved for `timeout` ([`Progress`]).
    pub async fn publish(
        &self,
        workspace: &str,
        events: Vec<NewEvent>,
        batch: bool,
        first_delay_ms: i64,
        timeout: std::time::Duration,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let call = Call { workspace: workspace.to_owned(), events, batch, first_delay_ms };
        let taken: Taken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(QUEUED));
        let request = PublishRequest { call, reply, taken: taken.clone() };
        let call = async {
            self.publisher
                .send(request)
                .await
                .map_err(|_| StoreError::Unavailable("the publisher has stopped".into()))?;
            answer
                .await
                .map_err(|_| StoreError::Unavailable("the write was interrupted; its outcome is unknown".into()))?
        };
        self.publish_progress.bound(call, &taken, timeout).await
    }

    /// Reads an event of the workspace with its delivery summaries.
    pub async fn get_event(&self, workspace: &str, id: &str) -> Result<StoredEvent, StoreError> {
        let event = event::Entity::find_by_id((workspace.to_owned(), id.to_owned()))
            .one(&self.db)
            .await?
            .ok_or(StoreError::NotFound("event"))?;
        let mut summaries = delivery_summaries(&self.db, workspace, vec![id.to_owned()], &|| ()).await?;
        Ok(StoredEvent { deliveries: summaries.remove(id).unwrap_or_default(), event })
    }
}

async fn existing_events(
    db: &impl ConnectionTrait,
    workspace: &str,
    ids: Vec<String>,
) -> Result<HashMap<String, event::Model>, StoreError> {
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let rows = events_by_id(db, workspace, &ids).await?;
    Ok(rows.into_iter().map(|r| (r.id.clone(), r)).collect())
}

/// The stored events of `workspace` among `ids`, each found by the primary key
/// `(workspace_id, id)` and returned once however often `ids` names it.
///
/// On PostgreSQL the ids travel as one JSON array and each is looked up on its own, in a subquery
/// the planner may not flatten (`OFFSET 0`): one unique-index probe per id, whatever the
/// statistics say. With `id IN (…)` the plan followed the statistics, which lag a fast-growing
/// table: PostgreSQL read every event of the workspace by `workspace_id` and tested each against
/// the list, 15–25 ms per 1,000 ids at 100,000 events and growing with the table (while
/// publishing, and again while dispatching).
pub async fn events_by_id(
    db: &impl ConnectionTrait,
    workspace: &str,
    ids: &[&str],
) -> Result<Vec<event::Model>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    // Each id once: merged calls may repeat one.
    let mut seen = HashSet::with_capacity(ids.len());
    let ids: Vec<&str> = ids.iter().copied().filter(|id| seen.insert(*id)).collect();
    if db.get_database_backend() == sea_orm::DbBackend::Postgres {
        return Ok(event::Entity::find().from_raw_sql(postgres_events_by_id(workspace, &ids)).all(db).await?);
    }
    let mut found = Vec::new();
    for chunk in ids.chunks(CHUNK) {
        let mut chunk = chunk.to_vec();
        insert::pad_list(&mut chunk);
        let rows = event::Entity::find()
            .filter(event::Column::WorkspaceId.eq(workspace))
            .filter(event::Column::Id.is_in(chunk))
            .all(db)
            .await?;
        found.extend(rows);
    }
    Ok(found)
}

/// The PostgreSQL statement of [`events_by_id`].
pub fn postgres_events_by_id(workspace: &str, ids: &[&str]) -> sea_orm::Statement {
    // A JSON array of strings cannot fail to serialize.
    let list = serde_json::to_string(ids).unwrap_or_default();
    sea_orm::Statement::from_sql_and_values(
        sea_orm::DbBackend::Postgres,
        "SELECT e.* FROM json_array_elements_text($2::json) AS k(id), \
         LATERAL (SELECT * FROM events x WHERE x.workspace_id = $1 AND x.id = k.id OFFSET 0) e",
        [workspace.into(), list.into()],
    )
}

async fn delivery_summaries(
    db: &impl ConnectionTrait,
    workspace: &str,
    event_ids: Vec<String>,
    moved: &(dyn Fn() + Sync),
) -> Result<HashMap<String, Vec<DeliverySummary>>, StoreError> {
    let mut out: HashMap<String, Vec<DeliverySummary>> = HashMap::new();
    for chunk in event_ids.chunks(CHUNK) {
        let rows: Vec<(String, String, String, i16, i32)> = delivery::Entity::find()
            .select_only()
            .column(delivery::Column::EventId)
            .column(delivery::Column::Id)
            .column(delivery::Column::WebhookId)
            .column(delivery::Column::Status)
            .column(delivery::Column::AttemptCount)
            .filter(delivery::Column::WorkspaceId.eq(workspace))
            .filter(delivery::Column::EventId.is_in(chunk.to_vec()))
            .into_tuple()
            .all(db)
            .await?;
        for (event_id, id, webhook_id, status, attempt_count) in rows {
            out.entry(event_id).or_default().push(DeliverySummary { id, webhook_id, status, attempt_count });
        }
        moved();
    }
    for list in out.values_mut() {
        list.sort_by(|a, b| a.id.cmp(&b.id));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::json_equal;
    use serde_json::json;

    #[test]
    fn json_equality_is_by_value() {
        let a: serde_json::Value = serde_json::from_str(r#"{"a": 150.00, "b": [1, "x"]}"#).unwrap();
        assert!(json_equal(&a, &json!({"b": [1.0, "x"], "a": 150})));
        assert!(!json_equal(&a, &json!({"b": [1, "x"], "a": 150.01})));
        assert!(!json_equal(&a, &json!({"b": [1, "x"]})));
        assert!(!json_equal(&json!({"a": null}), &json!({"a": false})));
    }

    fn call(workspace: &str, events: usize, data: usize) -> super::Call {
        let event = |i: usize| super::NewEvent {
            id: format!("e{i}"),
            event_type: "incident.created".to_owned(),
            timestamp: "2026-01-01T00:00:00Z".to_owned(),
            timestamp_supplied: false,
            data: "x".repeat(data),
            trace_context: None,
        };
        super::Call {
            workspace: workspace.to_owned(),
            events: (0..events).map(event).collect(),
            batch: true,
            first_delay_ms: 0,
        }
    }

    /// How many of `calls` one merged write takes, as `publish_loop` takes them.
    fn merged(calls: &[super::Call], fan_out: &super::FanOut) -> usize {
        let mut merge = super::Merge::default();
        calls
            .iter()
            .take_while(|c| {
                merge.admits(c, fan_out) && {
                    merge.add(c, fan_out);
                    true
                }
            })
            .count()
    }

    #[test]
    fn merged_writes_are_bounded_by_events_bytes_and_expected_deliveries() {
        let mut fan_out = super::FanOut::default();
        // A workspace not written yet: its first call alone, however small.
        assert_eq!(merged(&[call("ws", 1, 10), call("ws", 1, 10)], &fan_out), 1);
        // One delivery per event: 8,192 events.
        fan_out.0.insert("ws".to_owned(), 1.0);
        let thousands: Vec<super::Call> = (0..10).map(|_| call("ws", 1000, 10)).collect();
        assert_eq!(merged(&thousands, &fan_out), 8);
        let singles: Vec<super::Call> = (0..300).map(|_| call("ws", 1, 10)).collect();
        assert_eq!(merged(&singles, &fan_out), super::MERGE_CALLS);
        // A thousand webhooks: about 65,536 deliveries, so one call of 50 events, not two.
        fan_out.0.insert("wide".to_owned(), 1000.0);
        assert_eq!(merged(&[call("wide", 50, 10), call("wide", 50, 10)], &fan_out), 1);
        assert_eq!(merged(&[call("ws", 50, 10), call("wide", 60, 10), call("ws", 1, 10)], &fan_out), 3);
        assert_eq!(merged(&[call("ws", 50, 10), call("wide", 60, 10), call("wide", 10, 10)], &fan_out), 2);
        // The first call goes whatever it holds.
        assert_eq!(merged(&[call("wide", 1000, 10), call("ws", 1, 10)], &fan_out), 1);
        // 64 MiB of event data: one call of 40 MiB, then the next of 40 MiB waits.
        let big = || call("ws", 40, 1 << 20);
        assert_eq!(merged(&[big(), big()], &fan_out), 1);
        assert_eq!(merged(&[big(), call("ws", 20, 1 << 20)], &fan_out), 2);
    }

    /// A call that never answers, as a stalled write's caller sees it.
    async fn never() -> Result<(), super::StoreError> {
        std::future::pending().await
    }

    fn queued() -> super::Taken {
        std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(super::QUEUED))
    }

    /// Marks `lane` every 5 ms until aborted.
    fn moving(progress: &std::sync::Arc<super::Progress>, lane: usize) -> tokio::task::JoinHandle<()> {
        let progress = progress.clone();
        tokio::spawn(async move {
            loop {
                progress.mark(lane);
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
    }

    #[tokio::test]
    async fn a_call_is_bounded_by_its_own_loops_moves() {
        // Long beside the mover's 5 ms, so a busy machine does not starve it past the bound.
        let timeout = std::time::Duration::from_millis(500);
        let enough = std::time::Duration::from_secs(20);
        let progress = std::sync::Arc::new(super::Progress::new(2));
        // Nothing moves: refused after the timeout.
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(enough, progress.bound(never(), &queued(), timeout)).await;
        assert!(matches!(answer, Ok(Err(super::StoreError::Stalled(_)))), "{answer:?}");
        assert!(started.elapsed() >= timeout);
        // Queued while loop 1 moves: waited for, and answered when the call answers.
        let mover = moving(&progress, 1);
        let slow = async {
            tokio::time::sleep(timeout * 3).await;
            Ok(())
        };
        assert!(matches!(progress.bound(slow, &queued(), timeout).await, Ok(())));
        // Taken by loop 0, which does not move: loop 1's moves do not keep it waiting.
        let taken = queued();
        progress.take(0, [&taken].into_iter());
        let answer = tokio::time::timeout(enough, progress.bound(never(), &taken, timeout)).await;
        assert!(matches!(answer, Ok(Err(super::StoreError::Stalled(_)))), "{answer:?}");
        // Taken by loop 1, which moves: waited for.
        progress.take(1, [&taken].into_iter());
        let slow = async {
            tokio::time::sleep(timeout * 3).await;
            Ok(())
        };
        assert!(matches!(progress.bound(slow, &taken, timeout).await, Ok(())));
        mover.abort();
        // A timeout no instant can hold bounds nothing (and does not overflow).
        let answer = progress.bound(async { Ok(()) }, &queued(), std::time::Duration::MAX).await;
        assert!(matches!(answer, Ok(())));
    }

    fn request(call: super::Call) -> super::PublishRequest {
        super::PublishRequest { call, reply: tokio::sync::oneshot::channel().0, taken: queued() }
    }

    /// A call naming an id another loop is writing is set aside, judged by that loop until its
    /// write ends, then by the loop holding it; calls naming none are claimed, in one write or
    /// several of the same loop, and a loop's own ids never block it.
    #[test]
    fn calls_naming_an_id_being_written_are_set_aside() {
        use std::sync::atomic::Ordering::SeqCst;
        let writing = super::Writing::default();
        let mut aside = Vec::new();
        let (mine, keys) = writing.claim_free(vec![request(call("ws", 2, 1))], 1, &mut aside);
        assert_eq!((mine.len(), keys.len(), aside.len()), (1, 2, 0));
        let (mine, again) = writing.claim_free(vec![request(call("ws", 2, 1))], 1, &mut aside);
        assert_eq!((mine.len(), again.len()), (1, 2), "a loop's own ids do not block it");
        let other = request(call("other", 1, 1));
        let (mine, _) = writing.claim_free(vec![request(call("ws", 1, 1)), other], 0, &mut aside);
        assert_eq!((mine.len(), aside.len()), (1, 1), "e0 of ws is loop 1's");
        assert_eq!(mine[0].call.workspace, "other");
        assert_eq!(aside[0].taken.load(SeqCst), 1, "judged by the write it waits for");
        writing.release(&keys, 1);
        assert_eq!(aside[0].taken.load(SeqCst), 0, "then by the loop holding it");
        writing.retry(0);
        let (mine, _) = writing.claim_free(std::mem::take(&mut aside), 0, &mut aside);
        assert_eq!((mine.len(), aside.len()), (1, 0), "claimed once the write ended");
    }

    #[test]
    fn fan_out_is_learned_per_workspace() {
        use crate::db::entity::{delivery::status, event};
        let stored = |workspace: &str, deliveries: usize| super::StoredEvent {
            event: event::Model {
                workspace_id: workspace.to_owned(),
                id: "e".to_owned(),
                event_type: "incident.created".to_owned(),
                timestamp: String::new(),
                timestamp_supplied: false,
                data: "{}".to_owned(),
                test: false,
                created_at: 0,
                trace_context: None,
            },
            deliveries: (0..deliveries)
                .map(|i| super::DeliverySummary {
                    id: format!("d{i}"),
                    webhook_id: "w".to_owned(),
                    status: status::PENDING,
                    attempt_count: 0,
                })
                .collect(),
        };
        let mut fan_out = super::FanOut::default();
        let written = [stored("a", 10), stored("a", 30), stored("b", 0)];
        fan_out.learn(written.iter());
        assert_eq!(fan_out.deliveries(&call("a", 5, 1)), 100.0);
        assert_eq!(fan_out.deliveries(&call("b", 5, 1)), 0.0);
        assert_eq!(fan_out.deliveries(&call("c", 1, 1)), super::MERGE_DELIVERIES, "not seen yet: fills a write");
        fan_out.learn([stored("a", 1)].iter());
        assert_eq!(fan_out.deliveries(&call("a", 5, 1)), 5.0, "the last write counts");
        fan_out.refresh(0);
        assert_eq!(fan_out.deliveries(&call("a", 5, 1)), 5.0, "no webhook changed");
        fan_out.refresh(1);
        let forgotten = fan_out.deliveries(&call("a", 1, 1));
        assert_eq!(forgotten, super::MERGE_DELIVERIES, "a webhook changed: written alone again");
    }
}
