use sea_orm::entity::prelude::*;

/// A published event. Ids are unique per workspace.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "events")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub workspace_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    #[sea_orm(column_name = "type")]
    pub event_type: String,
    /// The envelope's timestamp, exactly as delivered (RFC 3339, UTC, `Z`).
    pub timestamp: String,
    /// Whether the publisher supplied the timestamp (then it takes part in idempotency checks).
    pub timestamp_supplied: bool,
    /// The payload object, byte for byte as published.
    pub data: String,
    /// Published by `SendTestEvent`.
    pub test: bool,
    pub created_at: i64,
    /// The W3C `traceparent` of the publish call, when traces are exported.
    pub trace_context: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
