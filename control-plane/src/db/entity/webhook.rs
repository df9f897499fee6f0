use sea_orm::entity::prelude::*;

/// A webhook endpoint. Secret material is sealed (see `crate::crypto`).
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "webhooks")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub workspace_id: String,
    pub name: String,
    pub url: String,
    /// JSON array of subscription patterns.
    pub events: String,
    /// Sealed signing secret (the current one: after a rotation, the new one).
    pub secret: String,
    /// Sealed previous secret while a rotation's grace period runs.
    pub previous_secret: Option<String>,
    /// When the previous secret stops signing.
    pub previous_secret_until: Option<i64>,
    /// JSON object of header name to sealed value.
    pub headers: String,
    pub active: bool,
    pub zone: String,
    /// JSON of the transform, when there is one.
    pub transform: Option<String>,
    /// Sealed JSON object of the transform variables.
    pub transform_vars: Option<String>,
    /// `herald.v1.SignatureScheme` number.
    pub signature_scheme: i32,
    pub timeout_ms: Option<i64>,
    pub rate_limit_per_second: Option<i64>,
    pub max_in_flight: Option<i64>,
    pub description: String,
    pub created_at: i64,
    pub updated_at: i64,
    /// Soft deletion: deleted webhooks keep their logs until retention removes them.
    pub deleted_at: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
