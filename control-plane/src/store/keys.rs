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

    /// The workspace and scope of a key, if it exists.
    pub async fn find_api_key(&self, key: &str) -> Result<Option<(String, Scope)>, StoreError> {
        let row = api_key::Entity::find().filter(api_key::Column::KeyHash.eq(hash_key(key))).one(&self.db).await?;
        Ok(row.and_then(|k| Scope::parse(&k.scope).map(|s| (k.workspace_id, s))))
    }
}
