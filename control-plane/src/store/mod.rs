//! Storage: webhooks, events and their delivery rows, API keys. It speaks sea-orm, never tonic:
//! callers get `StoreError`, which the gRPC edge maps to a status in one place.
//!
//! Architecture invariant: every write goes through a group-commit `Writer` (on SQLite, one
//! writer for everything; on PostgreSQL, the dispatcher's leases and results and a second
//! publish loop have writers of their own); reads use the pool directly.

pub mod agents;
pub mod deliveries;
pub mod events;
pub mod insert;
pub mod keys;
pub mod queue;
pub mod retention;
pub mod webhooks;
pub mod writer;

use std::collections::HashSet;

use sea_orm::{DatabaseConnection, DbErr, SqlErr};

use crate::crypto::SecretKey;
use writer::Writer;

/// Why a storage call failed. Messages are lowercase and never contain a secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist in the caller's workspace.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A unique id is taken by something different.
    #[error("{field}: {message}")]
    AlreadyExists { field: String, message: String },
    /// The request, merged with the stored state, is invalid.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// The database cannot be reached now; retrying later may work.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A publish waited on a write that made no progress for the publish timeout; whether its
    /// events are stored is unknown. The message is for the caller.
    #[error("{0}")]
    Stalled(String),
    /// Anything else; logged in full, answered as an internal error.
    #[error("database error: {0}")]
    Internal(String),
}

impl StoreError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        StoreError::Invalid { field: field.into(), message: message.into() }
    }
}

impl From<DbErr> for StoreError {
    fn from(e: DbErr) -> Self {
        if let Some(SqlErr::UniqueConstraintViolation(detail)) = e.sql_err() {
            return StoreError::AlreadyExists { field: String::new(), message: detail };
        }
        if is_unavailable(&e) {
            return StoreError::Unavailable(e.to_string());
        }
        StoreError::Internal(e.to_string())
    }
}

/// Whether a database error means "cannot reach the database" rather than "bad statement".
fn is_unavailable(e: &DbErr) -> bool {
    use sea_orm::sqlx::Error as Sqlx;
    match e {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Exec(sea_orm::RuntimeErr::SqlxError(inner)) | DbErr::Query(sea_orm::RuntimeErr::SqlxError(inner)) => {
            match inner.as_ref() {
                Sqlx::Io(_) | Sqlx::PoolTimedOut | Sqlx::PoolClosed | Sqlx::WorkerCrashed | Sqlx::Tls(_) => true,
                Sqlx::Database(db) => {
                    // PostgreSQL: 57014 statement timeout, 57P01 admin shutdown, 08xxx connection
                    // exceptions, 40P01 deadlock and 40001 serialization failure (the transaction
                    // was rolled back; writers of one replica and replicas commit side by side).
                    // SQLite: BUSY (5) or LOCKED (6) after the busy timeout.
                    let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                    // SQLite reports extended codes: the low byte is the primary one.
                    let sqlite_busy_or_locked = code.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6));
                    matches!(code.as_str(), "57014" | "57P01" | "40P01" | "40001")
                        || code.starts_with("08")
                        || sqlite_busy_or_locked
                }
                _ => false,
            }
        }
        _ => false,
    }
}

/// Publish loops, each with a writer of its own, on PostgreSQL (SQLite takes one writer).
const PUBLISH_WRITERS: usize = 2;

