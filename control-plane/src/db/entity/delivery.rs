use sea_orm::entity::prelude::*;

/// Stored delivery states. `Parked` is a pending delivery of a paused webhook, kept out of the
/// claimable `deliveries_due` index (pending rows only); the API shows it as pending with
/// `paused = true`.
pub mod status {
    pub const PENDING: i16 = 1;
    pub const IN_FLIGHT: i16 = 2;
    pub const SUCCEEDED: i16 = 3;
    pub const FAILED: i16 = 4;
    pub const CANCELLED: i16 = 5;
    pub const PARKED: i16 = 6;

    /// States a delivery can still leave.
    pub const OPEN: [i16; 3] = [PENDING, IN_FLIGHT, PARKED];
}

/// The delivery of one event to one webhook. The deliveries table is the queue.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "deliveries")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub workspace_id: String,
    pub event_id: String,
    pub webhook_id: String,
    pub event_type: String,
    /// The webhook's zone, copied so that claiming needs no join.
    pub zone: String,
    pub status: i16,
    pub test: bool,
    pub attempt_count: i32,
    /// Leases lost in a row (agents that died holding it).
    pub lost_leases: i32,
    pub next_attempt_at: i64,
    /// The current lease: a result counts only if it carries this id.
    pub lease_id: Option<String>,
    pub lease_agent: Option<String>,
    pub lease_expires_at: Option<i64>,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    /// Set while a manual attempt (RetryDelivery) runs on a finished delivery: the state it
    /// returns to if that attempt fails.
    pub manual_from: Option<i16>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
