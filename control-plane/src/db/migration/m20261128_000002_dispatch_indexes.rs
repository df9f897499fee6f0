//! Indexes the dispatcher needs: events by id alone (a claimed batch spans workspaces), and
//! in-flight deliveries by lease expiry (reclaiming expired leases reads only those).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_index(
            Index::create()
                .name("events_by_id")
                .table(Alias::new("events"))
                .col(Alias::new("id"))
                .if_not_exists()
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("deliveries_by_lease")
                .table(Alias::new("deliveries"))
                .col(Alias::new("status"))
                .col(Alias::new("lease_expires_at"))
                .if_not_exists()
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(Index::drop().name("deliveries_by_lease").table(Alias::new("deliveries")).to_owned()).await?;
        m.drop_index(Index::drop().name("events_by_id").table(Alias::new("events")).to_owned()).await
    }
}
