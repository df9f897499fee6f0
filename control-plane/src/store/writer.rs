//! Group commit: a writer task owns the writes handed to it. On SQLite one writer takes every
//! write; on PostgreSQL the dispatcher and a second publish loop have writers of their own
//! (`Writer::another`), whose transactions commit beside this one's.
//!
//! Callers hand the writer a closure that runs inside a transaction. The writer takes every
//! operation that is waiting (up to `MAX_BATCH`), runs each in its own savepoint of one
//! transaction per kind, commits once per kind, and only then answers each caller: the relaxed
//! operations of a batch (`write_relaxed`) first, then the durable ones. Many concurrent
//! publishes thus share one fsync, and no caller is told "done" before its rows are durable.
//!
//! On SQLite this is also the only way to write well: one writer never meets `SQLITE_BUSY` from
//! itself. A failed operation rolls back to its savepoint and fails alone; a failed commit fails
//! every operation of its transaction (nothing of any of them is written).
//!
//! On SQLite the writer does not copy the WAL back into the database file itself: a checkpointer
//! beside it does, from a pooled connection, so that a commit never waits for a checkpoint's
//! copying and fsync. SQLite's own automatic checkpoint stays on, at a larger size
//! (`db::WAL_AUTOCHECKPOINT_PAGES`), to bound the WAL: it finds little left to copy.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, SqliteTransactionMode, TransactionOptions,
    TransactionTrait,
};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::StoreError;

/// Operations committed together at most.
const MAX_BATCH: usize = 512;
/// Operations that may wait for the writer before callers feel back-pressure.
const QUEUE: usize = 4096;
/// The longest a batch may go without moving (`--write-timeout`): no step of the writer's own
/// (begun, an operation run, committing) and no statement an operation marks ([`Moves`]). Past
/// it, the batch is abandoned (rolled back if not yet committed), its callers are told the outcome
/// is unknown (a commit cut short may have happened), and the writer moves on: a database that
/// stops answering must never hang every write behind it. A batch that keeps moving is waited
/// for, however long it takes: a large publish is not refused for its size.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest a caller waits for room in the queue.
const ENQUEUE_TIMEOUT: Duration = Duration::from_secs(10);
/// On SQLite, the checkpointer copies committed WAL pages into the database file at most this
/// often.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);

/// One queued write: runs in the batch's transaction, then learns the batch's fate.
trait Operation: Send {
    /// Runs the write; says whether it succeeded (a failed one is rolled back alone).
    fn run<'t>(&'t mut self, txn: &'t DatabaseTransaction) -> BoxFuture<'t, bool>;
    /// Answers the caller: its own result if the batch committed, otherwise the commit's error.
    fn finish(self: Box<Self>, outcome: Result<(), StoreError>);
    /// Whether a caller is acknowledged on the strength of this write (then its batch is synced
    /// to disk at commit).
    fn durable(&self) -> bool;
}

type WriteFn<T> = Box<dyn for<'t> FnOnce(&'t DatabaseTransaction) -> BoxFuture<'t, Result<T, StoreError>> + Send>;

struct Pending<T> {
    durable: bool,
    f: Option<WriteFn<T>>,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T: Send + 'static> Operation for Pending<T> {
    fn run<'t>(&'t mut self, txn: &'t DatabaseTransaction) -> BoxFuture<'t, bool> {
        Box::pin(async move {
            let Some(f) = self.f.take() else { return false };
            let result = f(txn).await;
            let ok = result.is_ok();
            self.result = Some(result);
            ok
        })
    }

    fn durable(&self) -> bool {
        self.durable
    }

    fn finish(self: Box<Self>, outcome: Result<(), StoreError>) {
        let answer = match (self.result, outcome) {
            (Some(Err(own)), _) => Err(own),
            (_, Err(commit)) => Err(commit),
            (Some(Ok(value)), Ok(())) => Ok(value),
            (None, Ok(())) => Err(StoreError::Unavailable("the write did not run".into())),
        };
        let _ = self.reply.send(answer);
    }
}

type Op = Box<dyn Operation>;

/// Labels of `herald_db_commits_total`: `durable` commits waited for the disk, `relaxed` ones
/// did not (only leases and results).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommitLabels {
    pub sync: &'static str,
}

/// Committed write transactions, by whether they were synced to disk.
pub type Commits = Family<CommitLabels, Counter>;

