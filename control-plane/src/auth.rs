//! API-key authentication and scopes.
//!
//! Every API call carries `authorization: Bearer <key>`. A key belongs to one workspace and has a
//! scope: `admin` (everything) or `publish` (EventService only). Successful look-ups are cached
//! briefly so that publishing does not pay a database read per call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::{Request, Status};

use crate::store::{Store, StoreError};

/// How long a successful key look-up is trusted without asking the database again.
const CACHE_TTL: Duration = Duration::from_secs(30);
/// Entries kept at most; the cache is cleared when full.
const CACHE_MAX: usize = 10_000;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Admin,
    Publish,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Publish => "publish",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "admin" => Some(Scope::Admin),
            "publish" => Some(Scope::Publish),
            _ => None,
        }
    }
}

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub workspace: String,
    pub scope: Scope,
}

/// Checks bearer keys against the store.
#[derive(Clone)]
pub struct Authenticator {
    store: Store,
    cache: Arc<Mutex<HashMap<String, (Principal, Instant)>>>,
    /// Counts revocations heard: a key read from the database while one arrived may be the key
    /// just revoked, and is answered for that call but not cached.
    forgotten: Arc<std::sync::atomic::AtomicU64>,
}

impl Authenticator {
    pub fn new(store: Store) -> Self {
        Authenticator { store, cache: Arc::default(), forgotten: Arc::default() }
    }

    /// Forgets an accepted key (by its hash): it was revoked.
    pub fn forget(&self, key_hash: &str) {
        let mut cache = self.cache.lock().expect("cache lock");
        cache.remove(key_hash);
        self.forgotten.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Forgets every accepted key: revocations may have been missed.
    pub fn forget_all(&self) {
        let mut cache = self.cache.lock().expect("cache lock");
        cache.clear();
        self.forgotten.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// The caller of `request`, who must hold `needed` (an admin key holds every scope).
    pub async fn check<T>(&self, request: &Request<T>, needed: Scope) -> Result<Principal, Status> {
        self.check_key(bearer(request)?, needed).await
    }

    /// The holder of `key`, who must hold `needed`: for a long call (a watch) to ask again
    /// whether the key it was opened with still holds.
    pub async fn check_key(&self, key: &str, needed: Scope) -> Result<Principal, Status> {
        let principal = self.lookup(key).await?;
        if needed == Scope::Admin && principal.scope != Scope::Admin {
            return Err(Status::permission_denied("this API key has scope `publish`, which allows EventService only"));
        }
        Ok(principal)
    }

    async fn lookup(&self, key: &str) -> Result<Principal, Status> {
        let hash = crate::store::keys::hash_key(key);
        if let Some((p, at)) = self.cache.lock().expect("cache lock").get(&hash)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(p.clone());
        }
        let forgotten = self.forgotten.load(std::sync::atomic::Ordering::SeqCst);
        match self.store.find_api_key(key).await {
            Ok(Some((workspace, scope))) => {
                let p = Principal { workspace, scope };
                let mut cache = self.cache.lock().expect("cache lock");
                if self.forgotten.load(std::sync::atomic::Ordering::SeqCst) == forgotten {
                    if cache.len() >= CACHE_MAX {
                        cache.clear();
                    }
                    cache.insert(hash, (p.clone(), Instant::now()));
                }
                Ok(p)
            }
            Ok(None) => Err(Status::unauthenticated("unknown API key")),
            Err(StoreError::Unavailable(e)) => {
                tracing::warn!(error = %e, "cannot check an API key");
                Err(Status::unavailable("database unavailable"))
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot check an API key");
                Err(Status::internal("internal error"))
            }
        }
    }
}

/// The bearer token of a request.
pub fn bearer<T>(request: &Request<T>) -> Result<&str, Status> {
    let value = request
        .metadata()
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <key>` metadata"))?;
    let value = value.to_str().map_err(|_| Status::unauthenticated("malformed authorization metadata"))?;
    let key = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| Status::unauthenticated("authorization metadata must be `Bearer <key>`"))?;
    Ok(key)
}

/// Workspace ids: `[A-Za-z0-9_-]{1,64}`.
pub fn validate_workspace_id(id: &str) -> Result<(), String> {
    if herald_shared::ids::is_valid_event_id(id) {
        Ok(())
    } else {
        Err(format!("{id:?} is not a valid workspace id: use 1 to 64 of A-Z a-z 0-9 _ -"))
    }
}
