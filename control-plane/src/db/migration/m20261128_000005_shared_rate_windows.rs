//! Per-webhook send counts of the current one-second window, so that `rate_limit_per_second`
//! holds across control-plane replicas on PostgreSQL (claims read and update a webhook's row
//! under the same advisory lock).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Alias::new("webhook_rates"))
                .if_not_exists()
                .col(ColumnDef::new(Alias::new("webhook_id")).string().not_null().primary_key())
                .col(ColumnDef::new(Alias::new("window_ms")).big_integer().not_null())
                .col(ColumnDef::new(Alias::new("sent")).integer().not_null())
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(Alias::new("webhook_rates")).to_owned()).await
    }
}
