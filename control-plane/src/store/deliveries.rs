//! Delivery logs and manual actions: list and read deliveries with their attempts, retry one,
//! replay a webhook's deliveries, send a test event.

use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
};

use super::events::NewDelivery;
use super::webhooks::{Changed, active_state};
use super::{Store, StoreError, now_millis};
use crate::db::entity::delivery::{self, status};
use crate::db::entity::{attempt, event, webhook};

/// Filters of `ListDeliveries` and `WatchDeliveries`.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub webhook_id: Option<String>,
    /// Stored statuses that match (pending includes parked).
    pub statuses: Vec<i16>,
    pub event_type: Option<String>,
    pub created_after: Option<i64>,
    pub created_before: Option<i64>,
}

impl DeliveryFilter {
    /// Whether a delivery row matches (for watching).
    pub fn matches(&self, d: &delivery::Model) -> bool {
        self.webhook_id.as_ref().is_none_or(|w| *w == d.webhook_id)
            && (self.statuses.is_empty() || self.statuses.contains(&d.status))
            && self.event_type.as_ref().is_none_or(|t| *t == d.event_type)
            && self.created_after.is_none_or(|t| d.created_at >= t)
            && self.created_before.is_none_or(|t| d.created_at < t)
    }
}

/// The statement of `ReplayWebhook`: `update` applied to the webhook's failed (with
/// `include_all`, failed and succeeded) deliveries created in `[after, before)`. On SQLite the
/// failed ones alone are read off `deliveries_failed` (migration 11), named with `INDEXED BY`
/// (as the other partial-index statements are) so that no statistics ever make the planner
/// take `deliveries_by_webhook`, every delivery the webhook had; with `include_all` that index
/// is the right one. On PostgreSQL `deliveries_by_webhook (webhook_id, status)` serves both.
pub fn replay_update(
    backend: sea_orm::DbBackend,
    update: sea_orm::UpdateMany<delivery::Entity>,
    webhook_id: &str,
    after: i64,
    before: i64,
    include_all: bool,
) -> sea_orm::Statement {
    let failed_only = backend == sea_orm::DbBackend::Sqlite && !include_all;
    let statuses = if failed_only {
        // The literal condition of the partial index (`queue::status_is`).
        super::queue::status_is(status::FAILED)
    } else if include_all {
        delivery::Column::Status.is_in([status::FAILED, status::SUCCEEDED])
    } else {
        delivery::Column::Status.eq(status::FAILED)
    };
    let update = update.filter(
        Condition::all()
            .add(delivery::Column::WebhookId.eq(webhook_id))
            .add(statuses)
            .add(delivery::Column::CreatedAt.gte(after))
            .add(delivery::Column::CreatedAt.lt(before)),
    );
    let statement = sea_orm::QueryTrait::build(&update, backend);
    if failed_only { super::queue::sqlite_update_indexed_by(statement, "deliveries_failed") } else { statement }
}

impl Store {
    /// A page of the workspace's deliveries, newest first, before the id `before`.
    pub async fn list_deliveries(
        &self,
        workspace: &str,
        filter: &DeliveryFilter,
        before: Option<&str>,
        limit: u64,
    ) -> Result<(Vec<delivery::Model>, bool), StoreError> {
        let mut q = delivery::Entity::find().filter(delivery::Column::WorkspaceId.eq(workspace));
        if let Some(w) = &filter.webhook_id {
            q = q.filter(delivery::Column::WebhookId.eq(w));
        }
        if !filter.statuses.is_empty() {
            q = q.filter(delivery::Column::Status.is_in(filter.statuses.clone()));
        }
        if let Some(t) = &filter.event_type {
            q = q.filter(delivery::Column::EventType.eq(t));
        }
        if let Some(t) = filter.created_after {
            q = q.filter(delivery::Column::CreatedAt.gte(t));
        }
        if let Some(t) = filter.created_before {
            q = q.filter(delivery::Column::CreatedAt.lt(t));
        }
        if let Some(b) = before {
            q = q.filter(delivery::Column::Id.lt(b));
        }
        let mut rows = q.order_by_desc(delivery::Column::Id).limit(limit + 1).all(&self.db).await?;
        let more = rows.len() as u64 > limit;
        rows.truncate(limit as usize);
        Ok((rows, more))
    }

