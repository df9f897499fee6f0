//! The delivery queue: claims due deliveries of a zone under fenced leases, applies attempt
//! results, schedules retries, and takes back leases that expired or whose agent went away.
//!
//! It speaks sea-orm, never tonic, and never reads the clock: every function takes `now` (ms since
//! the epoch), so the schedule arithmetic is tested with compressed, injected time.
//!
//! The rules (DESIGN.md, "Delivery semantics"):
//! - A claim gives each delivery a fresh `lease_id` until `now + webhook timeout + lease grace`.
//! - A result applies only while its `lease_id` is the delivery's current lease; otherwise it is
//!   recorded as a stale attempt and changes nothing. `succeeded` and `failed` are final.
//! - A lost lease (expired, or its agent disconnected) is dispatched again without using an
//!   attempt, except that after three losses in a row the next one counts as a failed attempt
//!   with error kind `lease_lost`.
//! - After the last attempt fails, the delivery is `failed` and, in the same transaction, a
//!   `webhook.delivery.failed` event goes to the workspace's webhooks that subscribe to it
//!   explicitly, never to the failing webhook, never for test events or `webhook.*` deliveries.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use herald_shared::proto::ErrorKind;
use herald_shared::retry::RetrySchedule;
use herald_shared::{catalog, envelope, ids};
use sea_orm::sea_query::{Expr, LockBehavior, LockType};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, Select,
};

use super::events::{NewDelivery, subscribers};
use super::insert::{insert_chunked, insert_rows};
use super::{Store, StoreError};
use crate::db::entity::delivery::{self, status};
use crate::db::entity::{attempt, event, webhook};

/// The webhook timeout when none is configured.
pub const DEFAULT_TIMEOUT_MS: i64 = 30_000;
/// Leases that may be lost in a row before the next loss counts as an attempt.
pub const FREE_LOST_LEASES: i32 = 3;

/// What the queue needs to know of the server's configuration.
#[derive(Debug, Clone)]
pub struct QueuePolicy {
    pub schedule: RetrySchedule,
    pub lease_grace_ms: i64,
    pub retry_after_max_ms: i64,
    /// Response bodies are stored up to this many bytes.
    pub response_body_limit: usize,
}

/// A webhook's limits, as a claim sees them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub max_in_flight: Option<i64>,
    pub rate_limit_per_second: Option<i64>,
}

/// Asked, in due order, of each candidate row with its webhook's limits; `false` leaves it pending.
pub type Allow = Box<dyn FnMut(&delivery::Model, Limits) -> bool + Send>;

/// Asked once, as a claim starts to run (after any wait for the writer), with the claim's limit;
/// returns the number of rows it may take then: the agent credit reserved for it at that moment.
pub type Reserve = Box<dyn FnOnce(u64) -> u64 + Send>;

/// Which due rows a claim may take.
#[derive(Default)]
pub struct Filter {
    /// Webhooks to skip entirely (at their `max_in_flight`, or rate-limited).
    pub exclude: Vec<String>,
    pub allow: Option<Allow>,
    /// Sets the claim's size when it runs rather than when it is asked for: credit an agent gives
    /// back while the claim waits for the writer (behind a large publish) is used by this claim,
    /// not left for the next one (docs/BENCHMARKS.md item 50).
    pub reserve: Option<Reserve>,
    /// Lowered to the start of the next rate window when a webhook's shared rate limit (on
    /// PostgreSQL, across replicas) held rows back, so that the dispatcher looks again then.
    pub rate_wake: Option<std::sync::Arc<std::sync::atomic::AtomicI64>>,
}

/// How long a zone's claims on PostgreSQL may start reading at its floor before one reads the
/// queue from its start again (ms of the callers' `now`).
pub const FULL_SCAN_EVERY_MS: i64 = 1_000;

/// Where a zone's next claim on PostgreSQL starts reading `deliveries_due`: just past the last row
/// the previous claim leased, by `(next_attempt_at, id)`.
///
/// Every row a claim leases leaves its old entry in that index until VACUUM removes it, and those
/// entries sit at the start of the index (the oldest due). A claim that read from the start would
/// step over all of them, more with every claim, until the next VACUUM: draining a backlog of a
/// million rows, a claim of 256 read 768 buffers at first and 9,894 at the end.
///
/// The floor is a hint, never a promise. A claim that the rows past it cannot fill reads from the
/// start too, and one claim in every [`FULL_SCAN_EVERY_MS`] reads from the start first. A row due
/// behind the floor therefore waits at most that long, and only while the rows past the floor
/// keep every claim full. Such rows: one another replica skipped (locked) and then released; the
/// rows of a resumed webhook or of one moved to this zone, which keep their due time; a publish
/// that commits after a claim read past its rows' due time (the other publish writer, another
/// replica, clock skew between replicas); a release in the same millisecond as the floor's row
/// with a smaller id. A claim that turned rows down leaves no floor, and a floor is kept only once
/// its claim has committed.
#[derive(Debug, Clone)]
pub struct ClaimFloor {
    next_attempt_at: i64,
    id: String,
    /// `now` of the last claim that read from the start.
    full_scan_at: i64,
}

/// Each zone's [`ClaimFloor`].
pub type ClaimFloors = std::sync::Arc<std::sync::Mutex<HashMap<String, ClaimFloor>>>;

/// What a claim does to its zone's floor, once its transaction has committed.
enum FloorChange {
    Keep,
    Set(ClaimFloor),
    Remove,
}

/// A row's place in `deliveries_due` within its zone.
type DueKey = (i64, String);

/// A delivery leased to an agent.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub delivery: delivery::Model,
    pub lease_id: String,
    pub lease_expires_at: i64,
    /// The attempt this job makes (1-based).
    pub attempt: u32,
}

/// One attempt as an agent reported it.
#[derive(Debug, Clone, Default)]
pub struct AttemptReport {
    pub lease_id: String,
    pub delivery_id: String,
    pub agent_id: String,
    pub zone: String,
    pub started_at: i64,
    pub duration_ms: i64,
    /// 0 when there was no answer.
    pub status: u32,
    /// The response's headers as the attempt log stores them (`herald_shared::headers`); empty
    /// when there was no answer.
    pub response_headers: String,
    pub response_body: Vec<u8>,
    pub error_kind: ErrorKind,
    pub error_message: String,
    /// Headers sent, custom values already masked, as the attempt log stores them; empty when
    /// none were sent.
    pub request_headers: String,
    /// The body sent, when a transform applied.
    pub request_body: Option<String>,
    /// No request left the agent (it was draining): the lease is released, no attempt is used.
    pub not_sent: bool,
    /// `Retry-After` of a 429 or 503 answer, in ms from `now`.
    pub retry_after_ms: Option<i64>,
    /// Reported in a hello: kept by the agent from an earlier session, which may have recorded it
    /// already (its acknowledgement lost). Such a report is logged once ([`logged_attempts`]).
    pub kept: bool,
}

/// Leases taken back, and what the attempts counted for lost leases did.
#[derive(Debug, Default)]
pub struct Reclaimed {
    pub leases: Vec<String>,
    pub applied: Vec<Applied>,
    /// Leases of a departed agent left in place until they expire: those of webhooks with a
    /// `max_in_flight`, whose slot they hold until then (the agent may still be sending).
    pub held: Vec<String>,
}

/// What a report did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The delivery succeeded.
    Succeeded,
    /// The attempt failed; another is scheduled at this time.
    Retry { at: i64 },
    /// The attempt failed and was the last: the delivery failed.
    Failed,
    /// Not sent; the delivery is due again at once.
    Released,
    /// The lease was not current: recorded as a stale attempt, nothing changed.
    Stale,
}

