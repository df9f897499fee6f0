use sea_orm::entity::prelude::*;

/// A sender agent as the replica it is connected to last saw it, for `ListAgents` across
/// replicas (written on PostgreSQL only: on SQLite one control plane holds every session).
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "agents")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub zone: String,
    pub version: String,
    /// JSON array of egress addresses.
    pub egress_ips: String,
    pub capacity: i32,
    pub connected_at: i64,
    pub last_seen_at: i64,
    /// Jobs in flight when last seen.
    pub in_flight: i32,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