/// When a writer's batch last moved (and, in `events::Progress`, a publish loop). The writer marks
/// each step of its own; an operation that runs many statements marks each that finishes
/// ([`Writer::moves`]), so that a long write that keeps moving is told from one the database
/// stopped answering.
#[derive(Clone)]
pub(crate) struct Moves(Arc<MovesSince>);

struct MovesSince {
    origin: std::time::Instant,
    /// Milliseconds from `origin` to the last move.
    last: std::sync::atomic::AtomicU64,
}

impl Moves {
    pub(crate) fn new() -> Moves {
        Moves(Arc::new(MovesSince { origin: std::time::Instant::now(), last: Default::default() }))
    }

    /// The batch moved now.
    pub(crate) fn mark(&self) {
        let now = u64::try_from(self.0.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last.fetch_max(now, Ordering::SeqCst);
    }

    /// When it last moved (when it was made, if never since).
    pub(crate) fn last(&self) -> std::time::Instant {
        self.0.origin + Duration::from_millis(self.0.last.load(Ordering::SeqCst))
    }

    /// The instant `timeout` after the last move; `None` if no instant can hold it.
    fn deadline(&self, timeout: Duration) -> Option<std::time::Instant> {
        self.last().checked_add(timeout)
    }
}

/// A handle to the writer task. Cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Op>,
    /// Transactions committed, durable or relaxed (exported as `herald_db_commits_total`).
    pub commits: Commits,
    moves: Moves,
    timeout: Duration,
}

impl Writer {
    /// Starts the writer task on `db`, which abandons a batch that has not moved for `timeout`
    /// ([`WRITE_TIMEOUT`] by default). It ends when every handle is dropped.
    pub fn spawn(db: DatabaseConnection, timeout: Duration) -> Writer {
        let commits = Commits::default();
        for sync in ["durable", "relaxed"] {
            commits.get_or_create(&CommitLabels { sync }).inc_by(0);
        }
        Self::spawn_counting(db, commits, timeout)
    }

    /// What an operation marks when a statement of its own finishes, so that a write of many
    /// statements is bounded by its progress rather than by its length.
    pub(crate) fn moves(&self) -> Moves {
        self.moves.clone()
    }

    /// Another writer, counting its commits with this one's. On PostgreSQL it is a writer task of
    /// its own, committing on its own connection beside this one, so that (say) dispatching
    /// never queues behind publishes' commits and both keep the server busy; that is safe where
    /// replicas already write concurrently (every dispatcher write is fenced by lease, claims lock
    /// with `SKIP LOCKED`, publishes of one id at once conflict on the key). On SQLite, which
    /// takes one writer at a time, it is this writer.
    pub fn another(&self, db: &DatabaseConnection) -> Writer {
        match db.get_database_backend() {
            DbBackend::Postgres => Self::spawn_counting(db.clone(), self.commits.clone(), self.timeout),
            _ => self.clone(),
        }
    }

    fn spawn_counting(db: DatabaseConnection, commits: Commits, timeout: Duration) -> Writer {
        let (tx, rx) = mpsc::channel(QUEUE);
        let moves = Moves::new();
        tokio::spawn(run(db, rx, commits.clone(), moves.clone(), timeout));
        Writer { tx, commits, moves, timeout }
    }

    /// Runs `f` in a transaction shared with other writes and returns its result once committed
    /// and synced to disk.
    pub async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'t> FnOnce(&'t DatabaseTransaction) -> BoxFuture<'t, Result<T, StoreError>> + Send + 'static,
    {
        self.submit(true, Box::new(f)).await
    }

    /// Like `write`, for writes that acknowledge nothing to a client (leases, attempt results):
    /// they commit in a transaction of their own, before the durable writes of their batch,
    /// without waiting for the disk (SQLite `synchronous=NORMAL` in WAL mode, PostgreSQL
    /// `synchronous_commit=off`). A process crash loses nothing; a power loss may lose the last
    /// of them, which at-least-once delivery absorbs (a lease expires, an attempt is made again).
    /// The next durable commit syncs them.
    pub async fn write_relaxed<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'t> FnOnce(&'t DatabaseTransaction) -> BoxFuture<'t, Result<T, StoreError>> + Send + 'static,
    {
        self.submit(false, Box::new(f)).await
    }

    async fn submit<T: Send + 'static>(&self, durable: bool, f: WriteFn<T>) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let op: Op = Box::new(Pending { durable, f: Some(f), result: None, reply });
        match tokio::time::timeout(ENQUEUE_TIMEOUT, self.tx.send(op)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(StoreError::Unavailable("the writer has stopped".into())),
            Err(_) => return Err(StoreError::Unavailable("the writer is overloaded".into())),
        }
        // A dropped answer means the batch stalled or failed unexpectedly mid-way.
        answer.await.map_err(|_| StoreError::Unavailable("the write was interrupted; its outcome is unknown".into()))?
    }
}

