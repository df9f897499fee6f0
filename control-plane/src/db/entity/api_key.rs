use sea_orm::entity::prelude::*;

/// An API key. Only its SHA-256 is stored: keys are 256-bit random strings, so a slow hash would
/// add nothing but latency to every call.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "api_keys")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub workspace_id: String,
    /// Lowercase hex SHA-256 of the key.
    #[sea_orm(unique)]
    pub key_hash: String,
    /// `admin` or `publish`.
    pub scope: String,
    pub created_at: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