/// Lowers a wake-up hint to `at` (ms) unless it is already earlier; 0 means no hint yet.
pub fn wake_by(hint: &std::sync::atomic::AtomicI64, at: i64) {
    let _ = hint.fetch_update(std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst, |w| {
        Some(if w == 0 { at } else { Ord::min(w, at) })
    });
}

/// `status = s` as literal SQL. The queue indexes are partial (migration 7) and serve a query only
/// when the planner sees that it states their condition. A literal keeps that from depending on
/// how parameters are planned: Herald's PostgreSQL connections plan each statement for its values
/// (`plan_cache_mode`), but a generic plan could not prove that `status = $1` implies `status = 1`.
pub fn status_is(s: i16) -> Expr {
    Expr::cust(format!("status = {s}"))
}

/// An `UPDATE` of `deliveries` that SQLite must run through the partial index `index`
/// (`INDEXED BY`, which fails the statement rather than let it be planned otherwise): for the
/// statements that look for a webhook's rows, since `deliveries_by_webhook` (which holds every
/// row the webhook had) would otherwise look cheaper to the planner.
pub(crate) fn sqlite_update_indexed_by(mut statement: sea_orm::Statement, index: &str) -> sea_orm::Statement {
    const TABLE: &str = "UPDATE \"deliveries\" ";
    debug_assert!(statement.sql.starts_with(TABLE), "{}", statement.sql);
    statement.sql = statement.sql.replacen(TABLE, &format!("{TABLE}INDEXED BY \"{index}\" "), 1);
    statement
}

/// One zone's pending deliveries due by `now`, oldest due first: the rows a claim pages through,
/// read off `deliveries_due` in its order.
pub fn due_rows(zone: &str, now: i64) -> Select<delivery::Entity> {
    delivery::Entity::find()
        .filter(delivery::Column::Zone.eq(zone))
        .filter(status_is(status::PENDING))
        .filter(delivery::Column::NextAttemptAt.lte(now))
        .order_by_asc(delivery::Column::NextAttemptAt)
        .order_by_asc(delivery::Column::Id)
}

/// The rows of [`due_rows`] after `(next_attempt_at, id)` in its order: a claim's pages past its
/// zone's [`ClaimFloor`] (PostgreSQL reads them off `deliveries_due` from there, the row
/// comparison an index condition). sea-query passes a custom expression's placeholders through
/// as written, so they are the backend's own.
pub fn past_floor(backend: DbBackend, next_attempt_at: i64, id: &str) -> Expr {
    let sql = match backend {
        DbBackend::Postgres => "(next_attempt_at, id) > ($1, $2)",
        _ => "(next_attempt_at, id) > (?, ?)",
    };
    Expr::cust_with_values(sql, [sea_orm::Value::from(next_attempt_at), sea_orm::Value::from(id)])
}

/// In-flight deliveries whose lease expired before `now`, or (with `agent`) every lease of that
/// agent: the rows `reclaim_leases` takes back, read off `deliveries_leased`.
pub fn leased_rows(agent: Option<&str>, now: i64) -> Select<delivery::Entity> {
    let q = delivery::Entity::find().filter(status_is(status::IN_FLIGHT));
    match agent {
        Some(a) => q.filter(delivery::Column::LeaseAgent.eq(a)),
        None => q.filter(delivery::Column::LeaseExpiresAt.lt(now)),
    }
}

/// Is `status` a success (2xx)?
pub fn is_success(status: u32) -> bool {
    (200..300).contains(&status)
}

/// When attempt `next` is due after a failure at `now`: the schedule's delay, pushed later (never
/// earlier) by `Retry-After`, which is capped at `retry_after_max_ms`.
pub fn next_attempt_at(policy: &QueuePolicy, next: u32, now: i64, retry_after_ms: Option<i64>) -> Option<i64> {
    let delay = policy.schedule.delay_before(next)?;
    let scheduled = now.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
    let asked = retry_after_ms.map(|ms| now.saturating_add(ms.clamp(0, policy.retry_after_max_ms)));
    Some(asked.map_or(scheduled, |a| std::cmp::max(a, scheduled)))
}

/// Headers of a report as an attempt row holds them: `{}` for none.
fn object_or_empty(json: String) -> String {
    if json.is_empty() { "{}".to_owned() } else { json }
}

/// The first `limit` bytes of a response body as text for the log: invalid UTF-8 replaced, and
/// NUL too (PostgreSQL text refuses it, and one binary body would fail its whole result batch).
fn truncate(body: &[u8], limit: usize) -> String {
    let cut = &body[..body.len().min(limit)];
    let text = String::from_utf8_lossy(cut);
    if text.contains('\0') { text.replace('\0', "\u{FFFD}") } else { text.into_owned() }
}

impl Store {
    /// Every lease in flight of a webhook with a `max_in_flight`: (lease, webhook, expiry). A
    /// control plane that restarts counts them in its webhooks' slots (their agents may still be
    /// sending), as it counted them before.
    pub async fn limited_leases(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let statement = sea_orm::Statement::from_string(
            self.db.get_database_backend(),
            format!(
                "SELECT d.lease_id, d.webhook_id, d.lease_expires_at FROM deliveries d \
                 JOIN webhooks w ON w.id = d.webhook_id \
                 WHERE d.status = {in_flight} AND w.max_in_flight IS NOT NULL \
                   AND d.lease_id IS NOT NULL AND d.lease_expires_at IS NOT NULL",
                in_flight = status::IN_FLIGHT,
            ),
        );
        let rows = self.db.query_all_raw(statement).await?;
        rows.iter()
            .map(|r| Ok((r.try_get_by_index(0)?, r.try_get_by_index(1)?, r.try_get_by_index(2)?)))
            .collect::<Result<_, sea_orm::DbErr>>()
            .map_err(StoreError::from)
    }

    /// When the next pending delivery of `zone` is due, if any.
    pub async fn next_due(&self, zone: &str) -> Result<Option<i64>, StoreError> {
        let due: Option<Option<i64>> = delivery::Entity::find()
            .select_only()
            .column_as(delivery::Column::NextAttemptAt.min(), "due")
            .filter(delivery::Column::Zone.eq(zone))
            .filter(status_is(status::PENDING))
            .into_tuple()
            .one(&self.db)
            .await?;
        Ok(due.flatten())
    }

    /// Deliveries not yet final, counted by status, and since when the oldest delivery that is
    /// due has been waiting to be sent (for `/metrics`; a retry scheduled for later is not late).
    pub async fn queue_stats(&self, now: i64) -> Result<(Vec<(i16, i64)>, Option<i64>), StoreError> {
        // One count per status, each off its own partial index, in one statement: one snapshot,
        // so a row that changes status meanwhile is counted once.
        let per_status: Vec<String> =
            status::OPEN.iter().map(|s| format!("(SELECT COUNT(*) FROM deliveries WHERE status = {s})")).collect();
        let sql = format!("SELECT {}", per_status.join(", "));
        let row = self
            .db
            .query_one_raw(sea_orm::Statement::from_string(self.db.get_database_backend(), sql))
            .await?
            .ok_or_else(|| StoreError::Internal("the queue counts returned no row".into()))?;
        let mut counts = Vec::with_capacity(status::OPEN.len());
        for (i, s) in status::OPEN.into_iter().enumerate() {
            let n: i64 = row.try_get_by_index(i).map_err(|e| StoreError::Internal(e.to_string()))?;
            counts.push((s, n));
        }
        let oldest: Option<Option<i64>> = delivery::Entity::find()
            .select_only()
            .column_as(delivery::Column::NextAttemptAt.min(), "oldest")
            .filter(status_is(status::PENDING))
            .filter(delivery::Column::NextAttemptAt.lte(now))
            .into_tuple()
            .one(&self.db)
            .await?;
        Ok((counts, oldest.flatten()))
    }

