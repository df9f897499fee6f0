//! On SQLite, `deliveries_by_webhook` holds the webhook alone, `(webhook_id)` instead of
//! `(webhook_id, status)`. SQLite rewrites an index entry only when a column of that index
//! changes, so a lease and a result no longer each delete and insert an entry there: four index
//! writes fewer per delivery on its way out. What needs a webhook's open rows (pausing,
//! re-activating, a new zone, deletion) finds them through the partial index of their status
//! within the webhook's zone (`webhooks::update_open_rows`).
//!
//! So every open delivery must lie in its webhook's zone. Retries and replays used to reopen a
//! finished delivery in the zone it was made in, even after the webhook had moved: on both
//! databases such rows move to their webhook's zone here (a fix, which `down` keeps).
//!
//! PostgreSQL keeps `(webhook_id, status)`: a new row version enters every index anyway (the
//! updates are not HOT), and counting a webhook's jobs in flight across replicas reads it.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: [&str; 2] = [
    "DROP INDEX IF EXISTS deliveries_by_webhook",
    "CREATE INDEX IF NOT EXISTS deliveries_by_webhook ON deliveries (webhook_id)",
];

const DOWN: [&str; 2] = [
    "DROP INDEX IF EXISTS deliveries_by_webhook",
    "CREATE INDEX IF NOT EXISTS deliveries_by_webhook ON deliveries (webhook_id, status)",
];

/// Open deliveries (pending, in flight, parked) that lie outside their webhook's zone move into it.
const ZONES: &str = "UPDATE deliveries SET zone = (SELECT webhooks.zone FROM webhooks WHERE webhooks.id = deliveries.webhook_id) \
     WHERE status IN (1, 2, 6) AND zone <> (SELECT webhooks.zone FROM webhooks WHERE webhooks.id = deliveries.webhook_id)";

async fn run(m: &SchemaManager<'_>, statements: [&str; 2]) -> Result<(), DbErr> {
    if m.get_database_backend() != DbBackend::Sqlite {
        return Ok(());
    }
    for sql in statements {
        m.get_connection().execute_unprepared(sql).await?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.get_connection().execute_unprepared(ZONES).await?;
        run(m, UP).await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        run(m, DOWN).await
    }
}
