//! On SQLite, `deliveries_by_webhook` holds the webhook alone, `(webhook_id)` instead of
//! `(webhook_id, status)`. SQLite rewrites an index entry only when a column of that index
//! changes, so a lease and a result no longer each delete and insert an entry there: two index
//! writes fewer per delivery on its way out. What needs a webhook's open rows (pausing,
//! re-activating, a new zone, deletion) finds them through the partial index of their status
//! (`webhooks::update_open_rows`).
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
        run(m, UP).await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        run(m, DOWN).await
    }
}