    /// The zones webhooks name, so that a zone without agents shows as 0 rather than nothing.
    pub async fn webhook_zones(&self) -> Result<Vec<String>, StoreError> {
        Ok(webhook::Entity::find()
            .select_only()
            .column(webhook::Column::Zone)
            .distinct()
            .into_tuple()
            .all(&self.db)
            .await?)
    }

    /// When the earliest current lease expires, if any delivery is in flight.
    pub async fn next_lease_expiry(&self) -> Result<Option<i64>, StoreError> {
        let at: Option<Option<i64>> = delivery::Entity::find()
            .select_only()
            .column_as(delivery::Column::LeaseExpiresAt.min(), "at")
            .filter(status_is(status::IN_FLIGHT))
            .into_tuple()
            .one(&self.db)
            .await?;
        Ok(at.flatten())
    }

    /// The events of `deliveries`, by (workspace, id).
    pub async fn events_of(
        &self,
        deliveries: &[&delivery::Model],
    ) -> Result<HashMap<(String, String), event::Model>, StoreError> {
        // One workspace at a time, by the primary key (`events::events_by_id`).
        let mut by_workspace: HashMap<&str, HashSet<&str>> = HashMap::new();
        for d in deliveries {
            by_workspace.entry(d.workspace_id.as_str()).or_default().insert(d.event_id.as_str());
        }
        let mut out = HashMap::new();
        for (workspace, ids) in by_workspace {
            let ids: Vec<&str> = ids.into_iter().collect();
            let rows = super::events::events_by_id(&self.db, workspace, &ids).await?;
            out.extend(rows.into_iter().map(|e| ((e.workspace_id.clone(), e.id.clone()), e)));
        }
        Ok(out)
    }

    /// Leases up to `limit` due deliveries of `zone` to `agent_id`, oldest due first (on
    /// PostgreSQL, oldest past the zone's [`ClaimFloor`] first, then from the start), returned in
    /// due order. On PostgreSQL the rows are locked with `FOR UPDATE SKIP LOCKED`, so replicas
    /// never claim the same row.
    pub async fn claim(
        &self,
        zone: &str,
        agent_id: &str,
        limit: u64,
        now: i64,
        policy: &QueuePolicy,
    ) -> Result<Vec<Claimed>, StoreError> {
        self.claim_where(zone, agent_id, limit, now, policy, Filter::default()).await
    }