/// The writer has a connection of its own, so that it can set the sync level between batches
/// and keep it for the next (SQLite refuses to switch inside a transaction; on PostgreSQL a
/// session-level `SET` saves the `SET LOCAL` each relaxed batch would pay), and never competes
/// with readers for one. Returns the connection, and whether relaxed batches may relax the sync
/// level at all: on SQLite only on a connection of its own, where the level set before a batch is
/// certainly the one its commit uses. Whether the connection is the writer's own is the third.
async fn own_connection(db: DatabaseConnection, fresh: Arc<AtomicBool>) -> (DatabaseConnection, bool, bool) {
    // Every connection the writer's pool opens (the first, and any after one was lost or
    // recycled) starts at its default level, whatever the writer last set on the one before.
    macro_rules! mark_fresh {
        () => {{
            let fresh = fresh.clone();
            move |_: &mut _, _| {
                fresh.store(true, Ordering::SeqCst);
                Box::pin(async { Ok(()) })
            }
        }};
    }
    let own = match db.get_database_backend() {
        DbBackend::Sqlite => {
            let options = (*db.get_sqlite_connection_pool().connect_options()).clone();
            sea_orm::sqlx::pool::PoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .test_before_acquire(false)
                .acquire_timeout(crate::db::ACQUIRE_TIMEOUT)
                .after_connect(mark_fresh!())
                .connect_with(options)
                .await
                .map(sea_orm::SqlxSqliteConnector::from_sqlx_sqlite_pool)
        }
        _ => {
            let options = (*db.get_postgres_connection_pool().connect_options()).clone();
            sea_orm::sqlx::pool::PoolOptions::new()
                .max_connections(1)
                .min_connections(0)
                .acquire_timeout(crate::db::ACQUIRE_TIMEOUT)
                .idle_timeout(std::time::Duration::from_secs(300))
                .after_connect(mark_fresh!())
                .connect_with(options)
                .await
                .map(sea_orm::SqlxPostgresConnector::from_sqlx_postgres_pool)
        }
    };
    match own {
        Ok(own) => (own, true, true),
        // PostgreSQL relaxes each batch with `SET LOCAL` on the shared pool instead.
        Err(e) if db.get_database_backend() != DbBackend::Sqlite => {
            tracing::warn!(error = %e, "cannot open the writer's own PostgreSQL connection; sharing the pool");
            (db, true, false)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the writer's own SQLite connection; sharing the pool, every commit synced");
            (db, false, false)
        }
    }
}

async fn run(db: DatabaseConnection, mut rx: mpsc::Receiver<Op>, commits: Commits, moves: Moves, timeout: Duration) {
    let pool = db.clone();
    let fresh = Arc::new(AtomicBool::new(true));
    let (db, may_relax, own) = own_connection(db, fresh.clone()).await;
    // The checkpointer lives as long as the writer.
    let committed = Arc::new(Notify::new());
    let _checkpointer = (db.get_database_backend() == DbBackend::Sqlite).then(|| {
        let stop = CancellationToken::new();
        tokio::spawn(checkpoint_loop(pool, committed.clone(), stop.clone()));
        stop.drop_guard()
    });
    let mut sync = SyncLevel::default();
    let mut batch: Vec<Op> = Vec::with_capacity(MAX_BATCH);
    loop {
        if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let ops = std::mem::take(&mut batch);
        // Leases and results that need no sync go first, in a transaction of their own, rather
        // than wait for the durable writes beside them (a large publish and its fsync): the
        // dispatcher's next claim waits for one write, not two (docs/BENCHMARKS.md item 50).
        let (relaxed, durable): (Vec<Op>, Vec<Op>) =
            if may_relax { ops.into_iter().partition(|op| !op.durable()) } else { (Vec::new(), ops) };
        let mut stalled = false;
        for ops in [relaxed, durable] {
            if ops.is_empty() {
                continue;
            }
            if stalled {
                // The database stopped answering the first half: the second is not begun, so its
                // callers are not kept waiting a second bound.
                fail_all(ops, &StoreError::Unavailable("the database stopped answering; nothing was written".into()));
                continue;
            }
            let n = ops.len();
            // Dropping the batch when it stalls or panics drops its transaction (rolled back if
            // not yet committed) and its answer channels, which tells each caller the outcome is
            // unknown.
            moves.mark();
            let conn = Conn { db: &db, may_relax, own, fresh: &fresh };
            let work =
                std::panic::AssertUnwindSafe(commit_batch(conn, ops, &commits, &mut sync, &moves)).catch_unwind();
            match until_stalled(work, &moves, timeout).await {
                Some(Ok(())) => committed.notify_one(),
                Some(Err(_)) => tracing::error!(operations = n, "a write panicked; its batch was abandoned"),
                None => {
                    stalled = true;
                    tracing::error!(operations = n, ?timeout, "a write batch made no progress; abandoned");
                }
            }
        }
    }
}

