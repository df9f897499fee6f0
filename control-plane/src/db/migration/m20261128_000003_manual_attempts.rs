//! `RetryDelivery` on a finished delivery makes one manual attempt: `manual_from` remembers the
//! state to return to if it fails, so a manual attempt never schedules anything further.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Alias::new("deliveries"))
                .add_column(ColumnDef::new(Alias::new("manual_from")).small_integer().null())
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(Table::alter().table(Alias::new("deliveries")).drop_column(Alias::new("manual_from")).to_owned())
            .await
    }
}