    /// `claim`, skipping the webhooks in `filter.exclude` and any row `filter.allow` turns down
    /// (the dispatcher's per-webhook `max_in_flight` and rate limits). Rows turned down stay
    /// pending, untouched.
    pub async fn claim_where(
        &self,
        zone: &str,
        agent_id: &str,
        limit: u64,
        now: i64,
        policy: &QueuePolicy,
        filter: Filter,
    ) -> Result<Vec<Claimed>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (zone, agent_id, grace) = (zone.to_owned(), agent_id.to_owned(), policy.lease_grace_ms);
        let zone_key = zone.clone();
        let Filter { mut exclude, mut allow, rate_wake, reserve } = filter;
        let last_floor = self.claim_floors.lock().expect("claim floors lock").get(&zone).cloned();
        let (claimed, change) = self
            .dispatch_writer
            .write_relaxed(move |txn| {
                Box::pin(async move {
                    let limit = reserve.map_or(limit, |reserve| reserve(limit));
                    if limit == 0 {
                        return Ok((Vec::new(), FloorChange::Keep));
                    }
                    // Pages of due rows, oldest first. A webhook whose row is turned down (at its
                    // limit) is left out of later pages, so one busy webhook cannot hide the
                    // others' work behind it.
                    let mut due: Vec<delivery::Model> = Vec::new();
                    let mut seen: HashSet<String> = HashSet::new();
                    let mut hook_rows: HashMap<String, (Option<i64>, Limits)> = HashMap::new();
                    // On PostgreSQL, `max_in_flight` and `rate_limit_per_second` hold across
                    // replicas: the slots and the sends left in this second are read from the
                    // database under a per-webhook advisory lock that lasts until this claim
                    // commits (a webhook another replica is claiming now is skipped).
                    let shared = txn.get_database_backend() == DbBackend::Postgres;
                    if !shared && exclude.is_empty() {
                        let claimed = claim_unlimited(txn, &zone, &agent_id, limit, now, grace).await?;
                        if !claimed.is_empty() {
                            return Ok((claimed, FloorChange::Keep));
                        }
                    }
                    let mut slots: HashMap<String, i64> = HashMap::new();
                    let window = now - now.rem_euclid(1000);
                    let mut sends: HashMap<String, (i64, i64)> = HashMap::new();
                    // PostgreSQL: start past the zone's floor, unless it is time to read from the
                    // start. This pass's rows are `due[pass_start..]`; `left_over` says a row was
                    // read and not leased because the claim was full.
                    let mut floor: Option<DueKey> = last_floor
                        .as_ref()
                        .filter(|f| {
                            shared && exclude.is_empty() && (0..FULL_SCAN_EVERY_MS).contains(&(now - f.full_scan_at))
                        })
                        .map(|f| (f.next_attempt_at, f.id.clone()));
                    let mut full_scan_at = last_floor.as_ref().map(|f| f.full_scan_at);
                    let mut pass_start = 0;
                    let mut exhausted = false;
                    let mut left_over = false;
                    for _page in 0..8 {
                        let mut q = due_rows(&zone, now).limit(limit);
                        match &floor {
                            Some((at, id)) => {
                                q = q.filter(past_floor(DbBackend::Postgres, *at, id));
                            }
                            None => full_scan_at = Some(now),
                        }
                        if !exclude.is_empty() {
                            let mut list = exclude.clone();
                            super::insert::pad_list(&mut list);
                            q = q.filter(delivery::Column::WebhookId.is_not_in(list));
                        }
                        if !seen.is_empty() {
                            let mut list: Vec<String> = seen.iter().cloned().collect();
                            super::insert::pad_list(&mut list);
                            q = q.filter(delivery::Column::Id.is_not_in(list));
                        }
                        if txn.get_database_backend() == DbBackend::Postgres {
                            q = q.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
                        }
                        let page = q.all(txn).await?;
                        exhausted = (page.len() as u64) < limit;
                        // Each webhook once (a page holds many rows of a busy one).
                        let mut listed = HashSet::new();
                        let new_hooks: Vec<String> = page
                            .iter()
                            .filter(|d| !hook_rows.contains_key(&d.webhook_id) && listed.insert(d.webhook_id.as_str()))
                            .map(|d| d.webhook_id.clone())
                            .collect();
                        if !new_hooks.is_empty() {
                            hook_rows.extend(hook_limits(txn, new_hooks.clone()).await?);
                            if shared {
                                for w in new_hooks {
                                    let limits = hook_rows.get(&w).map(|h| h.1).unwrap_or_default();
                                    if limits.max_in_flight.is_none() && limits.rate_limit_per_second.is_none() {
                                        continue;
                                    }
                                    if !advisory_lock(txn, &w).await? {
                                        // Another replica is claiming it right now: look again soon.
                                        if let Some(wake) = &rate_wake {
                                            wake_by(wake, now + 50);
                                        }
                                        slots.insert(w, 0);
                                        continue;
                                    }
                                    if let Some(max) = limits.max_in_flight {
                                        slots.insert(w.clone(), free_slots(txn, &w, max).await?);
                                    }
                                    if let Some(rate) = limits.rate_limit_per_second {
                                        let sent = sent_in_window(txn, &w, window).await?;
                                        sends.insert(w, (sent, rate - sent));
                                    }
                                }
                            }
                        }
                        for d in page {
                            seen.insert(d.id.clone());
                            if due.len() as u64 >= limit {
                                left_over = true;
                                break;
                            }
                            if exclude.contains(&d.webhook_id) {
                                continue;
                            }
                            if slots.get(&d.webhook_id).is_some_and(|free| *free <= 0) {
                                exclude.push(d.webhook_id.clone());
                                continue;
                            }
                            if sends.get(&d.webhook_id).is_some_and(|(_, left)| *left <= 0) {
                                if let Some(wake) = &rate_wake {
                                    wake_by(wake, window + 1000);
                                }
                                exclude.push(d.webhook_id.clone());
                                continue;
                            }
                            let limits = hook_rows.get(&d.webhook_id).map(|h| h.1).unwrap_or_default();
                            let allowed = allow.as_mut().is_none_or(|allow| allow(&d, limits));
                            if allowed {
                                if let Some(free) = slots.get_mut(&d.webhook_id) {
                                    *free -= 1;
                                }
                                if let Some((_, left)) = sends.get_mut(&d.webhook_id) {
                                    *left -= 1;
                                }
                                due.push(d);
                            } else {
                                exclude.push(d.webhook_id.clone());
                            }
                        }
                        if exhausted && floor.is_some() && (due.len() as u64) < limit {
                            // Past the floor there was not enough: read from the start too.
                            floor = None;
                            pass_start = due.len();
                            continue;
                        }
                        if allow.is_none() || exhausted || due.len() as u64 >= limit {
                            break;
                        }
                    }
                    let mut change = FloorChange::Keep;
                    if shared {
                        // The next floor: nothing unleased lies behind it. When this pass may have
                        // left rows (a full page, or one the claim filled before its end), they
                        // follow its last leased row; otherwise every due row was read and leased.
                        // Rows turned down would lie behind any floor: none then. Nothing leased
                        // at all: nothing is due, and the last floor still holds.
                        let rows = if exhausted && !left_over { &due[..] } else { &due[pass_start..] };
                        let next = rows
                            .iter()
                            .map(|d| (d.next_attempt_at, &d.id))
                            .max()
                            .map(|(at, id)| (at, id.clone()))
                            .or_else(|| last_floor.map(|f| (f.next_attempt_at, f.id)));
                        change = match (exclude.is_empty(), next, full_scan_at) {
                            (true, Some((next_attempt_at, id)), Some(full_scan_at)) => {
                                FloorChange::Set(ClaimFloor { next_attempt_at, id, full_scan_at })
                            }
                            _ => FloorChange::Remove,
                        };
                    }
                    // Two passes (past the floor, then from the start) leave rows out of due order.
                    due.sort_by(|a, b| (a.next_attempt_at, &a.id).cmp(&(b.next_attempt_at, &b.id)));
                    for (w, (sent, _)) in &sends {
                        let taken = due.iter().filter(|d| &d.webhook_id == w).count() as i64;
                        if taken > 0 {
                            record_sends(txn, w, window, sent + taken).await?;
                        }
                    }
                    if due.is_empty() {
                        return Ok((Vec::new(), change));
                    }
                    let timeouts: HashMap<&String, Option<i64>> = hook_rows.iter().map(|(k, v)| (k, v.0)).collect();
                    // One lease prefix per claim; each delivery's lease is the prefix and its id,
                    // fresh for every dispatch. One UPDATE per distinct expiry.
                    let prefix = ids::new_id(ids::LEASE);
                    let mut by_expiry: HashMap<i64, Vec<String>> = HashMap::new();
                    for d in &due {
                        let timeout = timeouts.get(&d.webhook_id).copied().flatten().unwrap_or(DEFAULT_TIMEOUT_MS);
                        by_expiry.entry(now + timeout + grace).or_default().push(d.id.clone());
                    }
                    let mut expiry_of = HashMap::new();
                    let lease_prefix = format!("{prefix}.");
                    for (expires, ids) in by_expiry {
                        let mut list = ids.clone();
                        super::insert::pad_list(&mut list);
                        delivery::Entity::update_many()
                            .col_expr(delivery::Column::Status, Expr::value(status::IN_FLIGHT))
                            .col_expr(
                                delivery::Column::LeaseId,
                                // `||` concatenates on SQLite and PostgreSQL; the prefix is a generated id.
                                // Results rely on this form (`lease_names`).
                                // The prefix is bound, so the statement's text is the same
                                // for every claim and stays prepared.
                                // (sea-query's placeholder in custom SQL is the backend's own).
                                Expr::cust_with_values(
                                    if shared { "$1 || id" } else { "? || id" },
                                    [lease_prefix.clone()],
                                ),
                            )
                            .col_expr(delivery::Column::LeaseAgent, Expr::value(agent_id.clone()))
                            .col_expr(delivery::Column::LeaseExpiresAt, Expr::value(expires))
                            .col_expr(delivery::Column::UpdatedAt, Expr::value(now))
                            .filter(delivery::Column::Id.is_in(list))
                            .exec(txn)
                            .await?;
                        expiry_of.extend(ids.into_iter().map(|id| (id, expires)));
                    }
                    let claimed = due
                        .into_iter()
                        .map(|mut d| {
                            let lease_id = format!("{prefix}.{}", d.id);
                            let lease_expires_at = expiry_of[&d.id];
                            d.status = status::IN_FLIGHT;
                            d.lease_id = Some(lease_id.clone());
                            d.lease_agent = Some(agent_id.clone());
                            d.lease_expires_at = Some(lease_expires_at);
                            let attempt = u32::try_from(d.attempt_count).unwrap_or(0) + 1;
                            Claimed { delivery: d, lease_id, lease_expires_at, attempt }
                        })
                        .collect();
                    Ok((claimed, change))
                })
            })
            .await?;
        // Only once committed: a claim rolled back leaves its rows due behind the floor it read.
        let mut floors = self.claim_floors.lock().expect("claim floors lock");
        match change {
            FloorChange::Keep => {}
            FloorChange::Set(floor) => _ = floors.insert(zone_key, floor),
            FloorChange::Remove => _ = floors.remove(&zone_key),
        }
        Ok(claimed)
    }

    /// Applies a batch of attempt reports in one transaction, in order.
    ///
    /// Successes on a current lease, nearly every report, are settled first and read nothing:
    /// one `UPDATE … RETURNING` per status code finds, fences and settles their rows and hands
    /// back what their attempt rows need ([`settle_successes`]). Only the rest (failures,
    /// stale or manual attempts, leases handed back) read their rows, whole.
    pub async fn record_results(
        &self,
        reports: Vec<AttemptReport>,
        now: i64,
        policy: &QueuePolicy,
    ) -> Result<Vec<Applied>, StoreError> {
        let policy = policy.clone();
        let peers = self.peers.clone();
        self.dispatch_writer
            .write_relaxed(move |txn| {
                Box::pin(async move {
                    // Each report's headers, moved into its attempt row (a report makes one at
                    // most) rather than copied.
                    let mut reports = reports;
                    let mut headers: Vec<(String, String)> = reports
                        .iter_mut()
                        .map(|r| (std::mem::take(&mut r.request_headers), std::mem::take(&mut r.response_headers)))
                        .collect();
                    // The first success reported for each delivery; any other report of it (a
                    // repeat, another lease) takes the slow path.
                    let mut first: HashMap<&str, usize> = HashMap::new();
                    let mut by_code: HashMap<u32, Vec<(&str, &str)>> = HashMap::new();
                    // Only a lease that names its own delivery may go into the shared statement.
                    for (i, r) in reports
                        .iter()
                        .enumerate()
                        .filter(|(_, r)| is_plain_success(r) && lease_names(&r.lease_id, &r.delivery_id))
                    {
                        if let std::collections::hash_map::Entry::Vacant(v) = first.entry(&r.delivery_id) {
                            v.insert(i);
                            by_code.entry(r.status).or_default().push((&r.delivery_id, &r.lease_id));
                        }
                    }
                    // Delivery -> the attempt number and workspace of its settled success.
                    let mut settled: HashMap<String, (i32, String)> = HashMap::new();
                    for (code, leases) in by_code {
                        for chunk in leases.chunks(1000) {
                            settled.extend(settle_successes(txn, code, chunk, now).await?);
                        }
                    }
                    let fast = |i: usize, r: &AttemptReport| {
                        first.get(r.delivery_id.as_str()) == Some(&i) && settled.contains_key(&r.delivery_id)
                    };
                    // The rest read their rows. On PostgreSQL they are locked as read (in id
                    // order, as every batch locks them): a cancel, retry or reclaim committing
                    // meanwhile beside this writer waits, or is seen.
                    let rest: Vec<String> = reports
                        .iter()
                        .enumerate()
                        .filter(|&(i, r)| !fast(i, r))
                        .map(|(_, r)| r.delivery_id.clone())
                        .collect();
                    let mut rows: HashMap<String, delivery::Model> = HashMap::new();
                    if !rest.is_empty() {
                        let mut rest = rest;
                        super::insert::pad_list(&mut rest);
                        let mut read = delivery::Entity::find().filter(delivery::Column::Id.is_in(rest));
                        if txn.get_database_backend() == DbBackend::Postgres {
                            read = read.order_by_asc(delivery::Column::Id).lock_exclusive();
                        }
                        rows = read.all(txn).await?.into_iter().map(|d| (d.id.clone(), d)).collect();
                    }
                    let logged_before = logged_attempts(txn, &reports, &rows, &fast).await?;
                    let mut attempts: Vec<attempt::Model> = Vec::with_capacity(reports.len());
                    let mut applied = Vec::with_capacity(reports.len());
                    for (i, r) in reports.iter().enumerate() {
                        if fast(i, r)
                            && let Some((number, workspace)) = settled.get(&r.delivery_id)
                        {
                            let logged = std::mem::take(&mut headers[i]);
                            attempts.push(attempt_row(&r.delivery_id, workspace, r, logged, *number, false, &policy));
                            applied.push(Applied::Succeeded);
                            continue;
                        }
                        let Some(d) = rows.get_mut(&r.delivery_id) else {
                            // Pruned or never ours: nothing to attach the attempt to.
                            applied.push(Applied::Stale);
                            continue;
                        };
                        let current =
                            d.status == status::IN_FLIGHT && d.lease_id.as_deref() == Some(r.lease_id.as_str());
                        if !current {
                            // A result sent again (its acknowledgement was lost) is logged once.
                            let again = |a: &attempt::Model| {
                                a.delivery_id == d.id && a.started_at == r.started_at && a.agent_id == r.agent_id
                            };
                            let seen = r.kept
                                && (logged_before.contains(&(d.id.clone(), r.started_at, r.agent_id.clone()))
                                    || attempts.iter().any(again));
                            if !r.not_sent && !seen {
                                attempts.push(attempt_row(
                                    &d.id,
                                    &d.workspace_id,
                                    r,
                                    std::mem::take(&mut headers[i]),
                                    d.attempt_count + 1,
                                    true,
                                    &policy,
                                ));
                            }
                            applied.push(Applied::Stale);
                            continue;
                        }
                        if r.not_sent {
                            release(txn, d, now, false).await?;
                            applied.push(Applied::Released);
                            continue;
                        }
                        let number = d.attempt_count + 1;
                        let logged = std::mem::take(&mut headers[i]);
                        let mut row = attempt_row(&d.id, &d.workspace_id, r, logged, number, false, &policy);
                        row.manual = d.manual_from.is_some();
                        attempts.push(row);
                        let outcome = if is_plain_success(r) {
                            // A manual attempt's success (`settle_successes` leaves those out).
                            settle(txn, d, status::SUCCEEDED, None, number, r, now).await?;
                            Applied::Succeeded
                        } else if let Some(back) = d.manual_from {
                            // A failed manual attempt returns the delivery to where it was.
                            settle(txn, d, back, None, number, r, now).await?;
                            Applied::Failed
                        } else {
                            fail_attempt(txn, d, number, Some(r), now, &policy).await?
                        };
                        applied.push(outcome);
                    }
                    insert_rows::<attempt::Model, _>(txn, &attempts).await?;
                    // Every replica on the same PostgreSQL wakes: a finished job frees a slot of its
                    // webhook (`max_in_flight` counts across replicas).
                    super::wake_others(txn, &peers).await?;
                    Ok(applied)
                })
            })
            .await
    }

    /// Takes back every lease that expired by `now` (or, with `agent`, every lease of that
    /// agent, which disconnected): the deliveries are due again at once without using an attempt,
    /// unless they lost more than `FREE_LOST_LEASES` leases in a row. Returns the leases taken back
    /// and what the lost-lease attempts made of their deliveries.
    ///
    /// A departed agent's leases of webhooks with a `max_in_flight` are left to expire
    /// (`Reclaimed::held`): an agent cut off rather than dead still sends what it holds, and a
    /// second copy dispatched beside it would exceed the limit the receiver asked for. Its result,
    /// reported to its next session under the lease, then settles the delivery, sent once.
    pub async fn reclaim_leases(
        &self,
        agent: Option<&str>,
        now: i64,
        policy: &QueuePolicy,
    ) -> Result<Reclaimed, StoreError> {
        let policy = policy.clone();
        let agent = agent.map(str::to_owned);
        let peers = self.peers.clone();
        self.dispatch_writer
            .write_relaxed(move |txn| {
                Box::pin(async move {
                    let mut read = leased_rows(agent.as_deref(), now).limit(10_000);
                    if txn.get_database_backend() == DbBackend::Postgres {
                        // As results lock theirs (in id order): what changed meanwhile is seen,
                        // not overwritten.
                        read = read.order_by_asc(delivery::Column::Id).lock_exclusive();
                    }
                    let mut lost = read.all(txn).await?;
                    let mut held = Vec::new();
                    if agent.is_some() && !lost.is_empty() {
                        let hooks: HashSet<String> = lost.iter().map(|d| d.webhook_id.clone()).collect();
                        let limits = hook_limits(txn, hooks.into_iter().collect()).await?;
                        lost.retain(|d| {
                            let limited = limits.get(&d.webhook_id).is_some_and(|(_, l)| l.max_in_flight.is_some());
                            if limited && let Some(lease) = &d.lease_id {
                                held.push(lease.clone());
                            }
                            !limited
                        });
                    }
                    let reclaimed: Vec<String> = lost.iter().filter_map(|d| d.lease_id.clone()).collect();
                    let mut attempts = Vec::new();
                    let mut applied = Vec::new();
                    for mut d in lost {
                        if d.lost_leases >= FREE_LOST_LEASES {
                            let number = d.attempt_count + 1;
                            let report = AttemptReport {
                                lease_id: d.lease_id.clone().unwrap_or_default(),
                                delivery_id: d.id.clone(),
                                // Lease holders are `agent@session`; the log names the agent.
                                agent_id: d
                                    .lease_agent
                                    .as_deref()
                                    .map(|a| a.split('@').next().unwrap_or(a).to_owned())
                                    .unwrap_or_default(),
                                zone: d.zone.clone(),
                                started_at: now,
                                error_kind: ErrorKind::LeaseLost,
                                error_message: format!(
                                    "the lease was lost {} times in a row (agents died or were cut off while sending)",
                                    d.lost_leases + 1
                                ),
                                ..Default::default()
                            };
                            let none = (String::new(), String::new());
                            let mut row = attempt_row(&d.id, &d.workspace_id, &report, none, number, false, &policy);
                            row.manual = d.manual_from.is_some();
                            attempts.push(row);
                            match d.manual_from {
                                // A manual attempt that keeps losing its lease returns to where it was.
                                Some(back) => settle(txn, &mut d, back, None, number, &report, now).await?,
                                None => {
                                    applied.push(fail_attempt(txn, &mut d, number, Some(&report), now, &policy).await?);
                                }
                            }
                        } else {
                            release(txn, &mut d, now, true).await?;
                        }
                    }
                    insert_rows::<attempt::Model, _>(txn, &attempts).await?;
                    // Due again: the zone's other agents may be on another replica.
                    if !reclaimed.is_empty() {
                        super::wake_others(txn, &peers).await?;
                    }
                    Ok(Reclaimed { leases: reclaimed, applied, held })
                })
            })
            .await
    }
}

