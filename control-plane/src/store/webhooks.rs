//! Webhooks: create, read, list, update, delete, rotate. Secret material is sealed on the way in
//! and opened on the way out; masking for reads happens at the gRPC edge.

use std::collections::BTreeMap;

use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, IntoActiveModel, QueryFilter,
    QueryOrder, QuerySelect, Statement,
};

use super::{Store, StoreError, now_millis};
use crate::crypto::SecretKey;
use crate::db::entity::delivery::{self, status};
use crate::db::entity::webhook;

const SECRET: &str = "webhook.secret";
const HEADERS: &str = "webhook.headers";
const VARS: &str = "webhook.transform_vars";

/// The PostgreSQL notification channel on which replicas tell each other which webhook changed
/// (`<replica> <webhook id>`; see [`super::webhook_changed`]).
pub const WEBHOOKS_CHANNEL: &str = "herald_webhooks";

/// What a user configures on a webhook (everything but ids, times and the secret). `Debug` masks
/// header values and transform variables.
#[derive(Clone, PartialEq)]
pub struct WebhookSpec {
    pub name: String,
    pub url: String,
    pub events: Vec<String>,
    pub headers: BTreeMap<String, String>,
    pub active: bool,
    pub zone: String,
    pub transform: Option<serde_json::Value>,
    pub transform_vars: BTreeMap<String, String>,
    pub signature_scheme: i32,
    pub timeout_ms: Option<i64>,
    pub rate_limit_per_second: Option<i64>,
    pub max_in_flight: Option<i64>,
    pub description: String,
}

impl std::fmt::Debug for WebhookSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSpec")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("events", &self.events)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("active", &self.active)
            .field("zone", &self.zone)
            .field("transform_vars", &self.transform_vars.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A stored webhook, its secret material opened.
#[derive(Clone)]
pub struct Webhook {
    pub id: String,
    pub workspace_id: String,
    pub spec: WebhookSpec,
    pub secret: String,
    pub previous_secret: Option<String>,
    pub previous_secret_until: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook").field("id", &self.id).field("name", &self.spec.name).finish_non_exhaustive()
    }
}

fn open(key: &SecretKey, m: webhook::Model) -> Result<Webhook, StoreError> {
    let crypto = |e: crate::crypto::CryptoError| StoreError::Internal(format!("webhook {}: {e}", m.id));
    let sealed_headers: BTreeMap<String, String> =
        serde_json::from_str(&m.headers).map_err(|e| StoreError::Internal(e.to_string()))?;
    let mut headers = BTreeMap::new();
    for (name, sealed) in sealed_headers {
        headers.insert(name, key.open_str(HEADERS, &sealed).map_err(crypto)?);
    }
    let transform_vars = match &m.transform_vars {
        Some(sealed) => serde_json::from_str(&key.open_str(VARS, sealed).map_err(crypto)?)
            .map_err(|e| StoreError::Internal(e.to_string()))?,
        None => BTreeMap::new(),
    };
    let transform = match &m.transform {
        Some(t) => Some(serde_json::from_str(t).map_err(|e| StoreError::Internal(e.to_string()))?),
        None => None,
    };
    let events = serde_json::from_str(&m.events).map_err(|e| StoreError::Internal(e.to_string()))?;
    let previous_secret = match &m.previous_secret {
        Some(sealed) => Some(key.open_str(SECRET, sealed).map_err(crypto)?),
        None => None,
    };
    Ok(Webhook {
        secret: key.open_str(SECRET, &m.secret).map_err(crypto)?,
        previous_secret,
        previous_secret_until: m.previous_secret_until,
        spec: WebhookSpec {
            name: m.name,
            url: m.url,
            events,
            headers,
            active: m.active,
            zone: m.zone,
            transform,
            transform_vars,
            signature_scheme: m.signature_scheme,
            timeout_ms: m.timeout_ms,
            rate_limit_per_second: m.rate_limit_per_second,
            max_in_flight: m.max_in_flight,
            description: m.description,
        },
        id: m.id,
        workspace_id: m.workspace_id,
        created_at: m.created_at,
        updated_at: m.updated_at,
    })
}