/// The store: the pool for reads, the writer for writes, the key for secrets at rest.
#[derive(Clone)]
pub struct Store {
    pub db: DatabaseConnection,
    pub writer: Writer,
    /// Leases, results and reclaims (`queue`): `writer` itself on SQLite.
    pub dispatch_writer: Writer,
    pub key: SecretKey,
    /// Publish calls, merged into shared writes by `events::publish_loop`.
    publisher: tokio::sync::mpsc::Sender<events::PublishRequest>,
    /// This control plane among the replicas on one PostgreSQL.
    pub peers: std::sync::Arc<Peers>,
    /// The dispatcher, once it runs: publishes lease to its agents and tell it what committed.
    sink: std::sync::Arc<std::sync::OnceLock<std::sync::Arc<dyn events::PublishSink>>>,
    /// Where each zone's claims on PostgreSQL start reading (`queue::ClaimFloors`).
    claim_floors: queue::ClaimFloors,
    /// When the publish loops last moved: what bounds a publish call's wait.
    publish_progress: std::sync::Arc<events::Progress>,
    /// Counts webhook changes (here or announced by another replica): the publish loops'
    /// estimates of each workspace's fan-out are stale once it moves.
    webhooks_generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Store {
    /// A store whose writers abandon a write that has not moved for [`writer::WRITE_TIMEOUT`].
    pub fn new(db: DatabaseConnection, key: SecretKey) -> Self {
        Self::with_write_timeout(db, key, writer::WRITE_TIMEOUT)
    }

    /// A store whose writers abandon a write that has not moved for `write_timeout`
    /// (`--write-timeout`).
    pub fn with_write_timeout(db: DatabaseConnection, key: SecretKey, write_timeout: std::time::Duration) -> Self {
        let writer = Writer::spawn(db.clone(), write_timeout);
        let dispatch_writer = writer.another(&db);
        let (publisher, calls) = tokio::sync::mpsc::channel(1024);
        let queue: events::PublishQueue = std::sync::Arc::new(tokio::sync::Mutex::new(calls));
        let loops = if db.get_database_backend() == sea_orm::DbBackend::Postgres { PUBLISH_WRITERS } else { 1 };
        let writing = (loops > 1).then(|| std::sync::Arc::new(events::Writing::default()));
        let peers = std::sync::Arc::new(Peers::new());
        let sink = std::sync::Arc::new(std::sync::OnceLock::new());
        let publish_progress = std::sync::Arc::new(events::Progress::new(loops));
        let webhooks_generation = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        for i in 0..loops {
            // On PostgreSQL each loop has a writer of its own, so that its progress is its own
            // (`events::Progress`), not held up by other writes; SQLite has one writer.
            let w = writer.another(&db);
            let shared = events::Shared {
                queue: queue.clone(),
                writing: writing.clone(),
                peers: peers.clone(),
                sink: sink.clone(),
                progress: publish_progress.clone(),
                lane: i,
                webhooks: webhooks_generation.clone(),
            };
            tokio::spawn(events::publish_loop(w, shared));
        }
        Store {
            db,
            writer,
            dispatch_writer,
            key,
            publisher,
            peers,
            sink,
            claim_floors: Default::default(),
            publish_progress,
            webhooks_generation,
        }
    }

    /// A webhook was created, changed or deleted, here or on another replica: how many
    /// deliveries an event of its workspace makes may have changed.
    pub fn webhooks_changed(&self) {
        self.webhooks_generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Hands publishes to the dispatcher (once; later calls change nothing): see
    /// [`events::PublishSink`].
    pub fn set_sink(&self, sink: std::sync::Arc<dyn events::PublishSink>) {
        let _ = self.sink.set(sink);
    }

    /// Whether changes of many deliveries at once should report their ids
    /// ([`events::PublishSink::watched`]); a store without a dispatcher reports them.
    pub(crate) fn watched(&self) -> bool {
        self.sink.get().is_none_or(|sink| sink.watched())
    }
}

/// How often a replica on PostgreSQL tells the others it is there (`NOTIFY herald_wake`).
pub const PEER_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(10);
/// A replica not heard for this long is taken to be gone: three heartbeats missed.
const PEER_SILENCE_MS: i64 = 35_000;
/// How long a replica whose listener has just connected keeps waking others before it may find
/// itself alone: the others answer its announcement at once ([`Peers::heard_from`]).
pub const PEER_GRACE_MS: i64 = 1_000;

/// This control plane among the replicas on one PostgreSQL: its id, and whether any other is
/// running. Replicas wake each other with `NOTIFY` on every publish and result, which costs each
/// a statement, a wake-up of every listening server process and of every replica's listener. A
/// replica alone skips them: one whose listener is connected (it would hear the others) and has
/// heard no other replica's notification or heartbeat for [`PEER_SILENCE_MS`], nor in the
/// [`PEER_GRACE_MS`] since its listener connected. A replica that hears an id it does not know
/// announces itself at once, so a replica that starts learns of the others within a round trip.
pub struct Peers {
    /// The payload of this replica's `herald_wake` notifications, which its own listener skips.
    pub id: String,
    /// When another replica was last heard, in ms since the epoch (0: never).
    heard_at: std::sync::atomic::AtomicI64,
    /// The other replicas' ids heard so far (forgotten all at once past 1,024).
    known: std::sync::Mutex<HashSet<String>>,
    /// Whether this replica's listener is connected and listening.
    listening: std::sync::atomic::AtomicBool,
}

impl Peers {
    fn new() -> Peers {
        Peers {
            id: herald_shared::ids::new_id("cp"),
            heard_at: std::sync::atomic::AtomicI64::new(0),
            known: std::sync::Mutex::default(),
            listening: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Replica `id` (another one) was heard at `now`. Says whether it is one not heard before,
    /// which this replica then answers with an announcement of its own.
    pub fn heard_from(&self, id: &str, now: i64) -> bool {
        self.heard_at.fetch_max(now, std::sync::atomic::Ordering::Relaxed);
        let mut known = self.known.lock().expect("peers lock");
        if known.contains(id) {
            return false;
        }
        if known.len() >= 1024 {
            known.clear();
        }
        known.insert(id.to_owned())
    }

    /// The listener connected (`true`) or lost its connection (`false`): while it is not
    /// listening, this replica cannot know that it is alone, nor for [`PEER_GRACE_MS`] after it
    /// connects again (notifications sent meanwhile were lost).
    pub fn set_listening(&self, on: bool, now: i64) {
        let was = self.listening.swap(on, std::sync::atomic::Ordering::Relaxed);
        if on && !was {
            self.heard_at.fetch_max(now - PEER_SILENCE_MS + PEER_GRACE_MS, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Whether other replicas may be running at `now`, and so must be woken.
    pub fn others(&self, now: i64) -> bool {
        !self.listening.load(std::sync::atomic::Ordering::Relaxed)
            || now - self.heard_at.load(std::sync::atomic::Ordering::Relaxed) < PEER_SILENCE_MS
    }

    /// `pg_notify('herald_wake', '<id>')`: wakes the other replicas' dispatchers (when its
    /// transaction commits) and tells them this replica is there. Sent with publishes and
    /// results, and as the heartbeat.
    pub fn announcement(&self) -> sea_orm::Statement {
        notify(events::WAKE_CHANNEL, self.id.clone())
    }
}

/// `SELECT pg_notify(channel, payload)` (PostgreSQL): delivered to listeners when its transaction
/// commits, or at once outside one.
pub fn notify(channel: &str, payload: String) -> sea_orm::Statement {
    sea_orm::Statement::from_sql_and_values(
        sea_orm::DbBackend::Postgres,
        "SELECT pg_notify($1, $2)",
        [channel.into(), payload.into()],
    )
}

/// Wakes the dispatchers of the other replicas on the same PostgreSQL when `txn` commits
/// ([`Peers::announcement`], delivered on commit), if there are any ([`Peers::others`]); nothing on
/// SQLite. The payload names this replica, whose own listener skips it: its dispatcher is woken
/// directly, and an echo would cost it an extra dispatch round that finds nothing.
pub(crate) async fn wake_others(txn: &impl sea_orm::ConnectionTrait, peers: &Peers) -> Result<(), StoreError> {
    if txn.get_database_backend() == sea_orm::DbBackend::Postgres && peers.others(now_millis()) {
        txn.execute_raw(peers.announcement()).await?;
    }
    Ok(())
}

/// Tells the other replicas on the same PostgreSQL, when `txn` commits, that webhook `id` changed
/// (`pg_notify('herald_webhooks', '<replica> <id>')`): they drop what their dispatchers cached of
/// it (URL, secrets, headers, transform) and look for work again (a resumed webhook's deliveries).
/// Nothing on SQLite. Sent whether or not other replicas are known: changes are rare, and a
/// replica that has not announced itself yet may already have cached the webhook.
pub(crate) async fn webhook_changed(
    txn: &impl sea_orm::ConnectionTrait,
    peers: &Peers,
    id: &str,
) -> Result<(), StoreError> {
    if txn.get_database_backend() == sea_orm::DbBackend::Postgres {
        txn.execute_raw(notify(webhooks::WEBHOOKS_CHANNEL, format!("{} {id}", peers.id))).await?;
    }
    Ok(())
}

/// Milliseconds since the Unix epoch, now.
pub fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
