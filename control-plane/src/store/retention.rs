//! Retention (`--retention`): events older than the retention period whose deliveries are all
//! final are deleted with their deliveries and attempts, a small batch per transaction, so that
//! pruning never holds the writer long enough to stall publishing or dispatch. Events with a
//! delivery still open (pending, in flight, paused) are kept however old they are.

use std::collections::HashSet;

use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait as _, DbBackend, EntityTrait, ExprTrait as _, QueryFilter, QueryOrder,
    QuerySelect,
};

use super::{Store, StoreError};
use crate::db::entity::delivery::{self, status};
use crate::db::entity::{attempt, event};

/// A delivery's id, workspace, event and status.
type DeliveryState = (String, String, String, i16);

/// Reads [`DeliveryState`]s.
fn states() -> sea_orm::Select<delivery::Entity> {
    delivery::Entity::find()
        .select_only()
        .column(delivery::Column::Id)
        .column(delivery::Column::WorkspaceId)
        .column(delivery::Column::EventId)
        .column(delivery::Column::Status)
}

/// The events, as (workspace, id), with an open delivery among `rows`.
fn open_events(rows: &[DeliveryState]) -> HashSet<(&str, &str)> {
    rows.iter().filter(|(_, _, _, s)| status::OPEN.contains(s)).map(|(_, ws, e, _)| (ws.as_str(), e.as_str())).collect()
}

/// Where a pass of pruning has got to: the last event looked at, by `(created_at, workspace,
/// id)`.
pub type PruneCursor = (i64, String, String);

impl Store {
    /// Prunes every event created before `cutoff` (ms) with no open delivery, `batch` events per
    /// transaction, waiting `between` after each, until the events before `cutoff` have all been
    /// looked at or `stop` is cancelled; returns how many events went. Each transaction looks at
    /// the next `4 × batch` events past the last one looked at, so a run of old events kept for an
    /// open delivery (a paused webhook's, a zone without agents) is passed over, not looked at
    /// again and again while the events behind it are never reached.
    pub async fn prune_all(
        &self,
        cutoff: i64,
        batch: u64,
        between: std::time::Duration,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<u64, StoreError> {
        let mut pruned = 0;
        let mut after = None;
        loop {
            let (n, next) = self.prune(cutoff, batch, after).await?;
            pruned += n;
            match next {
                Some(cursor) if !stop.is_cancelled() => after = Some(cursor),
                _ => return Ok(pruned),
            }
            tokio::time::sleep(between).await;
        }
    }

    /// Deletes up to `batch` events created before `cutoff` (ms) with no open delivery, among the
    /// `4 × batch` oldest past `after`, with their deliveries and attempts, in one transaction;
    /// returns how many events went and where the next call goes on from (`None`: every event
    /// before `cutoff` was looked at).
    pub async fn prune(
        &self,
        cutoff: i64,
        batch: u64,
        after: Option<PruneCursor>,
    ) -> Result<(u64, Option<PruneCursor>), StoreError> {
        self.writer
            .write_relaxed(move |txn| {
                Box::pin(async move {
                    let mut candidates = event::Entity::find()
                        .select_only()
                        .column(event::Column::CreatedAt)
                        .column(event::Column::WorkspaceId)
                        .column(event::Column::Id)
                        .filter(event::Column::CreatedAt.lt(cutoff));
                    if let Some((at, ws, id)) = &after {
                        let same_time = event::Column::CreatedAt.eq(*at);
                        // The bound alone too, which the index on `created_at` can start from
                        // (it cannot take one from inside the `OR`).
                        candidates = candidates.filter(event::Column::CreatedAt.gte(*at)).filter(
                            Condition::any()
                                .add(event::Column::CreatedAt.gt(*at))
                                .add(same_time.clone().and(event::Column::WorkspaceId.gt(ws.as_str())))
                                .add(
                                    same_time
                                        .and(event::Column::WorkspaceId.eq(ws.as_str()))
                                        .and(event::Column::Id.gt(id.as_str())),
                                ),
                        );
                    }
                    let looked_for = batch * 4;
                    let old: Vec<(i64, String, String)> = candidates
                        .order_by_asc(event::Column::CreatedAt)
                        .order_by_asc(event::Column::WorkspaceId)
                        .order_by_asc(event::Column::Id)
                        .limit(looked_for)
                        .into_tuple()
                        .all(txn)
                        .await?;
                    if old.is_empty() {
                        return Ok((0, None));
                    }
                    let by_pair = |pairs: &[(i64, String, String)]| {
                        pairs.iter().fold(Condition::any(), |c, (_, ws, id)| {
                            c.add(
                                delivery::Column::WorkspaceId
                                    .eq(ws.as_str())
                                    .and(delivery::Column::EventId.eq(id.as_str())),
                            )
                        })
                    };
                    let rows: Vec<DeliveryState> = states().filter(by_pair(&old)).into_tuple().all(txn).await?;
                    let open = open_events(&rows);
                    // In order, up to `batch`: everything before the last one looked at is gone or
                    // open, so the next call goes on from there.
                    let mut gone: Vec<(String, String)> = Vec::new();
                    let mut looked_at = 0;
                    for (_, ws, id) in &old {
                        looked_at += 1;
                        if !open.contains(&(ws.as_str(), id.as_str())) {
                            gone.push((ws.clone(), id.clone()));
                            if gone.len() as u64 == batch {
                                break;
                            }
                        }
                    }
                    let next =
                        (looked_at < old.len() || old.len() as u64 == looked_for).then(|| old[looked_at - 1].clone());
                    let gone_set: HashSet<(&str, &str)> = gone.iter().map(|(w, e)| (w.as_str(), e.as_str())).collect();
                    let mut deliveries: Vec<String> = rows
                        .iter()
                        .filter(|(_, ws, e, _)| gone_set.contains(&(ws.as_str(), e.as_str())))
                        .map(|(id, ..)| id.clone())
                        .collect();
                    if txn.get_database_backend() == DbBackend::Postgres && !deliveries.is_empty() {
                        // Locked, and looked at again: a retry or replay on another replica that
                        // committed since the read above re-opened its delivery, and one that
                        // comes now waits for this transaction and then finds the row gone.
                        // In chunks, as the deletes below: an event may have thousands of
                        // deliveries, and a statement at most 65,535 parameters. In id order
                        // across chunks, as every batch locks rows.
                        deliveries.sort_unstable();
                        let mut locked: Vec<DeliveryState> = Vec::with_capacity(deliveries.len());
                        for chunk in deliveries.chunks(super::insert::CHUNK) {
                            let rows = states()
                                .filter(delivery::Column::Id.is_in(chunk.iter().cloned()))
                                .order_by_asc(delivery::Column::Id)
                                .lock_exclusive()
                                .into_tuple::<DeliveryState>()
                                .all(txn)
                                .await?;
                            locked.extend(rows);
                        }
                        let reopened = open_events(&locked);
                        deliveries = locked
                            .iter()
                            .filter(|(_, ws, e, _)| !reopened.contains(&(ws.as_str(), e.as_str())))
                            .map(|(id, ..)| id.clone())
                            .collect();
                        gone.retain(|(ws, e)| !reopened.contains(&(ws.as_str(), e.as_str())));
                    }
                    if gone.is_empty() {
                        return Ok((0, next));
                    }
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
                    Ok((done.rows_affected, next))
                })
            })
            .await
    }
}
