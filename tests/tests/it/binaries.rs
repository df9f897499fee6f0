//! The real `herald` binary: `keys create`, `migrate`, `serve` (signals, port 0), and reflection
//! as grpcurl sees it.

use std::process::Stdio;
use std::time::Duration;

use herald_shared::proto;
use herald_tests::{Backend, TestDb, bin, event};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

both_databases!(keys_create_then_serve, keys_are_listed_and_revoked_beside_a_running_control_plane);

/// Runs `herald serve` on port 0 and returns the child and the gRPC address it logged.
async fn serve(db_url: &str, extra: &[&str]) -> (tokio::process::Child, String) {
    let mut child = Command::new(bin("herald"))
        .args(["serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--database-url", db_url])
        .args(["--secret-key", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="])
        .args(extra)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env("HERALD_LOG_FORMAT", "json")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start herald serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(60), async {
        let mut grpc = None;
        while let Some(line) = lines.next_line().await.expect("read log") {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["fields"]["message"] == "gRPC listening" {
                grpc = v["fields"]["addr"].as_str().map(String::from);
            }
            if v["fields"]["message"] == "control plane serving" {
                break;
            }
        }
        grpc.expect("herald serve logs the address it bound")
    })
    .await
    .expect("herald serve starts within 60 s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

async fn keys_create_then_serve(backend: Backend) {
    let db = TestDb::new(backend).await;
    let migrate = Command::new(bin("herald")).args(["migrate", "--database-url", &db.url]).output().await.unwrap();
    assert!(migrate.status.success(), "{}", String::from_utf8_lossy(&migrate.stderr));
    let out = Command::new(bin("herald"))
        .args(["keys", "create", "--workspace", "ws_cli", "--scope", "publish", "--database-url", &db.url])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("hk_"), "{key}");
    let bad = Command::new(bin("herald"))
        .args(["keys", "create", "--workspace", "bad workspace", "--database-url", &db.url])
        .output()
        .await
        .unwrap();
    assert!(!bad.status.success(), "an invalid workspace id is refused");

    let (mut child, addr) = serve(&db.url, &[]).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut events = proto::event_service_client::EventServiceClient::with_interceptor(
        channel.clone(),
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
            Ok(r)
        },
    );
    let published = events
        .publish_event(proto::PublishEventRequest { event: Some(event("task.started", "{}")) })
        .await
        .expect("the printed key publishes")
        .into_inner();
    assert_eq!(published.workspace_id, "ws_cli");

    // Reflection lists the four services, health and reflection, and carries the comments.
    let services = reflection_services(channel).await;
    for s in [
        "herald.v1.WebhookService",
        "herald.v1.EventService",
        "herald.v1.DeliveryService",
        "herald.v1.AgentService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.iter().any(|x| x == s), "{s} missing from {services:?}");
    }

    // SIGTERM: a graceful stop with exit code 0.
    let pid = child.id().expect("running") as i32;
    assert_eq!(unsafe_free_kill(pid, "TERM"), 0);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("stops on SIGTERM").unwrap();
    assert!(status.success(), "{status:?}");
}

/// Runs `herald keys …` against `db_url`: (success, stdout, stderr).
async fn keys(db_url: &str, args: &[&str]) -> (bool, String, String) {
    let out =
        Command::new(bin("herald")).arg("keys").args(args).args(["--database-url", db_url]).output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Opens a watch of every delivery change with `key`.
async fn watch_with(addr: &str, key: &str) -> tonic::Streaming<proto::DeliveryChange> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {key}").parse().unwrap();
    let mut deliveries = proto::delivery_service_client::DeliveryServiceClient::with_interceptor(
        channel,
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", bearer.clone());
            Ok(r)
        },
    );
    deliveries.watch_deliveries(proto::WatchDeliveriesRequest::default()).await.expect("the watch opens").into_inner()
}