/// The statement of [`claim_unlimited`] (SQLite), whose values are the zone, `now`, the limit,
/// the lease prefix, the agent, `now` + lease grace, and `now`.
pub fn claim_unlimited_sql() -> String {
    // `status = …` literal, as the partial index `deliveries_due` states it (`status_is`). The
    // leases are `<prefix>.<delivery id>`, as results expect (`lease_names`). The limit is an
    // expression, `? + 0`, not a bare parameter: SQLite plans a bare `LIMIT ?` for its bound value
    // and so prepares the statement again every time it is bound (docs/BENCHMARKS.md item 54).
    format!(
        "WITH due AS MATERIALIZED (SELECT id, webhook_id FROM deliveries \
           WHERE zone = ? AND status = {pending} AND next_attempt_at <= ? \
           ORDER BY next_attempt_at, id LIMIT ? + 0) \
         UPDATE deliveries SET status = {in_flight}, lease_id = ? || id, lease_agent = ?, \
           lease_expires_at = ? + COALESCE((SELECT timeout_ms FROM webhooks WHERE webhooks.id = deliveries.webhook_id), {default_timeout}), \
           updated_at = ? \
         WHERE id IN (SELECT id FROM due) AND NOT EXISTS (SELECT 1 FROM due JOIN webhooks ON webhooks.id = due.webhook_id \
           WHERE webhooks.max_in_flight IS NOT NULL OR webhooks.rate_limit_per_second IS NOT NULL) \
         RETURNING *",
        pending = status::PENDING,
        in_flight = status::IN_FLIGHT,
        default_timeout = DEFAULT_TIMEOUT_MS,
    )
}

