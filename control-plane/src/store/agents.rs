//! Agent sessions as the replica each is connected to last saw them, so that `ListAgents` on any
//! replica sharing a PostgreSQL shows every replica's agents. Every replica writes its own
//! sessions when they open and every heartbeat, and deletes a session's row when it ends; a row
//! not seen for [`AGENT_SEEN_MS`] (its replica died) is not shown, and one not seen for a day is
//! deleted. On SQLite one control plane holds every session and nothing is written.

use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};

use super::{Store, StoreError};
use crate::db::entity::agent;

/// A row not refreshed for this long belongs to a replica that is gone: three heartbeats missed.
pub const AGENT_SEEN_MS: i64 = 35_000;
/// Rows of sessions not seen for this long are deleted.
const AGENT_FORGOTTEN_MS: i64 = 24 * 3600 * 1000;

impl Store {
    /// Whether agent sessions are written for other replicas to see (PostgreSQL).
    pub fn shares_agents(&self) -> bool {
        self.db.get_database_backend() == sea_orm::DbBackend::Postgres
    }

    /// Writes these sessions as seen (one upsert by agent id). Of two sessions of one agent id (it reconnected before its old session closed, or
    /// two agents were given one id), the one connected last is written; a row of a session
    /// connected later than the one written (the agent moved to another replica) is left alone.
    pub async fn agents_seen(&self, mut rows: Vec<agent::Model>) -> Result<(), StoreError> {
        // One row per id (PostgreSQL refuses an upsert that meets one key twice), in id order.
        rows.sort_by(|a, b| a.id.cmp(&b.id).then(b.connected_at.cmp(&a.connected_at)));
        rows.dedup_by(|later, first| later.id == first.id);
        if !rows.is_empty() {
            let upsert = OnConflict::column(agent::Column::Id)
                .update_columns([
                    agent::Column::Zone,
                    agent::Column::Version,
                    agent::Column::EgressIps,
                    agent::Column::Capacity,
                    agent::Column::ConnectedAt,
                    agent::Column::LastSeenAt,
                    agent::Column::InFlight,
                ])
                .action_and_where(Expr::cust("agents.connected_at <= excluded.connected_at"))
                .to_owned();
            let rows: Vec<agent::ActiveModel> = rows.into_iter().map(Into::into).collect();
            agent::Entity::insert_many(rows).on_conflict(upsert).exec_without_returning(&self.db).await?;
        }
        Ok(())
    }

    /// Deletes the rows of sessions not seen for a day (replicas that died holding them).
    pub async fn forget_old_agents(&self, now: i64) -> Result<(), StoreError> {
        agent::Entity::delete_many()
            .filter(agent::Column::LastSeenAt.lt(now - AGENT_FORGOTTEN_MS))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Deletes the row of a session that ended, unless the agent has connected again since (to
    /// this replica or another): the row is the session's only while its `connected_at` is.
    pub async fn agent_gone(&self, id: &str, connected_at: i64) -> Result<(), StoreError> {
        agent::Entity::delete_many()
            .filter(agent::Column::Id.eq(id))
            .filter(agent::Column::ConnectedAt.eq(connected_at))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Agents seen by any replica since `since`, of `zone` (or all), by zone and id.
    pub async fn agents_seen_since(&self, zone: &str, since: i64) -> Result<Vec<agent::Model>, StoreError> {
        let mut q = agent::Entity::find().filter(agent::Column::LastSeenAt.gte(since));
        if !zone.is_empty() {
            q = q.filter(agent::Column::Zone.eq(zone));
        }
        Ok(q.order_by_asc(agent::Column::Zone).order_by_asc(agent::Column::Id).all(&self.db).await?)
    }
}
