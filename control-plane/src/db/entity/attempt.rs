use sea_orm::entity::prelude::*;

/// One HTTP request made for a delivery (or one refusal by the egress guard), as the agent
/// reported it.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "attempts")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub delivery_id: String,
    pub workspace_id: String,
    pub number: i32,
    pub agent_id: String,
    pub zone: String,
    pub started_at: i64,
    pub duration_ms: i64,
    /// JSON object; custom header values masked.
    pub request_headers: String,
    /// The body sent, when a transform applied.
    pub request_body: Option<String>,
    pub response_status: i32,
    /// JSON object.
    pub response_headers: String,
    pub response_body: String,
    /// `herald.v1.ErrorKind` number.
    pub error_kind: i32,
    pub error_message: String,
    pub stale: bool,
    pub manual: bool,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