/// Writes `spec` into the sealed columns of `am`.
fn seal_spec(key: &SecretKey, spec: &WebhookSpec, am: &mut webhook::ActiveModel) {
    let headers: BTreeMap<&String, String> = spec.headers.iter().map(|(k, v)| (k, key.seal_str(HEADERS, v))).collect();
    am.name = Set(spec.name.clone());
    am.url = Set(spec.url.clone());
    am.events = Set(serde_json::to_string(&spec.events).expect("strings serialize"));
    am.headers = Set(serde_json::to_string(&headers).expect("strings serialize"));
    am.active = Set(spec.active);
    am.zone = Set(spec.zone.clone());
    am.transform = Set(spec.transform.as_ref().map(|t| t.to_string()));
    am.transform_vars = Set((!spec.transform_vars.is_empty())
        .then(|| key.seal_str(VARS, &serde_json::to_string(&spec.transform_vars).expect("strings serialize"))));
    am.signature_scheme = Set(spec.signature_scheme);
    am.timeout_ms = Set(spec.timeout_ms);
    am.rate_limit_per_second = Set(spec.rate_limit_per_second);
    am.max_in_flight = Set(spec.max_in_flight);
    am.description = Set(spec.description.clone());
}

/// Whether a live webhook (of `workspace`, when given) is active, and its zone; `None` when there
/// is none. Callers return deliveries to the queue, pending or parked, by the answer, in that
/// zone (a finished delivery may date from before a zone change): on PostgreSQL the webhook's
/// row stays share-locked until their transaction commits, so that a pause or zone change
/// committing meanwhile (beside this writer, or on another replica) waits, and then finds what
/// they reopened among the open rows of the webhook's zone.
pub(crate) async fn active_state(
    db: &impl ConnectionTrait,
    webhook_id: &str,
    workspace: Option<&str>,
) -> Result<Option<(bool, String)>, StoreError> {
    let mut q = webhook::Entity::find_by_id(webhook_id.to_owned()).filter(webhook::Column::DeletedAt.is_null());
    if let Some(ws) = workspace {
        q = q.filter(webhook::Column::WorkspaceId.eq(ws));
    }
    if db.get_database_backend() == sea_orm::DbBackend::Postgres {
        q = q.lock_shared();
    }
    Ok(q.select_only()
        .column(webhook::Column::Active)
        .column(webhook::Column::Zone)
        .into_tuple::<(bool, String)>()
        .one(db)
        .await?)
}

/// Loads a live (not deleted) webhook of the workspace.
/// Applies the update `update` makes to the deliveries of `webhook` in the open statuses `from`,
/// which lie in `zone`, the webhook's zone; returns how many rows changed. Never by reading every
/// delivery the webhook ever had:
/// - on SQLite `deliveries_by_webhook` holds the webhook alone (migration 9, so that leases and
///   results do not rewrite it): one statement per status, each through the partial index of
///   that status (`deliveries_due` and `deliveries_parked` within the zone, `deliveries_leased`),
///   named with `INDEXED BY`, which fails the statement rather than let it be planned otherwise.
///   The one writer runs nothing between them.
/// - on PostgreSQL `(webhook_id, status)` serves one statement for every status. One, because a
///   row a result changes meanwhile (the dispatcher writes beside this writer) is re-checked
///   when its lock is released: an in-flight row that became pending is still found.
pub(crate) async fn update_open_rows<F>(
    txn: &DatabaseTransaction,
    update: F,
    webhook: &str,
    zone: &str,
    from: &[i16],
    watched: bool,
) -> Result<Changed, StoreError>
where
    F: Fn() -> sea_orm::UpdateMany<delivery::Entity>,
{
    let mut changed = Changed::default();
    for statement in open_rows_updates(txn.get_database_backend(), update, webhook, zone, from) {
        changed.update(txn, statement, watched).await?;
    }
    Ok(changed)
}

