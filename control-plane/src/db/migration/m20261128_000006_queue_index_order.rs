//! The queue index in the claim's whole order, `(zone, status, next_attempt_at, id)`: a claim
//! reads its `LIMIT` rows straight off the index and stops, instead of sorting every due row of
//! the zone on `id` first (30–45 ms per claim on PostgreSQL with 100,000 deliveries queued).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const TABLE: &str = "deliveries";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_index(
            Index::create()
                .name("deliveries_queue_ordered")
                .table(Alias::new(TABLE))
                .col(Alias::new("zone"))
                .col(Alias::new("status"))
                .col(Alias::new("next_attempt_at"))
                .col(Alias::new("id"))
                .if_not_exists()
                .take(),
        )
        .await?;
        m.drop_index(Index::drop().name("deliveries_queue").table(Alias::new(TABLE)).to_owned()).await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_index(
            Index::create()
                .name("deliveries_queue")
                .table(Alias::new(TABLE))
                .col(Alias::new("zone"))
                .col(Alias::new("status"))
                .col(Alias::new("next_attempt_at"))
                .if_not_exists()
                .take(),
        )
        .await?;
        m.drop_index(Index::drop().name("deliveries_queue_ordered").table(Alias::new(TABLE)).to_owned()).await
    }
}
