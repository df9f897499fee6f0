//! On SQLite, `deliveries_failed` holds a webhook's failed deliveries by creation time, so that
//! `ReplayWebhook` (which re-opens the failed ones of a time range) reads those rather than every
//! delivery the webhook ever had through `deliveries_by_webhook`, which since migration 9 holds
//! no status. The replay runs in the one writer, where a scan of millions of delivered rows
//! would hold publishing up for as long.
//!
//! A partial index costs the hot path nothing: a lease and a success change `status` between
//! values outside its condition, so SQLite writes no entry for them. PostgreSQL's
//! `deliveries_by_webhook (webhook_id, status)` serves the replay already.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

async fn run(m: &SchemaManager<'_>, sql: &str) -> Result<(), DbErr> {
    if m.get_database_backend() != DbBackend::Sqlite {
        return Ok(());
    }
    m.get_connection().execute_unprepared(sql).await.map(|_| ())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // 4 is `delivery::status::FAILED`; a migration keeps the value it was written with.
        run(m, "CREATE INDEX IF NOT EXISTS deliveries_failed ON deliveries (webhook_id, created_at) WHERE status = 4")
            .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        run(m, "DROP INDEX IF EXISTS deliveries_failed").await
    }
}