/// Publishes one event with `key`; the gRPC code of the answer.
async fn publish_with(addr: &str, key: &str) -> tonic::Code {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {key}").parse().unwrap();
    let mut events =
        proto::event_service_client::EventServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", bearer.clone());
            Ok(r)
        });
    match events.publish_event(proto::PublishEventRequest { event: Some(event("task.started", "{}")) }).await {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

async fn keys_are_listed_and_revoked_beside_a_running_control_plane(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (ok, admin, err) = keys(&db.url, &["create", "--workspace", "ws_cli"]).await;
    assert!(ok, "{err}");
    let (ok, publisher, err) = keys(&db.url, &["create", "--workspace", "ws_cli", "--scope", "publish"]).await;
    assert!(ok, "{err}");
    let (admin, publisher) = (admin.trim().to_owned(), publisher.trim().to_owned());
    let (_child, addr) = serve(&db.url, &[]).await;
    assert_eq!(publish_with(&addr, &admin).await, tonic::Code::Ok, "the admin key works, and is now cached");

    // The list names each key by id, workspace and scope, and never shows a key.
    let (ok, listed, err) = keys(&db.url, &["list", "--workspace", "ws_cli"]).await;
    assert!(ok, "{err}");
    let rows: Vec<Vec<&str>> = listed.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 2, "{listed}");
    assert!(rows.iter().all(|r| r[0].starts_with("key_") && r[1] == "ws_cli"), "{listed}");
    assert_eq!(rows.iter().map(|r| r[2]).collect::<Vec<_>>(), ["admin", "publish"], "{listed}");
    assert!(!listed.contains("hk_"), "a listing shows no key: {listed}");
    let (ok, others, _) = keys(&db.url, &["list", "--workspace", "ws_nobody"]).await;
    assert!(ok && others.lines().count() == 1, "another workspace has no keys: {others}");

    // Revoked by id: a key not used since is refused at once.
    let (ok, out, err) = keys(&db.url, &["revoke", rows[1][0]]).await;
    assert!(ok && out.contains(rows[1][0]) && out.contains("publish"), "{out}{err}");
    assert_eq!(publish_with(&addr, &publisher).await, tonic::Code::Unauthenticated);

    // Revoked by the key itself (surrounding blanks ignored, as in the bearer), just after a call
    // that cached it. On PostgreSQL the running control plane hears of it and drops the cached
    // key; on SQLite it still accepts it until its 30-second cache entry lapses. A watch opened
    // with the key ends when the control plane has heard.
    assert_eq!(publish_with(&addr, &admin).await, tonic::Code::Ok);
    let mut watch = watch_with(&addr, &admin).await;
    let (ok, out, err) = keys(&db.url, &["revoke", &format!(" {admin} ")]).await;
    assert!(ok && out.contains(rows[0][0]), "{out}{err}");
    if backend == Backend::Postgres {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while publish_with(&addr, &admin).await != tonic::Code::Unauthenticated {
            assert!(tokio::time::Instant::now() < deadline, "the cached key still works 5 s after its revocation");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ended = tokio::time::timeout(Duration::from_secs(5), watch.message()).await;
        let ended = ended.expect("the watch ends within 5 s of the revocation").expect_err("with an error");
        assert_eq!(ended.code(), tonic::Code::Unauthenticated, "{ended:?}");
    } else {
        assert_eq!(publish_with(&addr, &admin).await, tonic::Code::Ok, "cached for up to 30 s on SQLite");
    }
    // What is given is never echoed, whatever it looks like.
    for given in [admin.as_str(), "my-bootstrap-secret"] {
        let (ok, _, err) = keys(&db.url, &["revoke", given]).await;
        assert!(!ok && err.contains("no such API key") && !err.contains(given), "{err}");
    }
    let (ok, listed, _) = keys(&db.url, &["list"]).await;
    assert!(ok && listed.lines().count() == 1, "no keys left: {listed}");
    if backend == Backend::Sqlite {
        // A path that names no database is a mistake to report, not a new database to answer
        // from: nothing is created.
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("typo.db");
        let url = format!("sqlite://{}", missing.display());
        for args in [&["list"][..], &["revoke", "key_01"][..]] {
            let (ok, _, err) = keys(&url, args).await;
            assert!(!ok && err.contains("no SQLite database at") && err.contains("typo.db"), "{args:?}: {err}");
        }
        assert!(!missing.exists(), "keys list and revoke create no database");
        let (ok, _, err) = keys("sqlite::memory:", &["list"]).await;
        assert!(!ok && err.contains("in-memory SQLite database holds nothing"), "{err}");
    }
}

/// Sends a signal with the `kill` command (the workspace forbids `unsafe`).
fn unsafe_free_kill(pid: i32, signal: &str) -> i32 {
    std::process::Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().unwrap().code().unwrap()
}

async fn reflection_services(channel: tonic::transport::Channel) -> Vec<String> {
    use tonic_reflection_client::*;
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut stream = client.server_reflection_info(tokio_stream::iter(vec![request])).await.unwrap().into_inner();
    let answer = stream.message().await.unwrap().expect("one answer");
    match answer.message_response {
        Some(server_reflection_response::MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

mod tonic_reflection_client {
    pub use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    pub use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_request, server_reflection_response,
    };
}

/// Both binaries turn transparent huge pages off for themselves (`herald_shared::memory`): with
/// the kernel's setting at `always`, zeroing fresh 2 MiB pages was 4.5% of the control plane's
/// CPU. The flag is inherited by children, so the test first checks that this process, their
/// parent, does not have it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binaries_run_on_small_pages() {
    use herald_tests::procs::{AgentProcess, ControlPlaneProcess};
    let thp = |pid: u32| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process's status");
        status.lines().find_map(|l| l.strip_prefix("THP_enabled:")).map(|v| v.trim().to_owned())
    };
    assert_eq!(
        thp(std::process::id()).as_deref(),
        Some("1"),
        "the test process runs with THP allowed (the test needs a kernel that reports THP_enabled: Linux 5.0 or later, built with THP)"
    );
    let ca = herald_tests::tls::TestCa::new();
    let db = TestDb::new(Backend::Sqlite).await;
    let cp = ControlPlaneProcess::start(&db.url, &[]).await;
    let agent = AgentProcess::start(&cp.url(), "default", "agent-1", Some(&ca.path), &[]);
    cp.wait_agents(&["agent-1"]).await;
    for (name, pid) in [("herald", cp.child.id()), ("herald-agent", agent.child.id())] {
        let pid = pid.unwrap_or_else(|| panic!("{name} is running"));
        assert_eq!(thp(pid).as_deref(), Some("0"), "{name} turned transparent huge pages off");
    }
}

/// `--worker-threads` sets how many threads run the agent's work; without it, one per core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_runs_on_the_worker_threads_it_is_given() {
    use herald_tests::procs::{AgentProcess, ControlPlaneProcess};
    let workers = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("the agent's threads")
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|comm| comm.trim() == "tokio-rt-worker")
            .count()
    };
    let ca = herald_tests::tls::TestCa::new();
    let db = TestDb::new(Backend::Sqlite).await;
    let cp = ControlPlaneProcess::start(&db.url, &[]).await;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let one = AgentProcess::start(&cp.url(), "default", "agent-1", Some(&ca.path), &["--worker-threads", "1"]);
    let more = cores + 1;
    let many = AgentProcess::with_env(
        &cp.url(),
        "default",
        "agent-2",
        Some(&ca.path),
        &["--allow-cidr", "127.0.0.0/8"],
        &[("HERALD_WORKER_THREADS", &more.to_string())],
    );
    let default = AgentProcess::start(&cp.url(), "default", "agent-3", Some(&ca.path), &[]);
    cp.wait_agents(&["agent-1", "agent-2", "agent-3"]).await;
    let pid = |a: &AgentProcess| a.child.id().expect("the agent is running");
    assert_eq!(workers(pid(&one)), 1, "--worker-threads 1");
    assert_eq!(workers(pid(&many)), more, "HERALD_WORKER_THREADS={more}");
    assert_eq!(workers(pid(&default)), cores, "one per core by default");
    let refused = Command::new(bin("herald-agent"))
        .args(["--control-plane", &cp.url(), "--token", "t", "--worker-threads", "0"])
        .output()
        .await
        .expect("run herald-agent");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "a usage error: {err}");
    assert!(err.contains("--worker-threads"), "the flag is named: {err}");
}