/// The deliveries a change of many at once (a pause, a re-activation, a zone change, a
/// deletion, a replay) changed, for `WatchDeliveries`: how many, and their ids while there are
/// at most [`Changed::LISTED`]. Past that a watcher is told how many changed rather than sent
/// each, as one that fell behind is.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changed {
    pub ids: Vec<String>,
    pub count: u64,
    /// No one watched: the rows were counted, their ids not read.
    pub unwatched: bool,
}

impl Changed {
    /// The most ids kept.
    pub const LISTED: usize = 1000;

    /// Whether `ids` holds every changed delivery.
    pub fn listed(&self) -> bool {
        !self.unwatched && self.ids.len() as u64 == self.count
    }

    /// Runs `statement`, an `UPDATE` of deliveries, counting the rows it changed; when someone
    /// may be `watched`, with `RETURNING "id"`, keeping their ids while they are few. The ids are
    /// read as they come (a pause of a webhook with a million pending changes a million rows):
    /// Herald holds [`Changed::LISTED`] at most. SQLite gathers a statement's `RETURNING` rows
    /// before handing back the first (in its temporary store, in memory), which is why they are
    /// asked for only while someone watches; PostgreSQL's spill to disk past `work_mem`.
    pub(crate) async fn update(
        &mut self,
        txn: &DatabaseTransaction,
        mut statement: Statement,
        watched: bool,
    ) -> Result<(), StoreError> {
        use futures::StreamExt as _;
        if !watched {
            self.count += txn.execute_raw(statement).await?.rows_affected();
            self.ids = Vec::new();
            self.unwatched = true;
            return Ok(());
        }
        statement.sql.push_str(" RETURNING \"id\"");
        let mut rows = sea_orm::StreamTrait::stream_raw(txn, statement).await?;
        while let Some(row) = rows.next().await {
            let id: String = row?.try_get_by_index(0)?;
            let all_so_far = self.listed();
            self.count += 1;
            if all_so_far && self.ids.len() < Self::LISTED {
                self.ids.push(id);
            } else if !self.ids.is_empty() {
                self.ids = Vec::new();
            }
        }
        Ok(())
    }
}

/// The statements of [`update_open_rows`].
pub fn open_rows_updates<F>(
    backend: sea_orm::DbBackend,
    update: F,
    webhook: &str,
    zone: &str,
    from: &[i16],
) -> Vec<sea_orm::Statement>
where
    F: Fn() -> sea_orm::UpdateMany<delivery::Entity>,
{
    let of_webhook = || update().filter(delivery::Column::WebhookId.eq(webhook));
    if backend != sea_orm::DbBackend::Sqlite {
        let all = of_webhook().filter(delivery::Column::Status.is_in(from.to_vec()));
        return vec![sea_orm::QueryTrait::build(&all, backend)];
    }
    from.iter()
        .map(|&one_status| {
            let (index, in_zone) = match one_status {
                status::PENDING => ("deliveries_due", true),
                status::PARKED => ("deliveries_parked", true),
                _ => ("deliveries_leased", false),
            };
            let mut one = of_webhook().filter(super::queue::status_is(one_status));
            if in_zone {
                one = one.filter(delivery::Column::Zone.eq(zone));
            }
            super::queue::sqlite_update_indexed_by(sea_orm::QueryTrait::build(&one, backend), index)
        })
        .collect()
}

async fn load(db: &impl ConnectionTrait, workspace: &str, id: &str) -> Result<webhook::Model, StoreError> {
    webhook::Entity::find_by_id(id.to_owned())
        .filter(webhook::Column::WorkspaceId.eq(workspace))
        .filter(webhook::Column::DeletedAt.is_null())
        .one(db)
        .await?
        .ok_or(StoreError::NotFound("webhook"))
}

