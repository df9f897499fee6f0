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

/// A control plane on SQLite that takes agents presenting `token`, for any zone.
pub async fn start_for_agent_token(token: &str) -> (ControlPlane, TestDb) {
    use herald_control_plane::config::AgentToken;
    start_with(Backend::Sqlite, |c| c.agent_tokens = vec![AgentToken { token: token.into(), zones: None }]).await
}

/// An agent session driven by hand: the test decides what it says and when.
pub struct HandAgent {
    tx: tokio::sync::mpsc::UnboundedSender<herald_shared::proto::AgentMessage>,
    inbound: tonic::Streaming<herald_shared::proto::ControlMessage>,
}

impl HandAgent {
    /// Opens a session of zone `default` with `token`, able to hold `capacity` jobs, bringing
    /// `pending` results kept from an earlier session in its hello. No credit yet.
    pub async fn open(
        cp: &ControlPlane,
        token: &str,
        capacity: u32,
        pending: Vec<herald_shared::proto::AttemptResult>,
    ) -> HandAgent {
        use herald_shared::proto::{self, agent_message};
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let hello = proto::Hello {
            agent_id: "by-hand".into(),
            zone: "default".into(),
            version: "test".into(),
            capacity,
            pending_results: pending,
            ..Default::default()
        };
        tx.send(proto::AgentMessage { msg: Some(agent_message::Msg::Hello(hello)) }).unwrap();
        let outbound = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let inbound = cp.agents_as(Some(token)).session(outbound).await.expect("session opens").into_inner();
        HandAgent { tx, inbound }
    }

    /// Grants `jobs` more credit.
    pub fn credit(&self, jobs: u32) {
        use herald_shared::proto::{self, agent_message};
        let credit = agent_message::Msg::Credit(proto::Credit { jobs });
        self.tx.send(proto::AgentMessage { msg: Some(credit) }).unwrap();
    }

    /// The next job sent, if one comes within `wait` (welcomes and heartbeats are passed over).
    pub async fn job(&mut self, wait: std::time::Duration) -> Option<herald_shared::proto::Job> {
        use herald_shared::proto::control_message;
        let inbound = &mut self.inbound;
        let next = async move {
            loop {
                match inbound.message().await.expect("the session stays open").expect("the session goes on").msg {
                    Some(control_message::Msg::Job(job)) => return job,
                    Some(control_message::Msg::Drain(d)) => panic!("drained: {}", d.reason),
                    _ => {}
                }
            }
        };
        tokio::time::timeout(wait, next).await.ok()
    }

    /// Reports `result`.
    pub fn report(&self, result: herald_shared::proto::AttemptResult) {
        use herald_shared::proto::{self, agent_message};
        self.tx.send(proto::AgentMessage { msg: Some(agent_message::Msg::Result(result)) }).unwrap();
    }

    /// Ends the session from the agent's side.
    pub fn close(self) {}
}