/// SQLite: leases the first `limit` due rows of `zone` in one statement, which reads them, leases
/// each until `now` + its webhook's timeout + `grace`, and returns them; or leases nothing if any
/// of those rows belongs to a webhook with a `max_in_flight` or a rate limit, which the caller's
/// pages then weigh row by row. Nearly every claim is of webhooks without limits, and this one
/// round trip to the connection's thread replaces three (the rows, their webhooks, the update)
/// and the update's `IN` list of every id. The rows come back oldest due first, as the caller's
/// pages would take them. (The same statement on PostgreSQL, with `FOR UPDATE SKIP LOCKED`,
/// drained a backlog 4% slower: docs/BENCHMARKS.md, twelfth round.)
async fn claim_unlimited(
    txn: &DatabaseTransaction,
    zone: &str,
    agent_id: &str,
    limit: u64,
    now: i64,
    grace: i64,
) -> Result<Vec<Claimed>, StoreError> {
    let sql = claim_unlimited_sql();
    let prefix = format!("{}.", ids::new_id(ids::LEASE));
    let values: [sea_orm::Value; 7] = [
        zone.into(),
        now.into(),
        i64::try_from(limit).unwrap_or(i64::MAX).into(),
        prefix.into(),
        agent_id.into(),
        now.saturating_add(grace).into(),
        now.into(),
    ];
    let statement = sea_orm::Statement::from_sql_and_values(DbBackend::Sqlite, sql, values);
    let mut rows = delivery::Entity::find().from_raw_sql(statement).all(txn).await?;
    rows.sort_unstable_by(|a, b| (a.next_attempt_at, &a.id).cmp(&(b.next_attempt_at, &b.id)));
    Ok(rows
        .into_iter()
        .map(|d| {
            let lease_id = d.lease_id.clone().unwrap_or_default();
            let lease_expires_at = d.lease_expires_at.unwrap_or(now);
            let attempt = u32::try_from(d.attempt_count).unwrap_or(0) + 1;
            Claimed { delivery: d, lease_id, lease_expires_at, attempt }
        })
        .collect())
}

/// Takes the per-webhook advisory lock that serializes claims for a limited webhook across
/// replicas until the claim's transaction ends; `false` when another replica holds it now.
async fn advisory_lock(txn: &DatabaseTransaction, webhook: &str) -> Result<bool, StoreError> {
    let lock = sea_orm::Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT pg_try_advisory_xact_lock(hashtext($1))",
        [webhook.into()],
    );
    match txn.query_one_raw(lock).await? {
        Some(row) => row.try_get_by_index(0).map_err(|e| StoreError::Internal(e.to_string())),
        None => Ok(false),
    }
}

/// How many more jobs `webhook` may have in flight across every replica (under its lock).
async fn free_slots(txn: &DatabaseTransaction, webhook: &str, max: i64) -> Result<i64, StoreError> {
    let busy = delivery::Entity::find()
        .filter(delivery::Column::WebhookId.eq(webhook))
        .filter(delivery::Column::Status.eq(status::IN_FLIGHT))
        .count(txn)
        .await?;
    Ok(max - i64::try_from(busy).unwrap_or(i64::MAX))
}

/// How many jobs of `webhook` every replica sent in the one-second window starting at `window`.
async fn sent_in_window(txn: &DatabaseTransaction, webhook: &str, window: i64) -> Result<i64, StoreError> {
    let read = sea_orm::Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT sent FROM webhook_rates WHERE webhook_id = $1 AND window_ms = $2",
        [webhook.into(), window.into()],
    );
    match txn.query_one_raw(read).await? {
        Some(row) => row.try_get_by_index::<i32>(0).map(i64::from).map_err(|e| StoreError::Internal(e.to_string())),
        None => Ok(0),
    }
}

/// Records that `webhook` has sent `sent` jobs in the window starting at `window`.
async fn record_sends(txn: &DatabaseTransaction, webhook: &str, window: i64, sent: i64) -> Result<(), StoreError> {
    let upsert = sea_orm::Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO webhook_rates (webhook_id, window_ms, sent) VALUES ($1, $2, $3) \
         ON CONFLICT (webhook_id) DO UPDATE SET window_ms = EXCLUDED.window_ms, sent = EXCLUDED.sent",
        [webhook.into(), window.into(), i32::try_from(sent).unwrap_or(i32::MAX).into()],
    );
    txn.execute_raw(upsert).await?;
    Ok(())
}

/// The timeout and limits of these webhooks.
async fn hook_limits(
    txn: &DatabaseTransaction,
    ids: Vec<String>,
) -> Result<HashMap<String, (Option<i64>, Limits)>, StoreError> {
    type HookRow = (String, Option<i64>, Option<i64>, Option<i64>);
    let mut ids = ids;
    super::insert::pad_list(&mut ids);
    Ok(webhook::Entity::find()
        .select_only()
        .column(webhook::Column::Id)
        .column(webhook::Column::TimeoutMs)
        .column(webhook::Column::MaxInFlight)
        .column(webhook::Column::RateLimitPerSecond)
        .filter(webhook::Column::Id.is_in(ids))
        .into_tuple::<HookRow>()
        .all(txn)
        .await?
        .into_iter()
        .map(|(id, timeout, max_in_flight, rate)| {
            (id, (timeout, Limits { max_in_flight, rate_limit_per_second: rate }))
        })
        .collect())
}

/// Whether `lease` is a lease of `delivery`: a claim names each lease `<prefix>.<delivery id>`.
fn lease_names(lease: &str, delivery: &str) -> bool {
    lease.strip_suffix(delivery).is_some_and(|prefix| prefix.ends_with('.'))
}

/// A report of a sent attempt that succeeded: a 2xx answer and no error.
fn is_plain_success(r: &AttemptReport) -> bool {
    !r.not_sent && is_success(r.status) && r.error_kind == ErrorKind::Unspecified
}

