//! The `traceparent` of the publish call that stored an event, so that every dispatch of its
//! deliveries can link to it (OpenTelemetry span links), however much later it happens.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Alias::new("events"))
                .add_column(ColumnDef::new(Alias::new("trace_context")).string().null())
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(Table::alter().table(Alias::new("events")).drop_column(Alias::new("trace_context")).to_owned())
            .await
    }
}
