//! Schema migrations, one file each, applied in order by `herald migrate` and at `herald serve`
//! start-up. A migration, once released, is never edited: change the schema with a new one.

use sea_orm_migration::prelude::*;

mod m20261128_000001_create_schema;
mod m20261128_000002_dispatch_indexes;
mod m20261128_000003_manual_attempts;
mod m20261128_000004_event_trace_context;
mod m20261128_000005_shared_rate_windows;
mod m20261128_000006_queue_index_order;
mod m20261128_000007_partial_queue_indexes;
mod m20261129_000008_agent_in_flight;
mod m20261130_000009_webhook_index_without_status;
mod m20261130_000010_bytewise_identifiers;
mod m20261130_000011_failed_deliveries_index;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261128_000001_create_schema::Migration),
            Box::new(m20261128_000002_dispatch_indexes::Migration),
            Box::new(m20261128_000003_manual_attempts::Migration),
            Box::new(m20261128_000004_event_trace_context::Migration),
            Box::new(m20261128_000005_shared_rate_windows::Migration),
            Box::new(m20261128_000006_queue_index_order::Migration),
            Box::new(m20261128_000007_partial_queue_indexes::Migration),
            Box::new(m20261129_000008_agent_in_flight::Migration),
            Box::new(m20261130_000009_webhook_index_without_status::Migration),
            Box::new(m20261130_000010_bytewise_identifiers::Migration),
            Box::new(m20261130_000011_failed_deliveries_index::Migration),
        ]
    }
}