/// Settles the successes `leases` (delivery id, lease id) that answered `code`, in one statement
/// that fences each row by its lease as [`settle`] does, and by status, so that a cancel or
/// reclaim committing first makes it match nothing. `id IN (…) AND lease_id IN (…)` pairs each
/// row with its own report because every lease id names its delivery (`<prefix>.<delivery id>`,
/// checked by the caller with [`lease_names`]) and each delivery appears once; a list of
/// `(id, lease_id)` pairs would say the same, but PostgreSQL plans it as 1,000 ORs (14 ms of
/// planning per 1,000). Manual attempts are left out: a manual success also clears
/// `manual_from`, which the caller reads first. Returns, for each delivery settled, the
/// attempt number it used and its workspace.
async fn settle_successes(
    txn: &DatabaseTransaction,
    code: u32,
    leases: &[(&str, &str)],
    now: i64,
) -> Result<Vec<(String, (i32, String))>, StoreError> {
    let backend = txn.get_database_backend();
    // Padded with the last pair, which matches its own row again: few distinct texts.
    let mut leases = leases.to_vec();
    super::insert::pad_list(&mut leases);
    let mut values: Vec<sea_orm::Value> = Vec::with_capacity(2 + 2 * leases.len());
    values.push(i32::try_from(code).unwrap_or(0).into());
    values.push(now.into());
    values.extend(leases.iter().map(|(id, _)| (*id).into()));
    values.extend(leases.iter().map(|(_, lease)| (*lease).into()));
    let sql = settle_successes_sql(backend, leases.len());
    let rows = txn.query_all_raw(sea_orm::Statement::from_sql_and_values(backend, sql, values)).await?;
    let mut settled = Vec::with_capacity(rows.len());
    for row in rows {
        let get = |e: sea_orm::DbErr| StoreError::Internal(e.to_string());
        let id: String = row.try_get_by_index(0).map_err(get)?;
        let workspace: String = row.try_get_by_index(1).map_err(get)?;
        let number: i32 = row.try_get_by_index(2).map_err(get)?;
        settled.push((id, (number, workspace)));
    }
    Ok(settled)
}

/// The statement of [`settle_successes`] for `pairs` (delivery id, lease id) pairs, whose values
/// are the status code, `now`, the ids and then the leases.
///
/// The rows are found by primary key alone. Their status is checked as `status + 0`, which no
/// index's condition can match: PostgreSQL would otherwise AND the primary key's bitmap with one
/// of `deliveries_leased` (`WHERE status = IN_FLIGHT`), reading all of that index, dead entries
/// of settled rows too, until VACUUM (125,000 entries, 4 ms per settle, halfway through draining
/// a million rows).
pub fn settle_successes_sql(backend: DbBackend, pairs: usize) -> String {
    use std::fmt::Write as _;
    let mark = |i: usize| match backend {
        DbBackend::Postgres => format!("${i}"),
        _ => "?".to_owned(),
    };
    let list = |from: usize| (from..from + pairs).map(mark).collect::<Vec<_>>().join(", ");
    let mut sql = String::with_capacity(256 + pairs * 14);
    let _ = write!(
        sql,
        "UPDATE deliveries SET status = {}, attempt_count = attempt_count + 1, lost_leases = 0, \
         lease_id = NULL, lease_agent = NULL, lease_expires_at = NULL, last_status = {}, last_error = NULL, \
         updated_at = {} WHERE id IN ({}) AND lease_id IN ({}) AND status + 0 = {} AND manual_from IS NULL \
         RETURNING id, workspace_id, attempt_count",
        status::SUCCEEDED,
        mark(1),
        mark(2),
        list(3),
        list(3 + pairs),
        status::IN_FLIGHT,
    );
    sql
}

/// The attempt row of report `r`, with its (request, response) headers taken out of it.
fn attempt_row(
    delivery_id: &str,
    workspace_id: &str,
    r: &AttemptReport,
    (request_headers, response_headers): (String, String),
    number: i32,
    stale: bool,
    policy: &QueuePolicy,
) -> attempt::Model {
    attempt::Model {
        id: ids::new_id(ids::ATTEMPT),
        delivery_id: delivery_id.to_owned(),
        workspace_id: workspace_id.to_owned(),
        number,
        agent_id: r.agent_id.clone(),
        zone: r.zone.clone(),
        started_at: r.started_at,
        duration_ms: r.duration_ms,
        request_headers: object_or_empty(request_headers),
        request_body: r.request_body.clone(),
        response_status: i32::try_from(r.status).unwrap_or(0),
        response_headers: object_or_empty(response_headers),
        response_body: truncate(&r.response_body, policy.response_body_limit),
        error_kind: r.error_kind as i32,
        error_message: r.error_message.clone(),
        stale,
        manual: false,
    }
}

/// The attempts already logged of the deliveries whose reports kept from an earlier session
/// (`AttemptReport::kept`) are stale in this batch, as (delivery, started at, agent): an agent
/// sends a result again when it was not told that it was recorded (the control plane died, or the
/// connection broke, first), and it is logged once. Read only when a batch has such reports.
async fn logged_attempts(
    txn: &DatabaseTransaction,
    reports: &[AttemptReport],
    rows: &HashMap<String, delivery::Model>,
    fast: &impl Fn(usize, &AttemptReport) -> bool,
) -> Result<HashSet<(String, i64, String)>, StoreError> {
    let mut ids: Vec<String> = reports
        .iter()
        .enumerate()
        .filter(|&(i, r)| r.kept && !fast(i, r) && !r.not_sent)
        .filter_map(|(_, r)| {
            rows.get(&r.delivery_id)
                .filter(|d| !(d.status == status::IN_FLIGHT && d.lease_id.as_deref() == Some(r.lease_id.as_str())))
        })
        .map(|d| d.id.clone())
        .collect();
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    ids.sort_unstable();
    ids.dedup();
    super::insert::pad_list(&mut ids);
    Ok(attempt::Entity::find()
        .select_only()
        .column(attempt::Column::DeliveryId)
        .column(attempt::Column::StartedAt)
        .column(attempt::Column::AgentId)
        .filter(attempt::Column::DeliveryId.is_in(ids))
        .into_tuple::<(String, i64, String)>()
        .all(txn)
        .await?
        .into_iter()
        .collect())
}

/// Puts a leased delivery back in the queue, due now. `lost` counts it as a lost lease.
async fn release(txn: &DatabaseTransaction, d: &mut delivery::Model, now: i64, lost: bool) -> Result<(), StoreError> {
    d.lost_leases += i32::from(lost);
    // A paused webhook's delivery waits, parked, instead of being sent during the pause.
    let to = if webhook_active(txn, &d.webhook_id).await? { status::PENDING } else { status::PARKED };
    d.status = to;
    delivery::Entity::update_many()
        .col_expr(delivery::Column::Status, Expr::value(to))
        .col_expr(delivery::Column::LeaseId, Expr::value(Option::<String>::None))
        .col_expr(delivery::Column::LeaseAgent, Expr::value(Option::<String>::None))
        .col_expr(delivery::Column::LeaseExpiresAt, Expr::value(Option::<i64>::None))
        .col_expr(delivery::Column::LostLeases, Expr::value(d.lost_leases))
        .col_expr(delivery::Column::NextAttemptAt, Expr::value(now))
        .col_expr(delivery::Column::UpdatedAt, Expr::value(now))
        .filter(delivery::Column::Id.eq(&d.id))
        .filter(lease_fence(d))
        .exec(txn)
        .await?;
    Ok(())
}

/// Updates of a leased delivery apply only while that lease is still its current one, so that
/// two writers (replicas, a reclaim racing a result) can never both settle it.
fn lease_fence(d: &delivery::Model) -> sea_orm::Condition {
    match &d.lease_id {
        Some(lease) => sea_orm::Condition::all().add(delivery::Column::LeaseId.eq(lease.clone())),
        None => sea_orm::Condition::all().add(delivery::Column::LeaseId.is_null()),
    }
}