impl Store {
    /// Creates a webhook with `secret`.
    pub async fn create_webhook(
        &self,
        workspace: &str,
        spec: WebhookSpec,
        secret: String,
    ) -> Result<Webhook, StoreError> {
        let (key, peers) = (self.key.clone(), self.peers.clone());
        let workspace = workspace.to_owned();
        // Before the write as well as after: a caller gone mid-way leaves it committed.
        self.webhooks_changed();
        let created = self
            .writer
            .write(move |txn| {
                Box::pin(async move {
                    let now = now_millis();
                    let mut am = webhook::ActiveModel {
                        id: Set(herald_shared::ids::new_id(herald_shared::ids::WEBHOOK)),
                        workspace_id: Set(workspace),
                        secret: Set(key.seal_str(SECRET, &secret)),
                        previous_secret: Set(None),
                        previous_secret_until: Set(None),
                        created_at: Set(now),
                        updated_at: Set(now),
                        deleted_at: Set(None),
                        ..Default::default()
                    };
                    seal_spec(&key, &spec, &mut am);
                    let model = webhook::Entity::insert(am).exec_with_returning(txn).await?;
                    // Other replicas learn that this workspace's fan-out changed.
                    super::webhook_changed(txn, &peers, &model.id).await?;
                    open(&key, model)
                })
            })
            .await;
        self.webhooks_changed();
        created
    }

    /// Reads a live webhook of any workspace (for dispatching, which has no caller workspace).
    pub async fn get_webhook_any(&self, id: &str) -> Result<Webhook, StoreError> {
        let model = webhook::Entity::find_by_id(id.to_owned())
            .filter(webhook::Column::DeletedAt.is_null())
            .one(&self.db)
            .await?
            .ok_or(StoreError::NotFound("webhook"))?;
        open(&self.key, model)
    }

    /// Reads a webhook of the workspace.
    pub async fn get_webhook(&self, workspace: &str, id: &str) -> Result<Webhook, StoreError> {
        open(&self.key, load(&self.db, workspace, id).await?)
    }

    /// A page of the workspace's webhooks after `after` (an id), oldest first, and whether more
    /// follow.
    pub async fn list_webhooks(
        &self,
        workspace: &str,
        after: Option<&str>,
        limit: u64,
    ) -> Result<(Vec<Webhook>, bool), StoreError> {
        let mut q = webhook::Entity::find()
            .filter(webhook::Column::WorkspaceId.eq(workspace))
            .filter(webhook::Column::DeletedAt.is_null());
        if let Some(after) = after {
            q = q.filter(webhook::Column::Id.gt(after));
        }
        let mut rows = q.order_by_asc(webhook::Column::Id).limit(limit + 1).all(&self.db).await?;
        let more = rows.len() as u64 > limit;
        rows.truncate(limit as usize);
        let hooks = rows.into_iter().map(|m| open(&self.key, m)).collect::<Result<Vec<_>, _>>()?;
        Ok((hooks, more))
    }

    /// Updates a webhook: `change` gets the stored webhook and returns the new one (or refuses it),
    /// inside the write transaction, so concurrent updates never lose each other's fields.
    /// Pausing parks its pending deliveries; re-activating makes them claimable again; a new zone
    /// moves its open deliveries to that zone. Returns the webhook, and the deliveries it changed.
    pub async fn update_webhook<F>(
        &self,
        workspace: &str,
        id: &str,
        change: F,
    ) -> Result<(Webhook, Changed), StoreError>
    where
        F: FnOnce(&Webhook) -> Result<WebhookSpec, StoreError> + Send + 'static,
    {
        let (key, peers) = (self.key.clone(), self.peers.clone());
        let watched = self.watched();
        let (workspace, id) = (workspace.to_owned(), id.to_owned());
        self.webhooks_changed();
        let written = self
            .writer
            .write(move |txn| {
                Box::pin(async move {
                    let model = load(txn, &workspace, &id).await?;
                    let current = open(&key, model.clone())?;
                    let spec = change(&current)?;
                    let now = now_millis();
                    let mut am = model.into_active_model();
                    seal_spec(&key, &spec, &mut am);
                    am.updated_at = Set(now);
                    let updated = webhook::Entity::update(am).exec(txn).await?;
                    let zone = &current.spec.zone;
                    let mut changed = Changed::default();
                    if spec.active != current.spec.active {
                        let (from, to) = if spec.active {
                            (status::PARKED, status::PENDING)
                        } else {
                            (status::PENDING, status::PARKED)
                        };
                        let update = || {
                            delivery::Entity::update_many()
                                .col_expr(delivery::Column::Status, Expr::value(to))
                                .col_expr(delivery::Column::UpdatedAt, Expr::value(now))
                        };
                        changed = update_open_rows(txn, update, &id, zone, &[from], watched).await?;
                    }
                    if spec.zone != *zone {
                        let update = || {
                            delivery::Entity::update_many()
                                .col_expr(delivery::Column::Zone, Expr::value(spec.zone.clone()))
                        };
                        // Every open row: those just parked or reopened are among them.
                        changed = update_open_rows(txn, update, &id, zone, &status::OPEN, watched).await?;
                    }
                    super::webhook_changed(txn, &peers, &id).await?;
                    Ok((open(&key, updated)?, changed))
                })
            })
            .await;
        self.webhooks_changed();
        written
    }

