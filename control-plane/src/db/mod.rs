//! The database: connecting to SQLite or PostgreSQL with the settings Herald's promises need,
//! the entities and the migrations. It knows nothing of gRPC.
//!
//! Architecture invariant: every acknowledged write is durable. SQLite runs in WAL mode with
//! `synchronous = FULL` (the WAL is fsync'd at every commit); PostgreSQL keeps its server's
//! `synchronous_commit`. Throughput comes from group commit in `crate::store::writer`, not from
//! weaker sync settings.

pub mod entity;
pub mod migration;

use std::str::FromStr;
use std::time::Duration;

use sea_orm::sqlx::postgres::PgConnectOptions;
use sea_orm::sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, SqlxPostgresConnector, SqlxSqliteConnector};
use sea_orm_migration::MigratorTrait;

/// How long a call waits for a pooled connection, and a new connection to open, before answering
/// UNAVAILABLE rather than hanging.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// The default of `--publish-timeout`: how long a publish waits on a write that makes no
/// progress before answering `UNAVAILABLE` (`store::events::Progress`). An unreachable database
/// is a quick, retryable error, never a hang (the event may or may not have been stored;
/// publishing it again with the same id is safe).
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// PostgreSQL's `statement_timeout` for every Herald statement.
pub const STATEMENT_TIMEOUT: &str = "15s";
/// SQLite's automatic checkpoint runs in the committing connection once the WAL holds this many
/// pages (16 MiB; SQLite's default is 1,000). The writer's checkpointer keeps the WAL well below
/// it, so this one only bounds the WAL, and finds little left to copy when it runs.
pub const WAL_AUTOCHECKPOINT_PAGES: u32 = 4096;

/// Rows a SQLite connection's thread may hand over before the task reading them takes any. sqlx
/// passes each row of a result from that thread to the reading task through a channel of 50 by
/// default: a claim of 256 rows or a settle of up to 512 then stopped the thread each time the
/// channel was full and woke it for every row taken off (docs/BENCHMARKS.md, item 32). With more
/// room than a claim or a settle returns, the thread runs those statements through; every query
/// collects its rows anyway, so the room only lets the thread run ahead of the reader.
const ROW_CHANNEL: usize = 2048;

/// Opens a pool for `url` (`sqlite://path` or `postgres://…`). A SQLite file is created when
/// missing.
pub async fn connect(url: &str) -> Result<DatabaseConnection, DbErr> {
    open(url, true).await
}

/// Opens a database that must exist already: for commands that manage what a control plane
/// stored (`keys list`, `keys revoke`, `rekey`), where a SQLite path that names no file is a
/// mistyped `--database-url`, not a new, empty database to create and answer from.
pub async fn connect_existing(url: &str) -> Result<DatabaseConnection, DbErr> {
    open(url, false).await
}

