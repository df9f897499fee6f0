//! The first schema: workspaces, api_keys, webhooks, events, deliveries, attempts, agents.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Workspaces {
    Table,
    Id,
    CreatedAt,
}

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Id,
    WorkspaceId,
    KeyHash,
    Scope,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Webhooks {
    Table,
    Id,
    WorkspaceId,
    Name,
    Url,
    Events,
    Secret,
    PreviousSecret,
    PreviousSecretUntil,
    Headers,
    Active,
    Zone,
    Transform,
    TransformVars,
    SignatureScheme,
    TimeoutMs,
    RateLimitPerSecond,
    MaxInFlight,
    Description,
    CreatedAt,
    UpdatedAt,
    DeletedAt,
}

#[derive(DeriveIden)]
enum Events {
    Table,
    WorkspaceId,
    Id,
    Type,
    Timestamp,
    TimestampSupplied,
    Data,
    Test,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Deliveries {
    Table,
    Id,
    WorkspaceId,
    EventId,
    WebhookId,
    EventType,
    Zone,
    Status,
    Test,
    AttemptCount,
    LostLeases,
    NextAttemptAt,
    LeaseId,
    LeaseAgent,
    LeaseExpiresAt,
    LastStatus,
    LastError,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Attempts {
    Table,
    Id,
    DeliveryId,
    WorkspaceId,
    Number,
    AgentId,
    Zone,
    StartedAt,
    DurationMs,
    RequestHeaders,
    RequestBody,
    ResponseStatus,
    ResponseHeaders,
    ResponseBody,
    ErrorKind,
    ErrorMessage,
    Stale,
    Manual,
}

#[derive(DeriveIden)]
enum Agents {
    Table,
    Id,
    Zone,
    Version,
    EgressIps,
    Capacity,
    ConnectedAt,
    LastSeenAt,
}

fn id<T: IntoIden>(name: T) -> ColumnDef {
    ColumnDef::new(name).string().not_null().primary_key().take()
}
fn text<T: IntoIden>(name: T) -> ColumnDef {
    ColumnDef::new(name).text().not_null().take()
}
fn text_null<T: IntoIden>(name: T) -> ColumnDef {
    ColumnDef::new(name).text().null().take()
}
fn string<T: IntoIden>(name: T) -> ColumnDef {
    ColumnDef::new(name).string().not_null().take()
}
fn millis<T: IntoIden>(name: T) -> ColumnDef {
    ColumnDef::new(name).big_integer().not_null().take()
}
fn millis_null<T: IntoIden>(name: T) -> ColumnDef {
    ColumnDef::new(name).big_integer().null().take()
}
fn int<T: IntoIden>(name: T) -> ColumnDef {
    ColumnDef::new(name).integer().not_null().take()
}
fn flag<T: IntoIden>(name: T) -> ColumnDef {
    ColumnDef::new(name).boolean().not_null().take()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Workspaces::Table)
                .if_not_exists()
                .col(id(Workspaces::Id))
                .col(millis(Workspaces::CreatedAt))
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(ApiKeys::Table)
                .if_not_exists()
                .col(id(ApiKeys::Id))
                .col(string(ApiKeys::WorkspaceId))
                .col(string(ApiKeys::KeyHash).unique_key().take())
                .col(string(ApiKeys::Scope))
                .col(millis(ApiKeys::CreatedAt))
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Webhooks::Table)
                .if_not_exists()
                .col(id(Webhooks::Id))
                .col(string(Webhooks::WorkspaceId))
                .col(text(Webhooks::Name))
                .col(text(Webhooks::Url))
                .col(text(Webhooks::Events))
                .col(text(Webhooks::Secret))
                .col(text_null(Webhooks::PreviousSecret))
                .col(millis_null(Webhooks::PreviousSecretUntil))
                .col(text(Webhooks::Headers))
                .col(flag(Webhooks::Active))
                .col(string(Webhooks::Zone))
                .col(text_null(Webhooks::Transform))
                .col(text_null(Webhooks::TransformVars))
                .col(int(Webhooks::SignatureScheme))
                .col(millis_null(Webhooks::TimeoutMs))
                .col(millis_null(Webhooks::RateLimitPerSecond))
                .col(millis_null(Webhooks::MaxInFlight))
                .col(text(Webhooks::Description))
                .col(millis(Webhooks::CreatedAt))
                .col(millis(Webhooks::UpdatedAt))
                .col(millis_null(Webhooks::DeletedAt))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("webhooks_by_workspace")
                .table(Webhooks::Table)
                .col(Webhooks::WorkspaceId)
                .col(Webhooks::Id)
                .if_not_exists()
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Events::Table)
                .if_not_exists()
                .col(string(Events::WorkspaceId))
                .col(string(Events::Id))
                .col(string(Events::Type))
                .col(string(Events::Timestamp))
                .col(flag(Events::TimestampSupplied))
                .col(text(Events::Data))
                .col(flag(Events::Test))
                .col(millis(Events::CreatedAt))
                .primary_key(Index::create().col(Events::WorkspaceId).col(Events::Id))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create().name("events_by_age").table(Events::Table).col(Events::CreatedAt).if_not_exists().take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Deliveries::Table)
                .if_not_exists()
                .col(id(Deliveries::Id))
                .col(string(Deliveries::WorkspaceId))
                .col(string(Deliveries::EventId))
                .col(string(Deliveries::WebhookId))
                .col(string(Deliveries::EventType))
                .col(string(Deliveries::Zone))
                .col(ColumnDef::new(Deliveries::Status).small_integer().not_null().take())
                .col(flag(Deliveries::Test))
                .col(int(Deliveries::AttemptCount))
                .col(int(Deliveries::LostLeases))
                .col(millis(Deliveries::NextAttemptAt))
                .col(ColumnDef::new(Deliveries::LeaseId).string().null().take())
                .col(ColumnDef::new(Deliveries::LeaseAgent).string().null().take())
                .col(millis_null(Deliveries::LeaseExpiresAt))
                .col(ColumnDef::new(Deliveries::LastStatus).integer().null().take())
                .col(text_null(Deliveries::LastError))
                .col(millis(Deliveries::CreatedAt))
                .col(millis(Deliveries::UpdatedAt))
                .take(),
        )
        .await?;
        // The queue index: claiming reads the due range of one zone's pending rows and nothing
        // else; parked, in-flight and final rows sit under other status values.
        m.create_index(
            Index::create()
                .name("deliveries_queue")
                .table(Deliveries::Table)
                .col(Deliveries::Zone)
                .col(Deliveries::Status)
                .col(Deliveries::NextAttemptAt)
                .if_not_exists()
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("deliveries_by_webhook")
                .table(Deliveries::Table)
                .col(Deliveries::WebhookId)
                .col(Deliveries::Status)
                .if_not_exists()
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("deliveries_by_event")
                .table(Deliveries::Table)
                .col(Deliveries::WorkspaceId)
                .col(Deliveries::EventId)
                .if_not_exists()
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("deliveries_by_workspace")
                .table(Deliveries::Table)
                .col(Deliveries::WorkspaceId)
                .col(Deliveries::Id)
                .if_not_exists()
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Attempts::Table)
                .if_not_exists()
                .col(id(Attempts::Id))
                .col(string(Attempts::DeliveryId))
                .col(string(Attempts::WorkspaceId))
                .col(int(Attempts::Number))
                .col(string(Attempts::AgentId))
                .col(string(Attempts::Zone))
                .col(millis(Attempts::StartedAt))
                .col(millis(Attempts::DurationMs))
                .col(text(Attempts::RequestHeaders))
                .col(text_null(Attempts::RequestBody))
                .col(int(Attempts::ResponseStatus))
                .col(text(Attempts::ResponseHeaders))
                .col(text(Attempts::ResponseBody))
                .col(int(Attempts::ErrorKind))
                .col(text(Attempts::ErrorMessage))
                .col(flag(Attempts::Stale))
                .col(flag(Attempts::Manual))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("attempts_by_delivery")
                .table(Attempts::Table)
                .col(Attempts::DeliveryId)
                .col(Attempts::Id)
                .if_not_exists()
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Agents::Table)
                .if_not_exists()
                .col(id(Agents::Id))
                .col(string(Agents::Zone))
                .col(string(Agents::Version))
                .col(text(Agents::EgressIps))
                .col(int(Agents::Capacity))
                .col(millis(Agents::ConnectedAt))
                .col(millis(Agents::LastSeenAt))
                .take(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for table in ["agents", "attempts", "deliveries", "events", "webhooks", "api_keys", "workspaces"] {
            m.drop_table(Table::drop().table(Alias::new(table)).if_exists().take()).await?;
        }
        Ok(())
    }
}
