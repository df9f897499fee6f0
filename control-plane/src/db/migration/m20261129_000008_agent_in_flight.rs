//! Each replica writes its agents' sessions to `agents` every heartbeat, with the jobs each had in
//! flight then, so that `ListAgents` on any replica shows every replica's agents.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Alias::new("agents"))
                .add_column(ColumnDef::new(Alias::new("in_flight")).integer().not_null().default(0))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(Table::alter().table(Alias::new("agents")).drop_column(Alias::new("in_flight")).to_owned()).await
    }
}
