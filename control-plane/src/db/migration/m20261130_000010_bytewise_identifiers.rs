//! On PostgreSQL, identifier columns compare bytewise (`COLLATE "C"`). Every delivery enters
//! about fifteen B-tree indexes keyed by identifiers (its insert, then a lease and a result, each
//! a new row version in every index, then its attempt), and with the database's default
//! collation each key comparison there goes through the C library's `strcoll`: about a tenth of
//! the server's CPU while delivering, even with a `C.UTF-8` default. Byte order is SQLite's, and
//! that of `C.UTF-8` for UTF-8 text; on a database with a linguistic default (`en_US.UTF-8`),
//! lists ordered by id follow byte order from here on.
//!
//! Every `varchar` column of Herald's tables holds an identifier or a code and changes here;
//! free text (names, URLs, bodies, headers) keeps the default collation. All tables change
//! together: an identifier compared with one of another table (`webhooks.id` with
//! `deliveries.webhook_id`) is compared in `C` if either side is, and an index in the default
//! collation cannot serve that comparison.
//!
//! The rows stay where they are, but each index on these columns is rebuilt, and the tables
//! analyzed again, under exclusive locks held until the migration commits: on a large database
//! the upgrade waits for that (OPERATIONS.md, Upgrading). SQLite compares bytewise already.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{DbBackend, Statement};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// Each table with its identifier columns.
const COLUMNS: [(&str, &[&str]); 8] = [
    ("workspaces", &["id"]),
    ("api_keys", &["id", "workspace_id", "key_hash", "scope"]),
    ("webhooks", &["id", "workspace_id", "zone"]),
    ("webhook_rates", &["webhook_id"]),
    ("events", &["workspace_id", "id", "type", "timestamp", "trace_context"]),
    ("deliveries", &["id", "workspace_id", "event_id", "webhook_id", "event_type", "zone", "lease_id", "lease_agent"]),
    ("attempts", &["id", "workspace_id", "delivery_id", "agent_id", "zone"]),
    ("agents", &["id", "zone", "version"]),
];

/// One `ALTER TABLE` per table (its indexes are rebuilt once), each column to `collation`.
fn statements(collation: &str) -> impl Iterator<Item = String> + '_ {
    COLUMNS.iter().map(move |(table, columns)| {
        let changes: Vec<String> =
            columns.iter().map(|c| format!("ALTER COLUMN \"{c}\" TYPE varchar COLLATE {collation}")).collect();
        format!("ALTER TABLE {table} {}", changes.join(", "))
    })
}

async fn run(m: &SchemaManager<'_>, collation: &str) -> Result<(), DbErr> {
    if m.get_database_backend() != DbBackend::Postgres {
        return Ok(());
    }
    for sql in statements(collation) {
        m.get_connection().execute_unprepared(&sql).await?;
    }
    // A column whose type changes loses its statistics, and autovacuum gathers them again only
    // after a tenth of a table's rows changed: without them the planner could choose the wrong
    // index for the queue's reads. An empty table (a new install) is left as it was, never
    // analyzed, which the planner prices as a table of some pages rather than of none.
    for (table, _) in COLUMNS {
        let has_rows = format!("SELECT EXISTS (SELECT 1 FROM {table}) AS has_rows");
        let row = m.get_connection().query_one_raw(Statement::from_string(DbBackend::Postgres, has_rows)).await?;
        if row.map(|r| r.try_get::<bool>("", "has_rows")).transpose()?.unwrap_or(false) {
            m.get_connection().execute_unprepared(&format!("ANALYZE {table}")).await?;
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        run(m, "\"C\"").await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        run(m, "\"default\"").await
    }
}
