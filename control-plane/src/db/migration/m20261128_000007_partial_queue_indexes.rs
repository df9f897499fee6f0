//! The queue indexes hold only the rows they serve. `deliveries_due` holds pending rows,
//! `deliveries_leased` in-flight rows and `deliveries_parked` the rows of paused webhooks. On
//! SQLite a lease then moves a row from one small index to another, and a success only leaves
//! `deliveries_leased`. Before, each of those updates rewrote the row's entries in two indexes
//! that held every delivery ever made, `(zone, status, …)` and `(status, lease_expires_at)`. On
//! PostgreSQL the updates are not HOT (`status` is indexed), so each new row version still goes
//! into every full index, but into one partial index at most instead of two full ones.
//!
//! `events_by_id` goes too: every read of events names the whole primary key
//! `(workspace_id, id)`.
//!
//! Partial indexes serve a query only when the planner can see that the query's rows lie inside
//! the index's condition. The store writes those conditions as literal SQL (`queue::status_is`),
//! a safeguard so that the match never depends on how parameters are planned.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: [&str; 6] = [
    "CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (zone, next_attempt_at, id) WHERE status = 1",
    "CREATE INDEX IF NOT EXISTS deliveries_leased ON deliveries (lease_expires_at) WHERE status = 2",
    "CREATE INDEX IF NOT EXISTS deliveries_parked ON deliveries (zone) WHERE status = 6",
    "DROP INDEX IF EXISTS deliveries_queue_ordered",
    "DROP INDEX IF EXISTS deliveries_by_lease",
    "DROP INDEX IF EXISTS events_by_id",
];

const DOWN: [&str; 6] = [
    "CREATE INDEX IF NOT EXISTS events_by_id ON events (id)",
    "CREATE INDEX IF NOT EXISTS deliveries_by_lease ON deliveries (status, lease_expires_at)",
    "CREATE INDEX IF NOT EXISTS deliveries_queue_ordered ON deliveries (zone, status, next_attempt_at, id)",
    "DROP INDEX IF EXISTS deliveries_parked",
    "DROP INDEX IF EXISTS deliveries_leased",
    "DROP INDEX IF EXISTS deliveries_due",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for sql in UP {
            m.get_connection().execute_unprepared(sql).await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for sql in DOWN {
            m.get_connection().execute_unprepared(sql).await?;
        }
        Ok(())
    }
}
