//! Start-up shortcuts shared by the test modules.

use herald_control_plane::config::Config;
use herald_tests::{Backend, ControlPlane, TestDb};

/// A control plane on a fresh database of `backend`, with plain `http` URLs refused (the default
/// users get), and the database handle kept for inspection.
pub async fn start(backend: Backend) -> (ControlPlane, TestDb) {
    start_with(backend, |_| {}).await
}

pub async fn start_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> (ControlPlane, TestDb) {
    let db = TestDb::new(backend).await;
    let mut config = Config::for_tests(db.url.clone());
    config.allow_http = false;
    tweak(&mut config);
    (ControlPlane::start(config).await, db)
}