/// Whether the webhook is active (share-locked on PostgreSQL: `webhooks::active_state`).
async fn webhook_active(txn: &DatabaseTransaction, webhook_id: &str) -> Result<bool, StoreError> {
    Ok(super::webhooks::active_state(txn, webhook_id, None).await?.is_some_and(|(active, _)| active))
}

/// Records that attempt `number` ended as `r` says: the delivery moves to `to` (a final state, or
/// pending/parked until `next_at`), its lease is cleared and its lost-lease run ends.
async fn settle(
    txn: &DatabaseTransaction,
    d: &mut delivery::Model,
    to: i16,
    next_at: Option<i64>,
    number: i32,
    r: &AttemptReport,
    now: i64,
) -> Result<(), StoreError> {
    let mut update = delivery::Entity::update_many()
        .col_expr(delivery::Column::Status, Expr::value(to))
        .col_expr(delivery::Column::AttemptCount, Expr::value(number))
        .col_expr(delivery::Column::LostLeases, Expr::value(0))
        .col_expr(delivery::Column::LeaseId, Expr::value(Option::<String>::None))
        .col_expr(delivery::Column::LeaseAgent, Expr::value(Option::<String>::None))
        .col_expr(delivery::Column::LeaseExpiresAt, Expr::value(Option::<i64>::None))
        .col_expr(delivery::Column::LastStatus, Expr::value(i32::try_from(r.status).unwrap_or(0)))
        .col_expr(delivery::Column::LastError, Expr::value(error_text(r)))
        .col_expr(delivery::Column::ManualFrom, Expr::value(Option::<i16>::None))
        .col_expr(delivery::Column::UpdatedAt, Expr::value(now));
    if let Some(at) = next_at {
        update = update.col_expr(delivery::Column::NextAttemptAt, Expr::value(at));
    }
    update.filter(delivery::Column::Id.eq(&d.id)).filter(lease_fence(d)).exec(txn).await?;
    d.status = to;
    d.attempt_count = number;
    d.lost_leases = 0;
    d.manual_from = None;
    Ok(())
}

fn error_text(r: &AttemptReport) -> Option<String> {
    match (r.error_kind, r.error_message.is_empty()) {
        (ErrorKind::Unspecified, true) => None,
        (kind, true) => Some(kind.as_str_name().to_owned()),
        (_, false) => Some(r.error_message.clone()),
    }
}

/// Attempt `number` failed: schedule the next one, or fail the delivery (and publish the
/// operational event) when the schedule is exhausted.
async fn fail_attempt(
    txn: &DatabaseTransaction,
    d: &mut delivery::Model,
    number: i32,
    r: Option<&AttemptReport>,
    now: i64,
    policy: &QueuePolicy,
) -> Result<Applied, StoreError> {
    let empty = AttemptReport::default();
    let r = r.unwrap_or(&empty);
    let next = u32::try_from(number).unwrap_or(u32::MAX).saturating_add(1);
    match next_attempt_at(policy, next, now, r.retry_after_ms) {
        Some(at) => {
            // A paused webhook's retry waits, parked, until re-activation.
            let to = if webhook_active(txn, &d.webhook_id).await? { status::PENDING } else { status::PARKED };
            settle(txn, d, to, Some(at), number, r, now).await?;
            Ok(Applied::Retry { at })
        }
        None => {
            settle(txn, d, status::FAILED, None, number, r, now).await?;
            if !d.test && !catalog::is_operational(&d.event_type) {
                publish_delivery_failed(txn, d, r, now).await?;
            }
            Ok(Applied::Failed)
        }
    }
}

/// Publishes `webhook.delivery.failed` for `d` to the webhooks of its workspace that subscribe to
/// it explicitly, except the failing one.
async fn publish_delivery_failed(
    txn: &DatabaseTransaction,
    d: &delivery::Model,
    r: &AttemptReport,
    now: i64,
) -> Result<(), StoreError> {
    let webhook_name = webhook::Entity::find_by_id(d.webhook_id.clone())
        .select_only()
        .column(webhook::Column::Name)
        .into_tuple::<String>()
        .one(txn)
        .await?
        .unwrap_or_default();
    let data = serde_json::json!({
        "webhook_id": d.webhook_id,
        "webhook_name": webhook_name,
        "delivery_id": d.id,
        "event_id": d.event_id,
        "event_type": d.event_type,
        "attempts": d.attempt_count,
        "last_status": r.status,
        "last_error": error_text(r).unwrap_or_default(),
    });
    let id = ids::new_id(ids::EVENT);
    let timestamp =
        envelope::format_timestamp(chrono::DateTime::from_timestamp_millis(now).unwrap_or_else(chrono::Utc::now));
    event::Entity::insert(event::ActiveModel {
        workspace_id: Set(d.workspace_id.clone()),
        id: Set(id.clone()),
        event_type: Set(catalog::DELIVERY_FAILED.to_owned()),
        timestamp: Set(timestamp),
        timestamp_supplied: Set(false),
        data: Set(data.to_string()),
        test: Set(false),
        created_at: Set(now),
        trace_context: Set(None),
    })
    .exec_without_returning(txn)
    .await?;
    let rows: Vec<delivery::ActiveModel> = subscribers(txn, &d.workspace_id)
        .await?
        .iter()
        .filter(|s| s.id != d.webhook_id && catalog::subscribes_explicitly(&s.events, catalog::DELIVERY_FAILED))
        .map(|s| {
            NewDelivery {
                workspace: &d.workspace_id,
                event_id: &id,
                event_type: catalog::DELIVERY_FAILED,
                webhook_id: &s.id,
                zone: &s.zone,
                test: false,
                created_at: now,
                due: now,
            }
            .row()
        })
        .collect();
    insert_chunked(txn, rows).await
}

/// The retry schedule as the queue policy's, for convenience in callers.
pub fn policy_from(
    schedule: RetrySchedule,
    lease_grace: Duration,
    retry_after_max: Duration,
    response_body_limit: usize,
) -> QueuePolicy {
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    QueuePolicy {
        schedule,
        lease_grace_ms: ms(lease_grace),
        retry_after_max_ms: ms(retry_after_max),
        response_body_limit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(schedule: &str) -> QueuePolicy {
        policy_from(schedule.parse().unwrap(), Duration::from_secs(10), Duration::from_secs(3600), 4096)
    }

    #[test]
    fn retries_follow_the_schedule() {
        let p = policy("0s,1m,5m,30m,2h,8h");
        let now = 1_000_000;
        assert_eq!(next_attempt_at(&p, 2, now, None), Some(now + 60_000));
        assert_eq!(next_attempt_at(&p, 3, now, None), Some(now + 300_000));
        assert_eq!(next_attempt_at(&p, 6, now, None), Some(now + 8 * 3_600_000));
        assert_eq!(next_attempt_at(&p, 7, now, None), None, "six attempts, then failed");
    }

    #[test]
    fn retry_after_moves_later_never_earlier_and_is_capped() {
        let p = policy("0s,1m,5m");
        let now = 0;
        assert_eq!(next_attempt_at(&p, 2, now, Some(10_000)), Some(60_000), "never earlier than the schedule");
        assert_eq!(next_attempt_at(&p, 2, now, Some(120_000)), Some(120_000), "later when asked");
        assert_eq!(next_attempt_at(&p, 2, now, Some(99_999_999)), Some(3_600_000), "capped by --retry-after-max");
    }

    #[test]
    fn success_is_2xx_only() {
        assert!(is_success(200) && is_success(204) && is_success(299));
        assert!(!is_success(301) && !is_success(199) && !is_success(500) && !is_success(0));
    }
}