    /// A delivery of the workspace with every attempt, oldest first.
    pub async fn get_delivery(
        &self,
        workspace: &str,
        id: &str,
    ) -> Result<(delivery::Model, Vec<attempt::Model>), StoreError> {
        let d = delivery::Entity::find_by_id(id.to_owned())
            .filter(delivery::Column::WorkspaceId.eq(workspace))
            .one(&self.db)
            .await?
            .ok_or(StoreError::NotFound("delivery"))?;
        let attempts = attempt::Entity::find()
            .filter(attempt::Column::DeliveryId.eq(id))
            .order_by_asc(attempt::Column::Id)
            .all(&self.db)
            .await?;
        Ok((d, attempts))
    }

    /// Deliveries by id (any workspace), for change notifications.
    pub async fn deliveries_by_ids(&self, ids: Vec<String>) -> Result<Vec<delivery::Model>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(1000) {
            out.extend(
                delivery::Entity::find().filter(delivery::Column::Id.is_in(chunk.to_vec())).all(&self.db).await?,
            );
        }
        Ok(out)
    }

    /// Makes one more attempt of a delivery due now. A pending one just becomes due; a finished
    /// one gets one manual attempt that, if it fails, returns it to where it was.
    pub async fn retry_delivery(&self, workspace: &str, id: &str) -> Result<delivery::Model, StoreError> {
        let (workspace, id) = (workspace.to_owned(), id.to_owned());
        let peers = self.peers.clone();
        self.writer
            .write(move |txn| {
                Box::pin(async move {
                    let d = delivery::Entity::find_by_id(id.clone())
                        .filter(delivery::Column::WorkspaceId.eq(&workspace))
                        .one(txn)
                        .await?
                        .ok_or(StoreError::NotFound("delivery"))?;
                    let now = now_millis();
                    let manual_from = match d.status {
                        status::IN_FLIGHT => {
                            return Err(StoreError::invalid(
                                "id",
                                "the delivery is being attempted right now; wait for its result",
                            ));
                        }
                        status::PENDING | status::PARKED => d.manual_from,
                        finished => Some(finished),
                    };
                    let (active, zone) = active_state(txn, &d.webhook_id, None)
                        .await?
                        .ok_or_else(|| StoreError::invalid("id", "the delivery's webhook was deleted"))?;
                    let to = if active { status::PENDING } else { status::PARKED };
                    // Fenced by the status read: a claim or result that committed meanwhile (on
                    // PostgreSQL the dispatcher writes beside this writer) is never overwritten.
                    let changed = delivery::Entity::update_many()
                        .col_expr(delivery::Column::Status, Expr::value(to))
                        .col_expr(delivery::Column::Zone, Expr::value(zone.clone()))
                        .col_expr(delivery::Column::NextAttemptAt, Expr::value(now))
                        .col_expr(delivery::Column::ManualFrom, Expr::value(manual_from))
                        .col_expr(delivery::Column::UpdatedAt, Expr::value(now))
                        .filter(delivery::Column::Id.eq(&id))
                        .filter(delivery::Column::Status.eq(d.status))
                        .exec(txn)
                        .await?;
                    if changed.rows_affected == 0 {
                        return Err(StoreError::invalid(
                            "id",
                            "the delivery is being attempted right now; wait for its result",
                        ));
                    }
                    // The zone's agents may be on another replica.
                    super::wake_others(txn, &peers).await?;
                    Ok(delivery::Model { status: to, zone, next_attempt_at: now, manual_from, updated_at: now, ..d })
                })
            })
            .await
    }

    /// Re-opens a webhook's failed (or, with `include_all`, finished) deliveries created in
    /// `[after, before)`, with a fresh retry schedule, in one transaction. Returns those reopened.
    pub async fn replay_webhook(
        &self,
        workspace: &str,
        webhook_id: &str,
        after: i64,
        before: i64,
        include_all: bool,
    ) -> Result<Changed, StoreError> {
        let (workspace, webhook_id) = (workspace.to_owned(), webhook_id.to_owned());
        let peers = self.peers.clone();
        let watched = self.watched();
        self.writer
            .write(move |txn| {
                Box::pin(async move {
                    let (active, zone) = active_state(txn, &webhook_id, Some(&workspace))
                        .await?
                        .ok_or(StoreError::NotFound("webhook"))?;
                    let now = now_millis();
                    let reopen = delivery::Entity::update_many()
                        .col_expr(
                            delivery::Column::Status,
                            Expr::value(if active { status::PENDING } else { status::PARKED }),
                        )
                        .col_expr(delivery::Column::Zone, Expr::value(zone))
                        .col_expr(delivery::Column::NextAttemptAt, Expr::value(now))
                        .col_expr(delivery::Column::AttemptCount, Expr::value(0))
                        .col_expr(delivery::Column::LostLeases, Expr::value(0))
                        .col_expr(delivery::Column::ManualFrom, Expr::value(Option::<i16>::None))
                        .col_expr(delivery::Column::UpdatedAt, Expr::value(now));
                    let statement =
                        replay_update(txn.get_database_backend(), reopen, &webhook_id, after, before, include_all);
                    let mut reopened = Changed::default();
                    reopened.update(txn, statement, watched).await?;
                    if reopened.count > 0 {
                        super::wake_others(txn, &peers).await?;
                    }
                    Ok(reopened)
                })
            })
            .await
    }

    /// Publishes a synthetic event (`data.test = true`) to one webhook; returns the event and
    /// delivery ids.
    pub async fn send_test_event(
        &self,
        workspace: &str,
        webhook_id: &str,
        event_type: &str,
        timestamp: String,
    ) -> Result<(String, String), StoreError> {
        let (workspace, webhook_id, event_type) = (workspace.to_owned(), webhook_id.to_owned(), event_type.to_owned());
        let peers = self.peers.clone();
        self.writer
            .write(move |txn| {
                Box::pin(async move {
                    let hook = webhook::Entity::find_by_id(webhook_id.clone())
                        .filter(webhook::Column::WorkspaceId.eq(&workspace))
                        .filter(webhook::Column::DeletedAt.is_null())
                        .one(txn)
                        .await?
                        .ok_or(StoreError::NotFound("webhook"))?;
                    if !hook.active {
                        return Err(StoreError::invalid("webhook_id", "the webhook is paused: activate it to test it"));
                    }
                    let now = now_millis();
                    let event_id = herald_shared::ids::new_id(herald_shared::ids::EVENT);
                    event::Entity::insert(event::ActiveModel {
                        workspace_id: Set(workspace.clone()),
                        id: Set(event_id.clone()),
                        event_type: Set(event_type.clone()),
                        timestamp: Set(timestamp),
                        timestamp_supplied: Set(false),
                        data: Set(r#"{"test":true}"#.to_owned()),
                        test: Set(true),
                        created_at: Set(now),
                        trace_context: Set(None),
                    })
                    .exec_without_returning(txn)
                    .await?;
                    let row = NewDelivery {
                        workspace: &workspace,
                        event_id: &event_id,
                        event_type: &event_type,
                        webhook_id: &webhook_id,
                        zone: &hook.zone,
                        test: true,
                        created_at: now,
                        due: now,
                    }
                    .row();
                    let delivery_id = row.id.clone().unwrap();
                    delivery::Entity::insert(row).exec_without_returning(txn).await?;
                    super::wake_others(txn, &peers).await?;
                    Ok((event_id, delivery_id))
                })
            })
            .await
    }
}