/// Runs `work` until it ends, or until `moves` has not moved for `timeout`: then `None`.
async fn until_stalled<T>(work: impl std::future::Future<Output = T>, moves: &Moves, timeout: Duration) -> Option<T> {
    until(work, || moves.deadline(timeout)).await
}

/// Runs `work` until it ends, or until the instant `deadline` gives has passed, asked again each
/// time the one it gave before passes (progress moves it on): then `None`. No instant (a timeout
/// too long to add to one) bounds nothing.
pub(crate) async fn until<T>(
    work: impl std::future::Future<Output = T>,
    deadline: impl Fn() -> Option<std::time::Instant>,
) -> Option<T> {
    let mut work = std::pin::pin!(work);
    loop {
        let Some(at) = deadline() else { return Some(work.await) };
        if let Ok(done) = tokio::time::timeout_at(at.into(), work.as_mut()).await {
            return Some(done);
        }
        if deadline().is_some_and(|at| at <= std::time::Instant::now()) {
            return None;
        }
    }
}

/// Copies the WAL's committed pages into the SQLite database file, on a pooled connection, a
/// little after each commit (`CHECKPOINT_EVERY` at most): a passive checkpoint, which never blocks
/// the writer nor waits for readers. With the connection at `synchronous = FULL` it syncs the WAL
/// before copying and the database file after, so it never makes a commit less durable.
async fn checkpoint_loop(db: DatabaseConnection, committed: Arc<Notify>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = committed.notified() => {}
            _ = stop.cancelled() => return,
        }
        if let Err(e) = db.execute_unprepared("PRAGMA wal_checkpoint(PASSIVE)").await {
            tracing::debug!(error = %e, "checkpoint failed; the next commit tries again");
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECKPOINT_EVERY) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// The sync level the writer last set on its connection, so that a batch at the same level as the
/// one before it skips the `PRAGMA` or `SET` (one statement less per commit). Unknown at start,
/// while a `PRAGMA` or `SET` runs (a batch cut short there leaves it unknown) and after a batch
/// failed to begin, and whenever the writer's pool opened a connection (the level set on the one
/// before is gone). A connection the pool opens anew starts durable (SQLite `FULL`, set by
/// `db::connect`; PostgreSQL the server's `synchronous_commit`, which `Full` stands for), so a
/// level stale for a moment can only make a commit more durable, never less.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum SyncLevel {
    #[default]
    Unknown,
    Full,
    Normal,
}

/// Begins the batch's transaction; on SQLite `BEGIN IMMEDIATE`, so that a batch that reads before
/// it writes cannot fail half-way with `SQLITE_BUSY` against another process (`herald keys create`).
async fn begin(
    db: &DatabaseConnection,
    durable: bool,
    own: bool,
    fresh: &AtomicBool,
    sync: &mut SyncLevel,
) -> Result<DatabaseTransaction, sea_orm::DbErr> {
    if fresh.swap(false, Ordering::SeqCst) {
        *sync = SyncLevel::Unknown;
    }
    match db.get_database_backend() {
        DbBackend::Sqlite => {
            // The writer's single connection: the level set here applies to this batch's commit.
            set_level(db, durable, sync, ["PRAGMA synchronous = FULL", "PRAGMA synchronous = NORMAL"]).await?;
            let txn = db
                .begin_with_options(TransactionOptions {
                    sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                    ..Default::default()
                })
                .await?;
            if fresh.swap(false, Ordering::SeqCst) {
                // Opened for this very transaction, at `FULL`: this batch commits synced, and the
                // next sets its level again.
                *sync = SyncLevel::Unknown;
            }
            Ok(txn)
        }
        _ if own => {
            // The writer's own session: the level set here lasts until it is set again.
            set_level(db, durable, sync, ["SET synchronous_commit TO DEFAULT", "SET synchronous_commit = off"]).await?;
            let txn = db.begin().await?;
            if fresh.swap(false, Ordering::SeqCst) {
                // The connection was opened for this very transaction, at the server's level.
                *sync = SyncLevel::Unknown;
                if !durable {
                    txn.execute_unprepared("SET LOCAL synchronous_commit = off").await?;
                }
            }
            Ok(txn)
        }
        _ => {
            let txn = db.begin().await?;
            if !durable {
                txn.execute_unprepared("SET LOCAL synchronous_commit = off").await?;
            }
            Ok(txn)
        }
    }
}