    /// Soft-deletes a webhook and cancels its open deliveries; returns those cancelled.
    pub async fn delete_webhook(&self, workspace: &str, id: &str) -> Result<Changed, StoreError> {
        let (workspace, id) = (workspace.to_owned(), id.to_owned());
        let peers = self.peers.clone();
        let watched = self.watched();
        self.webhooks_changed();
        let written = self
            .writer
            .write(move |txn| {
                Box::pin(async move {
                    let model = load(txn, &workspace, &id).await?;
                    let now = now_millis();
                    let zone = model.zone.clone();
                    let mut am = model.into_active_model();
                    am.deleted_at = Set(Some(now));
                    am.active = Set(false);
                    am.updated_at = Set(now);
                    webhook::Entity::update(am).exec(txn).await?;
                    let update = || {
                        delivery::Entity::update_many()
                            .col_expr(delivery::Column::Status, Expr::value(status::CANCELLED))
                            .col_expr(delivery::Column::LeaseId, Expr::value(Option::<String>::None))
                            .col_expr(delivery::Column::UpdatedAt, Expr::value(now))
                    };
                    let cancelled = update_open_rows(txn, update, &id, &zone, &status::OPEN, watched).await?;
                    super::webhook_changed(txn, &peers, &id).await?;
                    Ok(cancelled)
                })
            })
            .await;
        self.webhooks_changed();
        written
    }

    /// Replaces the secret; the old one keeps signing until `grace_until` (milliseconds).
    pub async fn rotate_secret(
        &self,
        workspace: &str,
        id: &str,
        new_secret: String,
        grace_until: i64,
    ) -> Result<Webhook, StoreError> {
        let (key, peers) = (self.key.clone(), self.peers.clone());
        let (workspace, id) = (workspace.to_owned(), id.to_owned());
        self.writer
            .write(move |txn| {
                Box::pin(async move {
                    let model = load(txn, &workspace, &id).await?;
                    let old_sealed = model.secret.clone();
                    let mut am = model.into_active_model();
                    am.previous_secret = Set(Some(old_sealed));
                    am.previous_secret_until = Set(Some(grace_until));
                    am.secret = Set(key.seal_str(SECRET, &new_secret));
                    am.updated_at = Set(now_millis());
                    let updated = webhook::Entity::update(am).exec(txn).await?;
                    super::webhook_changed(txn, &peers, &id).await?;
                    open(&key, updated)
                })
            })
            .await
    }
}

