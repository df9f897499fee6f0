//! Workspaces and API keys.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;
use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter};

use super::{Store, StoreError, now_millis};
use crate::auth::Scope;
use crate::db::entity::{api_key, workspace};

/// Prefix of API keys, so that a leaked key is recognisable by secret scanners.
pub const KEY_PREFIX: &str = "hk_";
/// On PostgreSQL, a revoked key's hash is announced here in the revoking transaction: every
/// control plane listening drops it from its cache of accepted keys at once.
pub const KEYS_CHANNEL: &str = "herald_keys";

/// Lowercase hex SHA-256 of an API key: the only form in which keys are stored.
pub fn hash_key(key: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, key.as_bytes()))
}

/// A new random API key.
pub fn generate_key() -> String {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(raw))
}

async fn ensure_workspace(db: &impl ConnectionTrait, id: &str) -> Result<(), StoreError> {
    workspace::Entity::insert(workspace::ActiveModel { id: Set(id.to_owned()), created_at: Set(now_millis()) })
        .on_conflict(OnConflict::column(workspace::Column::Id).do_nothing().to_owned())
        .exec_without_returning(db)
        .await?;
    Ok(())
}

impl Store {
    /// Stores `key` (hashed) for `workspace`, creating the workspace if needed. Storing a key that
    /// already exists for the same workspace and scope is a no-op.
    pub async fn put_api_key(&self, workspace: &str, key: &str, scope: Scope) -> Result<(), StoreError> {
        let (workspace, hash) = (workspace.to_owned(), hash_key(key));
        self.writer
            .write(move |txn| {
                Box::pin(async move {
                    ensure_workspace(txn, &workspace).await?;
                    let existing = api_key::Entity::find().filter(api_key::Column::KeyHash.eq(&hash)).one(txn).await?;
                    match existing {
                        Some(k) if k.workspace_id == workspace && k.scope == scope.as_str() => Ok(()),
                        Some(_) => Err(StoreError::AlreadyExists {
                            field: "api_key".into(),
                            message: "this key already belongs to another workspace or scope".into(),
                        }),
                        None => {
                            api_key::Entity::insert(api_key::ActiveModel {
                                id: Set(herald_shared::ids::new_id(herald_shared::ids::API_KEY)),
                                workspace_id: Set(workspace),
                                key_hash: Set(hash),
                                scope: Set(scope.as_str().to_owned()),
                                created_at: Set(now_millis()),
                            })
                            .exec_without_returning(txn)
                            .await?;
                            Ok(())
                        }
                    }
                })
            })
            .await
    }

    /// The API keys, oldest first, of one workspace or of all.
    pub async fn list_api_keys(&self, workspace: Option<&str>) -> Result<Vec<api_key::Model>, StoreError> {
        let mut q = api_key::Entity::find();
        if let Some(w) = workspace {
            q = q.filter(api_key::Column::WorkspaceId.eq(w));
        }
        let mut keys = q.all(&self.db).await?;
        keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(keys)
    }

    /// Deletes an API key, named by its id (`key_…`) or by the key itself (anything else: keys
    /// made by `keys create` start `hk_`, a bootstrap key may be any string); returns it.
    /// On PostgreSQL the control planes listening forget it at once ([`KEYS_CHANNEL`]); a control
    /// plane that accepted it within the last 30 s and does not hear that (SQLite has no
    /// notifications) refuses it once its cache entry lapses.
    pub async fn revoke_api_key(&self, id_or_key: &str) -> Result<api_key::Model, StoreError> {
        let id_prefix = format!("{}_", herald_shared::ids::API_KEY);
        let by_key = !id_or_key.starts_with(&id_prefix);
        let wanted = if by_key { hash_key(id_or_key) } else { id_or_key.to_owned() };
        self.writer
            .write(move |txn| {
                Box::pin(async move {
                    let column = if by_key { api_key::Column::KeyHash } else { api_key::Column::Id };
                    let key = api_key::Entity::find()
                        .filter(column.eq(&wanted))
                        .one(txn)
                        .await?
                        .ok_or(StoreError::NotFound("api key"))?;
                    api_key::Entity::delete_by_id(key.id.clone()).exec(txn).await?;
                    if txn.get_database_backend() == sea_orm::DbBackend::Postgres {
                        txn.execute_raw(super::notify(KEYS_CHANNEL, key.key_hash.clone())).await?;
                    }
                    Ok(key)
                })
            })
            .await
    }

    /// The workspace and scope of a key, if it exists.
    pub async fn find_api_key(&self, key: &str) -> Result<Option<(String, Scope)>, StoreError> {
        let row = api_key::Entity::find().filter(api_key::Column::KeyHash.eq(hash_key(key))).one(&self.db).await?;
        Ok(row.and_then(|k| Scope::parse(&k.scope).map(|s| (k.workspace_id, s))))
    }
}