/// Sets the sync level on the writer's own connection with `statements` (durable, relaxed),
/// unless it is the level set last.
async fn set_level(
    db: &DatabaseConnection,
    durable: bool,
    sync: &mut SyncLevel,
    statements: [&str; 2],
) -> Result<(), sea_orm::DbErr> {
    let want = if durable { SyncLevel::Full } else { SyncLevel::Normal };
    if *sync != want {
        *sync = SyncLevel::Unknown;
        db.execute_unprepared(statements[usize::from(!durable)]).await?;
        *sync = want;
    }
    Ok(())
}

fn fail_all(ops: impl IntoIterator<Item = Op>, err: &StoreError) {
    for op in ops {
        op.finish(Err(err.clone()));
    }
}

/// The writer's connection, as `own_connection` found it.
#[derive(Clone, Copy)]
struct Conn<'a> {
    db: &'a DatabaseConnection,
    may_relax: bool,
    own: bool,
    fresh: &'a AtomicBool,
}

async fn commit_batch(conn: Conn<'_>, ops: Vec<Op>, commits: &Commits, sync: &mut SyncLevel, moves: &Moves) {
    let Conn { db, may_relax, own, fresh } = conn;
    let durable = !may_relax || ops.iter().any(|op| op.durable());
    let committed = || {
        commits.get_or_create(&CommitLabels { sync: if durable { "durable" } else { "relaxed" } }).inc();
    };
    let txn = match begin(db, durable, own, fresh, sync).await {
        Ok(txn) => txn,
        Err(e) => {
            *sync = SyncLevel::Unknown;
            let err = StoreError::from(e);
            tracing::warn!(error = %err, "cannot begin a write transaction");
            return fail_all(ops, &err);
        }
    };
    moves.mark();
    if ops.len() == 1 {
        // A lone operation needs no savepoint: its failure rolls the whole transaction back.
        let mut op = ops.into_iter().next().expect("one operation");
        if op.run(&txn).await {
            moves.mark();
            let outcome = txn.commit().await.map_err(StoreError::from);
            if outcome.is_ok() {
                committed();
            }
            op.finish(outcome);
        } else {
            let _ = txn.rollback().await;
            op.finish(Ok(()));
        }
        return;
    }
    let mut done: Vec<Op> = Vec::with_capacity(ops.len());
    let mut ops = ops.into_iter();
    while let Some(mut op) = ops.next() {
        let savepoint = match txn.begin().await {
            Ok(sp) => sp,
            Err(e) => {
                let err = StoreError::from(e);
                let _ = txn.rollback().await;
                fail_all(done.into_iter().chain(std::iter::once(op)).chain(ops), &err);
                return;
            }
        };
        let ok = op.run(&savepoint).await;
        let end = if ok { savepoint.commit().await } else { savepoint.rollback().await };
        if let Err(e) = end {
            let err = StoreError::from(e);
            let _ = txn.rollback().await;
            fail_all(done.into_iter().chain(std::iter::once(op)).chain(ops), &err);
            return;
        }
        moves.mark();
        if ok {
            done.push(op);
        } else {
            op.finish(Ok(()));
        }
    }
    let outcome = txn.commit().await.map_err(StoreError::from);
    match &outcome {
        Ok(()) => committed(),
        Err(e) => tracing::warn!(error = %e, operations = done.len(), "group commit failed"),
    }
    for op in done {
        op.finish(outcome.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::{ConnectionTrait, Statement};

    /// The SQLite level a batch runs under, read from inside its own transaction.
    fn read_level(txn: &DatabaseTransaction) -> BoxFuture<'_, Result<i64, StoreError>> {
        Box::pin(async move {
            let row = txn
                .query_one_raw(Statement::from_string(DbBackend::Sqlite, "PRAGMA synchronous"))
                .await?
                .expect("a row");
            row.try_get_by_index::<i64>(0).map_err(|e| StoreError::Internal(e.to_string()))
        })
    }

    async fn level_in(writer: &Writer, durable: bool) -> i64 {
        if durable { writer.write(read_level).await.unwrap() } else { writer.write_relaxed(read_level).await.unwrap() }
    }

    /// Skipping the `PRAGMA` when the level is unchanged never lets a durable batch commit at
    /// `NORMAL`, nor a relaxed one pay for `FULL`, whatever order they come in.
    #[tokio::test]
    async fn each_batch_commits_at_its_own_sync_level() {
        const NORMAL: i64 = 1;
        const FULL: i64 = 2;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("w.db").display());
        let writer = Writer::spawn(crate::db::connect(&url).await.unwrap(), WRITE_TIMEOUT);
        for (durable, want) in
            [(true, FULL), (true, FULL), (false, NORMAL), (false, NORMAL), (true, FULL), (false, NORMAL)]
        {
            assert_eq!(level_in(&writer, durable).await, want, "durable: {durable}");
        }
        let commits = |sync| writer.commits.get_or_create(&CommitLabels { sync }).get();
        assert_eq!((commits("durable"), commits("relaxed")), (3, 3));
    }

    /// Relaxed writes (leases, results) queued beside a durable one are committed and answered
    /// first, in a transaction of their own, not after the durable write's work and sync; each
    /// kind still commits at its own level.
    #[tokio::test]
    async fn relaxed_writes_do_not_wait_for_the_durable_ones_beside_them() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let writer = Writer::spawn(crate::db::connect(&url).await.unwrap(), WRITE_TIMEOUT);
        writer.write(statement("CREATE TABLE t (n INTEGER)")).await.unwrap();
        fn held(gate: oneshot::Receiver<()>) -> WriteFn<i64> {
            Box::new(move |txn| {
                Box::pin(async move {
                    txn.execute_unprepared("INSERT INTO t VALUES (1)").await?;
                    let _ = gate.await;
                    read_level(txn).await
                })
            })
        }
        // The first write holds the writer while the next two queue: they make one batch.
        let (open_first, first_gate) = oneshot::channel();
        let (open_second, second_gate) = oneshot::channel();
        let first = tokio::spawn({
            let writer = writer.clone();
            async move { writer.write(held(first_gate)).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let durable = tokio::spawn({
            let writer = writer.clone();
            async move { writer.write(held(second_gate)).await }
        });
        let relaxed = tokio::spawn({
            let writer = writer.clone();
            async move { writer.write_relaxed(read_level).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        open_first.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), 2);
        let level = tokio::time::timeout(Duration::from_secs(10), relaxed).await;
        let level = level.expect("answered while the durable write beside it still runs").unwrap().unwrap();
        assert_eq!(level, 1, "at NORMAL");
        assert!(!durable.is_finished(), "the durable write is still held");
        open_second.send(()).unwrap();
        assert_eq!(durable.await.unwrap().unwrap(), 2, "at FULL");
    }

    /// When the relaxed half of a batch stops moving, the durable half is not begun: its callers
    /// are told at once that nothing was written, not kept for a second bound.
    #[tokio::test]
    async fn a_stalled_first_half_fails_the_second_unbegun() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("s.db").display());
        let writer = Writer::spawn(crate::db::connect(&url).await.unwrap(), Duration::from_millis(300));
        writer.write(statement("CREATE TABLE t (n INTEGER)")).await.unwrap();
        let (open, gate) = oneshot::channel::<()>();
        let first = tokio::spawn({
            let writer = writer.clone();
            async move {
                writer
                    .write(move |_txn| {
                        Box::pin(async move {
                            let _ = gate.await;
                            Ok(())
                        })
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ran = Arc::new(AtomicBool::new(false));
        let stuck = tokio::spawn({
            let writer = writer.clone();
            async move {
                writer
                    .write_relaxed(|_txn| {
                        Box::pin(async move {
                            std::future::pending::<()>().await;
                            Ok(())
                        })
                    })
                    .await
            }
        });
        let durable = tokio::spawn({
            let (writer, ran) = (writer.clone(), ran.clone());
            async move {
                writer
                    .write(move |txn| {
                        Box::pin(async move {
                            ran.store(true, Ordering::SeqCst);
                            txn.execute_unprepared("INSERT INTO t VALUES (1)").await.map(drop).map_err(StoreError::from)
                        })
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        open.send(()).unwrap();
        first.await.unwrap().unwrap();
        let stuck = stuck.await.unwrap();
        assert!(matches!(&stuck, Err(StoreError::Unavailable(m)) if m.contains("outcome is unknown")), "{stuck:?}");
        let durable = durable.await.unwrap();
        assert!(
            matches!(&durable, Err(StoreError::Unavailable(m)) if m.contains("nothing was written")),
            "{durable:?}"
        );
        assert!(!ran.load(Ordering::SeqCst), "the durable write was not begun");
        writer.write(statement("INSERT INTO t VALUES (2)")).await.expect("the writer goes on");
    }

    fn statement(sql: &'static str) -> WriteFn<()> {
        Box::new(move |txn| {
            Box::pin(async move { txn.execute_unprepared(sql).await.map(drop).map_err(StoreError::from) })
        })
    }

    /// Commits reach the database file although the WAL stays far below the size at which SQLite
    /// would checkpoint by itself: the checkpointer copied them.
    #[tokio::test]
    async fn the_checkpointer_copies_commits_into_the_database_file() {
        const WRITTEN: u64 = 2 << 20;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let writer =
            Writer::spawn(crate::db::connect(&format!("sqlite://{}", path.display())).await.unwrap(), WRITE_TIMEOUT);
        writer.write(statement("CREATE TABLE blobs (b BLOB)")).await.unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        // 2 MiB in 8 commits: 512 pages, an eighth of `WAL_AUTOCHECKPOINT_PAGES`.
        assert!(WRITTEN / 4096 * 8 <= u64::from(crate::db::WAL_AUTOCHECKPOINT_PAGES));
        for _ in 0..8 {
            writer.write(statement("INSERT INTO blobs SELECT randomblob(262144)")).await.unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let len = std::fs::metadata(&path).unwrap().len();
            if len >= before + WRITTEN {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the database file holds {len} bytes, {before} before");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A batch is bounded by its progress, not its length: a write that marks each statement
    /// outlasts the timeout three times over and commits; one that stops moving is abandoned
    /// (nothing of it committed, its caller told the outcome is unknown), and the writer goes on.
    #[tokio::test]
    async fn a_write_is_abandoned_only_when_it_stops_moving() {
        let timeout = Duration::from_millis(300);
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("m.db").display());
        let writer = Writer::spawn(crate::db::connect(&url).await.unwrap(), timeout);
        writer.write(statement("CREATE TABLE t (n INTEGER)")).await.unwrap();
        let moves = writer.moves();
        let started = std::time::Instant::now();
        writer
            .write(move |txn| {
                Box::pin(async move {
                    for i in 0..18 {
                        txn.execute_unprepared(&format!("INSERT INTO t VALUES ({i})")).await?;
                        moves.mark();
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Ok(())
                })
            })
            .await
            .expect("a write that keeps moving is waited for");
        assert!(started.elapsed() > timeout * 2, "the write took {:?}", started.elapsed());
        let stuck = writer.write(|txn| {
            Box::pin(async move {
                txn.execute_unprepared("INSERT INTO t VALUES (100)").await?;
                std::future::pending::<()>().await;
                Ok(())
            })
        });
        let answer = tokio::time::timeout(Duration::from_secs(20), stuck).await.expect("abandoned, not waited for");
        assert!(matches!(&answer, Err(StoreError::Unavailable(m)) if m.contains("outcome is unknown")), "{answer:?}");
        fn count(txn: &DatabaseTransaction) -> BoxFuture<'_, Result<(i64, i64), StoreError>> {
            Box::pin(async move {
                let row = txn
                    .query_one_raw(Statement::from_string(DbBackend::Sqlite, "SELECT count(*), max(n) FROM t"))
                    .await?
                    .expect("a row");
                let get = |i| row.try_get_by_index::<i64>(i).map_err(|e| StoreError::Internal(e.to_string()));
                Ok((get(0)?, get(1)?))
            })
        }
        let (rows, max) = writer.write(count).await.expect("the writer goes on");
        assert_eq!((rows, max), (18, 17), "nothing of the abandoned write");
    }
}