impl Store {
    /// Re-seals every secret, header value and transform variable that a retired key sealed under
    /// the current key (`herald rekey`), and returns how many webhooks it rewrote. A row is
    /// rewritten only if it did not change since it was read; a pass repeats until none is left,
    /// so running beside a control plane that holds both keys is safe.
    pub async fn reseal_all(&self) -> Result<u64, StoreError> {
        let key = &self.key;
        let crypto = |id: &str, e: crate::crypto::CryptoError| StoreError::Internal(format!("webhook {id}: {e}"));
        let reseal = |id: &str, purpose: &str, sealed: &str| -> Result<String, StoreError> {
            match key.sealed_by_current(sealed) {
                true => Ok(sealed.to_owned()),
                false => Ok(key.seal(purpose, &key.open(purpose, sealed).map_err(|e| crypto(id, e))?)),
            }
        };
        let mut rewritten = 0;
        for _pass in 0..10 {
            let mut stale = 0;
            for m in webhook::Entity::find().order_by_asc(webhook::Column::Id).all(&self.db).await? {
                let headers: BTreeMap<String, String> =
                    serde_json::from_str(&m.headers).map_err(|e| StoreError::Internal(e.to_string()))?;
                let sealed = std::iter::once(&m.secret)
                    .chain(m.previous_secret.iter())
                    .chain(m.transform_vars.iter())
                    .chain(headers.values());
                if sealed.clone().all(|s| key.sealed_by_current(s)) {
                    continue;
                }
                let headers = headers
                    .iter()
                    .map(|(name, v)| Ok((name.clone(), reseal(&m.id, HEADERS, v)?)))
                    .collect::<Result<BTreeMap<_, _>, StoreError>>()?;
                let previous = m.previous_secret.as_deref().map(|s| reseal(&m.id, SECRET, s)).transpose()?;
                let vars = m.transform_vars.as_deref().map(|s| reseal(&m.id, VARS, s)).transpose()?;
                let done = webhook::Entity::update_many()
                    .col_expr(webhook::Column::Secret, Expr::value(reseal(&m.id, SECRET, &m.secret)?))
                    .col_expr(webhook::Column::PreviousSecret, Expr::value(previous))
                    .col_expr(webhook::Column::TransformVars, Expr::value(vars))
                    .col_expr(webhook::Column::Headers, Expr::value(serde_json::to_string(&headers).expect("strings")))
                    .filter(webhook::Column::Id.eq(&m.id))
                    .filter(webhook::Column::UpdatedAt.eq(m.updated_at))
                    .filter(webhook::Column::Secret.eq(&m.secret))
                    .exec(&self.db)
                    .await?;
                match done.rows_affected {
                    0 => stale += 1,
                    n => rewritten += n,
                }
            }
            if stale == 0 {
                return Ok(rewritten);
            }
        }
        Err(StoreError::Unavailable("webhooks kept changing while they were re-sealed; run rekey again".into()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::SeqCst;

    use super::*;

    /// Creating, changing and deleting a webhook each move the count that the publish loops
    /// check before they trust a workspace's learned fan-out (`events::FanOut::refresh`).
    #[tokio::test]
    async fn webhook_writes_move_the_fan_out_generation() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::connect(&format!("sqlite://{}", dir.path().join("g.db").display())).await.unwrap();
        crate::db::migrate(&db).await.unwrap();
        let store = Store::new(db, SecretKey::from_bytes([1; 32]));
        let generation = || store.webhooks_generation.load(SeqCst);
        let spec = WebhookSpec {
            name: "payments".into(),
            url: "https://example.com/hook".into(),
            events: vec!["*".into()],
            headers: BTreeMap::new(),
            active: true,
            zone: "default".into(),
            transform: None,
            transform_vars: BTreeMap::new(),
            signature_scheme: 0,
            timeout_ms: None,
            rate_limit_per_second: None,
            max_in_flight: None,
            description: String::new(),
        };
        let before = generation();
        let created = store.create_webhook("ws", spec, "a-secret-of-enough-length-42".into()).await.unwrap();
        let after_create = generation();
        assert!(after_create > before, "created");
        let paused = store.update_webhook("ws", &created.id, |w| {
            let mut spec = w.spec.clone();
            spec.active = false;
            Ok(spec)
        });
        assert!(!paused.await.unwrap().0.spec.active);
        let after_update = generation();
        assert!(after_update > after_create, "updated");
        assert_eq!(store.delete_webhook("ws", &created.id).await.unwrap(), Changed::default());
        assert!(generation() > after_update, "deleted");
    }
}
