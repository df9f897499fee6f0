//! Retention (`--retention`): events older than the retention period whose deliveries are all
//! final are deleted with their deliveries and attempts, a small batch per transaction, so that
//! pruning never holds the writer long enough to stall publishing or dispatch. Events with a
//! delivery still open (pending, in flight, paused) are kept however old they are.

use std::collections::HashSet;

use sea_orm::{ColumnTrait, Condition, EntityTrait, ExprTrait as _, QueryFilter, QueryOrder, QuerySelect};

use super::{Store, StoreError};
use crate::db::entity::delivery::{self, status};
use crate::db::entity::{attempt, event};

impl Store {
    /// Deletes up to `batch` events created before `cutoff` (ms) with no open delivery, and their
    /// deliveries and attempts, in one transaction; returns how many events went.
    pub async fn prune(&self, cutoff: i64, batch: u64) -> Result<u64, StoreError> {
        self.writer
            .write_relaxed(move |txn| {
                Box::pin(async move {
                    let old: Vec<(String, String)> = event::Entity::find()
                        .select_only()
                        .column(event::Column::WorkspaceId)
                        .column(event::Column::Id)
                        .filter(event::Column::CreatedAt.lt(cutoff))
                        .order_by_asc(event::Column::CreatedAt)
                        .limit(batch * 4)
                        .into_tuple()
                        .all(txn)
                        .await?;
                    if old.is_empty() {
                        return Ok(0);
                    }
                    let by_pair = |pairs: &[(String, String)]| {
                        pairs.iter().fold(Condition::any(), |c, (ws, id)| {
                            c.add(
                                delivery::Column::WorkspaceId
                                    .eq(ws.as_str())
                                    .and(delivery::Column::EventId.eq(id.as_str())),
                            )
                        })
                    };
                    let rows: Vec<(String, String, String, i16)> = delivery::Entity::find()
                        .select_only()
                        .column(delivery::Column::Id)
                        .column(delivery::Column::WorkspaceId)
                        .column(delivery::Column::EventId)
                        .column(delivery::Column::Status)
                        .filter(by_pair(&old))
                        .into_tuple()
                        .all(txn)
                        .await?;
                    let open: HashSet<(&str, &str)> = rows
                        .iter()
                        .filter(|(_, _, _, s)| status::OPEN.contains(s))
                        .map(|(_, ws, e, _)| (ws.as_str(), e.as_str()))
                        .collect();
                    let gone: Vec<(String, String)> = old
                        .iter()
                        .filter(|(ws, id)| !open.contains(&(ws.as_str(), id.as_str())))
                        .take(batch as usize)
                        .cloned()
                        .collect();
                    if gone.is_empty() {
                        return Ok(0);
                    }
                    let gone_set: HashSet<(&str, &str)> = gone.iter().map(|(w, e)| (w.as_str(), e.as_str())).collect();
                    let deliveries: Vec<String> = rows
                        .iter()
                        .filter(|(_, ws, e, _)| gone_set.contains(&(ws.as_str(), e.as_str())))
                        .map(|(id, ..)| id.clone())
                        .collect();
                    for chunk in deliveries.chunks(500) {
                        attempt::Entity::delete_many()
                            .filter(attempt::Column::DeliveryId.is_in(chunk.iter().cloned()))
                            .exec(txn)
                            .await?;
                        delivery::Entity::delete_many()
                            .filter(delivery::Column::Id.is_in(chunk.iter().cloned()))
                            .exec(txn)
                            .await?;
                    }
                    let events = gone.iter().fold(Condition::any(), |c, (ws, id)| {
                        c.add(event::Column::WorkspaceId.eq(ws.as_str()).and(event::Column::Id.eq(id.as_str())))
                    });
                    let done = event::Entity::delete_many().filter(events).exec(txn).await?;
                    Ok(done.rows_affected)
                })
            })
            .await
    }
}
