//! The `herald` CLI for people, end to end: every subcommand against a real control plane and
//! agent, as tables and as `--json`, with the key from the environment or from flags.

use std::process::Stdio;
use std::time::Duration;

use herald_control_plane::db::entity::event;
use herald_tests::procs::{AgentProcess, ControlPlaneProcess};
use herald_tests::receiver::Receiver;
use herald_tests::tls::TestCa;
use herald_tests::{Backend, TestDb, bin};
use sea_orm::EntityTrait as _;
use serde_json::Value as Json;
use tokio::io::AsyncWriteExt as _;

use crate::pipeline::{WAIT, settled};

struct Cli<'a> {
    cp: &'a ControlPlaneProcess,
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Json {
        assert_eq!(self.code, 0, "stderr: {}", self.stderr);
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {}", self.stdout))
    }

    fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "stderr: {}", self.stderr);
        assert!(!self.stdout.contains('\x1b'), "no colours when stdout is not a terminal: {}", self.stdout);
        &self.stdout
    }
}

impl Cli<'_> {
    /// Runs `herald ARGS` with the server and key in the environment, `stdin` fed to it.
    async fn run(&self, args: &[&str], stdin: Option<&str>) -> Out {
        let mut child = tokio::process::Command::new(bin("herald"))
            .args(args)
            .env("HERALD_ADDR", self.cp.url())
            .env("HERALD_API_KEY", &self.cp.api_key)
            .env_remove("NO_COLOR")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("run herald");
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).await.unwrap();
        }
        drop(input);
        let out = tokio::time::timeout(WAIT, child.wait_with_output()).await.expect("herald finishes").unwrap();
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subcommand_works_for_people_and_scripts() {
    let ca = TestCa::new();
    let db = TestDb::new(Backend::Sqlite).await;
    let cp = ControlPlaneProcess::start(&db.url, &[]).await;
    let _agent = AgentProcess::start(&cp.url(), "default", "agent-1", Some(&ca.path), &["--egress-ip", "203.0.113.7"]);
    cp.wait_agents(&["agent-1"]).await;
    let receiver = Receiver::https(&ca).await;
    let cli = Cli { cp: &cp };

    // templates list
    assert!(cli.run(&["templates", "list"], None).await.ok().contains("Slack"));
    let templates = cli.run(&["templates", "list", "--json"], None).await.json();
    assert!(templates.as_array().unwrap().iter().any(|t| t["id"] == "slack" && t["transform"].is_object()));

    // webhooks create: the secret once, header values masked; a bad field is named.
    let url = receiver.url("/hook");
    let create = ["webhooks", "create", "--name", "payments", "--url", &url, "--events", "incident.*,task.failed"];
    let created = cli.run(&[&create[..], &["--header", "X-Team: payments", "--json"]].concat(), None).await.json();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(created["secret"].as_str().unwrap().starts_with("whsec_"));
    assert_eq!(created["headers"]["X-Team"], "***");
    assert_eq!(created["events"], serde_json::json!(["incident.*", "task.failed"]));
    let bad =
        cli.run(&["webhooks", "create", "--name", "x", "--url", "ftp://example.com", "--events", "*"], None).await;
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("webhook.url"), "the field is named: {}", bad.stderr);
    let other = ["webhooks", "create", "--name", "other", "--url", &url, "--events", "task.started"];
    let other = [&other[..], &["--secret", "a-secret-of-enough-length-42"]].concat();
    let table = cli.run(&other, None).await;
    assert!(table.ok().contains("a-secret-of-enough-length-42"), "the given secret is used");
    let slack = ["webhooks", "create", "--name", "chat", "--url", &url, "--template", "slack", "--json"];
    let slack = cli.run(&slack, None).await.json();
    assert!(slack["transform"].is_object(), "a template brings its transform: {slack}");
    let chat = slack["id"].as_str().unwrap().to_owned();
    let generated =
        cli.run(&["webhooks", "create", "--name", "gen", "--url", &url, "--events", "task.started"], None).await;
    assert!(generated.ok().contains("signing secret (shown once): whsec_"), "{}", generated.stdout);

    // webhooks list and get
    let listed = cli.run(&["webhooks", "list"], None).await;
    assert!(listed.ok().contains(&id) && listed.stdout.contains("payments"));
    assert_eq!(cli.run(&["webhooks", "list", "--json"], None).await.json().as_array().unwrap().len(), 4);
    let deleted = cli.run(&["webhooks", "delete", &chat], None).await;
    assert!(deleted.ok().contains(&format!("deleted {chat}")));
    let got = cli.run(&["webhooks", "get", &id, "--json"], None).await.json();
    assert!(got["secret"].is_null(), "reads never show the secret");

    // webhooks update: only the fields given change.
    let paused = cli.run(&["webhooks", "update", &id, "--name", "renamed", "--active", "false", "--json"], None).await;
    let paused = paused.json();
    assert_eq!((paused["name"].as_str(), paused["active"].as_bool()), (Some("renamed"), Some(false)));
    assert_eq!(paused["url"], url.as_str());
    assert!(cli.run(&["webhooks", "update", &id, "--active", "true"], None).await.ok().contains("active"));
    let nothing = cli.run(&["webhooks", "update", &id], None).await;
    assert!(nothing.code != 0 && nothing.stderr.contains("nothing to change"));

    // webhooks rotate-secret
    let rotated = cli.run(&["webhooks", "rotate-secret", &id, "--json"], None).await.json();
    assert!(rotated["secret"].as_str().unwrap().starts_with("whsec_") && rotated["secret"] != created["secret"]);
    assert!(rotated["rotation_grace_ends_at"].is_string());

    // webhooks test, then the delivery log
    let sample = cli.run(&["webhooks", "test", &id, "--event-type", "incident.created"], None).await;
    assert!(sample.ok().contains("queued as delivery dlv_"), "{}", sample.stdout);
    let test = cli.run(&["webhooks", "test", &id, "--json"], None).await.json();
    let test_delivery = test["delivery_id"].as_str().unwrap().to_owned();
    settled(&db, test["event_id"].as_str().unwrap()).await;
    let shown = cli.run(&["deliveries", "get", &test_delivery, "--json"], None).await.json();
    assert_eq!(shown["status"], "succeeded");
    assert_eq!(shown["attempts"][0]["response_status"], 200);
    let table = cli.run(&["deliveries", "get", &test_delivery], None).await;
    assert!(table.ok().contains("agent-1") && table.stdout.contains("200"), "{}", table.stdout);

    // events publish: from an argument, from stdin, from a file (and a file on stdin).
    let one = cli.run(&["events", "publish", "--type", "incident.created", r#"{"title":"one"}"#, "--json"], None).await;
    let one = one.json();
    assert_eq!(one["deliveries"].as_array().unwrap().len(), 1);
    let piped =
        cli.run(&["events", "publish", "--type", "task.failed", "--id", "job-7", "-", "--json"], Some(r#"{"job":7}"#));
    let piped = piped.await.json();
    assert_eq!(piped["id"], "job-7");
    let lines: String =
        (0..3).map(|i| format!("{{\"type\":\"incident.resolved\",\"data\":{{\"n\":{i}}}}}\n")).collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    std::fs::write(&file, &lines).unwrap();
    // Data from a file keeps its bytes: 150.00 stays 150.00.
    let exact = dir.path().join("exact.jsonl");
    std::fs::write(
        &exact,
        "{\"type\":\"recommendation.created\",\"id\":\"rec-1\",\"data\":{\"potential_savings\": 150.00}}\n",
    )
    .unwrap();
    cli.run(&["events", "publish", "--file", exact.to_str().unwrap()], None).await.ok();
    let conn = db.connect().await;
    let key = ("ws_default".to_owned(), "rec-1".to_owned());
    let stored = event::Entity::find_by_id(key).one(&conn).await.unwrap().expect("rec-1 stored");
    assert_eq!(stored.data, r#"{"potential_savings": 150.00}"#);
    conn.close().await.ok();
    let many = cli.run(&["events", "publish", "--file", file.to_str().unwrap()], None).await;
    assert!(many.ok().contains("published 3 events; 3 deliveries queued"), "{}", many.stdout);
    let from_stdin = cli.run(&["events", "publish", "--file", "-", "--json"], Some(&lines)).await.json();
    assert_eq!(from_stdin.as_array().unwrap().len(), 3);
    let bad = cli.run(&["events", "publish", "--type", "incident.created", "[1,2]"], None).await;
    assert!(bad.code != 0 && bad.stderr.contains("event.data_json"), "{}", bad.stderr);
    settled(&db, one["id"].as_str().unwrap()).await;

    // deliveries list with the log filters
    let all = cli.run(&["deliveries", "list", "--webhook", &id, "--since", "1h", "--json"], None).await.json();
    assert_eq!(all.as_array().unwrap().len(), 10, "2 tests + one + stdin + 3 + 3");
    let before = cli.run(&["deliveries", "list", "--until", "1h", "--json"], None).await.json();
    assert!(before.as_array().unwrap().is_empty(), "nothing was created over an hour ago");
    let mine = cli.run(&["deliveries", "list", "--event-type", "task.failed", "--json"], None).await.json();
    assert_eq!(mine.as_array().unwrap().len(), 1, "{mine:#}");
    let ok = cli.run(&["deliveries", "list", "--status", "succeeded", "--limit", "2", "--json"], None).await.json();
    assert_eq!(ok.as_array().unwrap().len(), 2);
    assert!(ok.as_array().unwrap().iter().all(|d| d["status"] == "succeeded"));
    assert!(cli.run(&["deliveries", "list"], None).await.ok().contains("incident.resolved"));
    let bad = cli.run(&["deliveries", "list", "--status", "lost"], None).await;
    assert!(bad.code != 0 && bad.stderr.contains("--status"));

    // deliveries retry: one more attempt on the same delivery
    let retried = cli.run(&["deliveries", "retry", &test_delivery, "--json"], None).await.json();
    assert_eq!(retried["id"], test_delivery.as_str());
    let deadline = tokio::time::Instant::now() + WAIT;
    while cli.run(&["deliveries", "get", &test_delivery, "--json"], None).await.json()["attempts"]
        .as_array()
        .unwrap()
        .len()
        < 2
    {
        assert!(tokio::time::Instant::now() < deadline, "the manual attempt is made");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // deliveries watch: changes as they happen (the address in `HERALD_SERVER`, its name before)
    let mut watch = tokio::process::Command::new(bin("herald"))
        .args(["deliveries", "watch", "--event-type", "task.failed", "--since", "1h", "--count", "2"])
        .env("HERALD_SERVER", cp.url())
        .env("HERALD_API_KEY", &cp.api_key)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let status = loop {
        cli.run(&["events", "publish", "--type", "task.failed", "{}"], None).await.ok();
        if let Ok(Ok(status)) = tokio::time::timeout(Duration::from_millis(300), watch.wait()).await {
            break status;
        }
        assert!(tokio::time::Instant::now() < deadline, "watch saw no change");
    };
    assert!(status.success());
    let mut lines = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut watch.stdout.take().unwrap(), &mut lines).await.unwrap();
    assert_eq!(lines.lines().count(), 2, "{lines}");
    assert!(lines.lines().all(|l| l.contains(" task.failed ") && l.contains("dlv_") && !l.contains('\x1b')), "{lines}");

    // agents list, with the key given as flags instead of the environment
    let flags = ["--addr", &cp.url(), "--api-key", &cp.api_key];
    let agents = tokio::process::Command::new(bin("herald"))
        .args(["agents", "list", "--json"])
        .args(flags)
        .env_remove("HERALD_API_KEY")
        .output()
        .await
        .unwrap();
    let agents: Json = serde_json::from_slice(&agents.stdout).unwrap();
    assert_eq!(agents[0]["id"], "agent-1");
    assert_eq!(agents[0]["egress_ips"], serde_json::json!(["203.0.113.7"]));
    assert!(cli.run(&["agents", "list"], None).await.ok().contains("203.0.113.7"));
    let nokey = tokio::process::Command::new(bin("herald")).args(["agents", "list"]).args(&flags[..2]).output().await;
    let nokey = nokey.unwrap();
    assert!(!nokey.status.success() && String::from_utf8_lossy(&nokey.stderr).contains("API key"));
    // `--addr` over `HERALD_ADDR` over `HERALD_SERVER`; `--server` is `--addr` by its name before.
    // Nothing listens on `wrong`: a port taken and let go.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (url, wrong) = (cp.url(), format!("http://{closed}"));
    // (flags, HERALD_ADDR, HERALD_SERVER, whether the control plane is reached)
    let ways = [
        (vec!["--server", &url], &wrong, &wrong, true),
        (vec!["--addr", &url], &wrong, &wrong, true),
        (vec![], &url, &wrong, true),
        (vec![], &wrong, &url, false),
    ];
    for (args, addr, server, reaches) in ways {
        let env = [("HERALD_ADDR", addr), ("HERALD_SERVER", server)];
        let out = tokio::process::Command::new(bin("herald"))
            .args(["agents", "list", "--json"])
            .args(&args)
            .envs(env)
            .env("HERALD_API_KEY", &cp.api_key)
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.success(), reaches, "{args:?} {env:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    // webhooks delete
    let deleted = cli.run(&["webhooks", "delete", &id, "--json"], None).await.json();
    assert_eq!(deleted["deleted"], true);
    let gone = cli.run(&["webhooks", "get", &id], None).await;
    assert!(gone.code != 0 && gone.stderr.contains("NotFound"), "{}", gone.stderr);
}

/// Runs `herald ARGS` inside a pseudo-terminal (`script` from util-linux), with `env`; returns
/// everything the terminal showed.
async fn on_a_terminal(cp: &ControlPlaneProcess, args: &[&str], env: &[(&str, &str)]) -> String {
    let command = std::iter::once(bin("herald").display().to_string())
        .chain(args.iter().map(|a| format!("'{a}'")))
        .collect::<Vec<_>>()
        .join(" ");
    let out = tokio::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("HERALD_ADDR", cp.url())
        .env("HERALD_API_KEY", &cp.api_key)
        .env_remove("NO_COLOR")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output();
    let out = tokio::time::timeout(WAIT, out).await.expect("herald finishes").expect("script runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colours_and_the_progress_bar_appear_only_on_a_terminal() {
    let ca = TestCa::new();
    let db = TestDb::new(Backend::Sqlite).await;
    let cp = ControlPlaneProcess::start(&db.url, &[]).await;
    let _agent = AgentProcess::start(&cp.url(), "default", "agent-1", Some(&ca.path), &[]);
    cp.wait_agents(&["agent-1"]).await;
    let receiver = Receiver::https(&ca).await;
    receiver.count_only();
    crate::pipeline::create(&cp, herald_tests::webhook("t", &receiver.url("/"), &["incident.created"])).await;

    // A large file: a progress bar on a terminal, none when stderr is a pipe.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.jsonl");
    let lines: String =
        (0..1500).map(|i| format!("{{\"type\":\"incident.created\",\"data\":{{\"n\":{i}}}}}\n")).collect();
    std::fs::write(&file, lines).unwrap();
    let shown =
        on_a_terminal(&cp, &["events", "publish", "--file", file.to_str().unwrap(), "--batch", "100"], &[]).await;
    assert!(shown.contains("/1500 events"), "a progress bar on a terminal: {shown:?}");
    assert!(shown.contains("published 1500 events"));
    let piped = Cli { cp: &cp }.run(&["events", "publish", "--file", file.to_str().unwrap()], None).await;
    assert!(piped.ok().contains("published 1500 events") && !piped.stderr.contains("/1500 events"), "{}", piped.stderr);

    // `watch` colours statuses on a terminal, unless NO_COLOR is set.
    for (env, coloured) in [(&[][..], true), (&[("NO_COLOR", "1")][..], false)] {
        let watch = on_a_terminal(&cp, &["deliveries", "watch", "--count", "1"], env);
        let publisher = async {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Cli { cp: &cp }.run(&["events", "publish", "--type", "incident.created", "{}"], None).await.ok();
            }
        };
        let shown = tokio::select! { shown = watch => shown, () = publisher => unreachable!() };
        assert!(shown.contains("dlv_"), "{shown:?}");
        assert_eq!(shown.contains("\x1b["), coloured, "colours {coloured}: {shown:?}");
    }
}