async fn open(url: &str, create: bool) -> Result<DatabaseConnection, DbErr> {
    if url.starts_with("sqlite:") {
        let opts =
            SqliteConnectOptions::from_str(url).map_err(|e| DbErr::Custom(format!("invalid SQLite URL: {e}")))?;
        let path = opts.get_filename();
        if !create && !path.exists() {
            let in_memory = path.to_string_lossy().contains("sqlx-in-memory") || path.as_os_str() == ":memory:";
            return Err(DbErr::Custom(if in_memory {
                "an in-memory SQLite database holds nothing to manage: give the file a control plane uses".to_owned()
            } else {
                format!(
                    "no SQLite database at {}: check --database-url (HERALD_DATABASE_URL)",
                    std::path::absolute(path).unwrap_or_else(|_| path.to_owned()).display()
                )
            }));
        }
        let opts = opts
            .create_if_missing(create)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(ACQUIRE_TIMEOUT)
            .foreign_keys(true)
            .pragma("temp_store", "memory")
            .pragma("cache_size", "-16000")
            .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES.to_string())
            .row_buffer_size(ROW_CHANNEL);
        let pool = sea_orm::sqlx::pool::PoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            // A SQLite connection is a file handle in this process: it cannot go stale the way a
            // network connection can, and testing it before each use cost a round trip to its
            // thread.
            .test_before_acquire(false)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(opts)
            .await
            .map_err(|e| DbErr::Conn(sea_orm::RuntimeErr::Internal(e.to_string())))?;
        Ok(SqlxSqliteConnector::from_sqlx_sqlite_pool(pool))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        let opts = PgConnectOptions::from_str(url)
            .map_err(|e| DbErr::Custom(format!("invalid PostgreSQL URL: {e}")))?
            .options([
                ("statement_timeout", STATEMENT_TIMEOUT),
                // Every statement planned for its values: a generic plan of `id IN ($1 … $n)`
                // knows no selectivity, and on a growing table whose statistics lag it chose
                // to scan the table (events: 100+ ms per dispatch batch with a backlog).
                ("plan_cache_mode", "force_custom_plan"),
            ])
            .application_name("herald")
            // Statements kept prepared per connection (sqlx keeps 100): the hot paths' texts
            // come in shapes (padded `IN` lists, claims by floor, inserts by which columns vary
            // within a batch, `insert::unnest`), and a text let out of the cache costs a parse
            // round trip when it comes back. Each is a parse tree on the server, not a plan
            // (`force_custom_plan`).
            .statement_cache_capacity(512);
        let pool = sea_orm::sqlx::pool::PoolOptions::new()
            .max_connections(16)
            .min_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .idle_timeout(Duration::from_secs(300))
            .connect_with(opts)
            .await
            .map_err(|e| DbErr::Conn(sea_orm::RuntimeErr::Internal(e.to_string())))?;
        Ok(SqlxPostgresConnector::from_sqlx_postgres_pool(pool))
    } else {
        Err(DbErr::Custom(format!(
            "unsupported database URL {:?}: use sqlite://… or postgres://…",
            crate::config::redact_url(url)
        )))
    }
}

/// Applies every pending migration.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    migration::Migrator::up(db, None).await
}

/// A cheap round trip, for `/readyz`.
pub async fn ping(db: &DatabaseConnection) -> Result<(), DbErr> {
    db.execute_unprepared("SELECT 1").await.map(|_| ())
}

/// The durability setting in force, for logs and benchmarks.
pub async fn sync_setting(db: &DatabaseConnection) -> Result<String, DbErr> {
    let sql = match db.get_database_backend() {
        DbBackend::Sqlite => "PRAGMA synchronous",
        _ => "SHOW synchronous_commit",
    };
    let row = db.query_one_raw(sea_orm::Statement::from_string(db.get_database_backend(), sql)).await?;
    let value = match row {
        Some(row) => match db.get_database_backend() {
            DbBackend::Sqlite => match row.try_get_by_index::<i32>(0)? {
                0 => "sqlite synchronous=OFF".to_owned(),
                1 => "sqlite synchronous=NORMAL".to_owned(),
                2 => "sqlite synchronous=FULL".to_owned(),
                n => format!("sqlite synchronous={n}"),
            },
            _ => format!("postgres synchronous_commit={}", row.try_get_by_index::<String>(0)?),
        },
        None => "unknown".to_owned(),
    };
    Ok(value)
}

/// The file of a `sqlite://` URL (none for PostgreSQL or an in-memory database).
pub fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:").then(|| std::path::PathBuf::from(path))
}

/// Takes the lock that makes a SQLite database serve one control plane at a time (`<db>.lock`,
/// an advisory file lock the OS releases when the process ends, even on SIGKILL). `herald migrate`
/// and `herald keys create` do not take it and work beside a running control plane.
pub fn lock_single_server(db: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let path = std::path::PathBuf::from(format!("{}.lock", db.display()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(anyhow::anyhow!(
            "another control plane is already serving {} (it holds {}): a SQLite database serves one \
             control plane; use PostgreSQL to run several",
            db.display(),
            path.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(anyhow::anyhow!("cannot lock {}: {e}", path.display())),
    }
}
