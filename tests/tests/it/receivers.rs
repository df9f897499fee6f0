//! The sample receivers of `docs/SECURITY.md`, run as they are published: Herald delivers to
//! them through a real agent, and forged, tampered, stale and replayed requests are refused or
//! ignored as the document says.

use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use herald_control_plane::db::entity::delivery;
use herald_shared::proto;
use herald_tests::procs::{AgentProcess, ControlPlaneProcess, free_port};
use herald_tests::{Backend, TestDb, webhook};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};

use crate::pipeline::{attempts_of, create, expected_signature, publish, settled};

const CT_SECRET: &str = "receiver-secret-0123456789abcdef";

/// The next decision the receiver printed, as (path, outcome, event id).
async fn next_decision(lines: &mut Lines<BufReader<ChildStdout>>) -> (String, String, String) {
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the receiver prints each decision")
        .expect("read the receiver's output")
        .expect("the receiver is running");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    let text = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    (text("path"), text("outcome"), text("event_id"))
}

/// A POST of `body` with `headers`, straight to the receiver; its status code.
async fn post(port: u16, path: &str, headers: &[(&str, String)], body: &[u8]) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect to the receiver");
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not HTTP: {answer:?}"))
}

/// A request sent straight to a receiver, and the status and decision it must get.
struct Forged<'a> {
    what: &'a str,
    path: &'a str,
    headers: Vec<(&'static str, String)>,
    body: &'a [u8],
    want: (u16, &'a str),
}

fn standard_headers(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Vec<(&'static str, String)> {
    let key = herald_shared::signature::standard_key(secret).unwrap();
    vec![
        ("webhook-id", id.to_owned()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", herald_shared::signature::standard(&key, id, timestamp, body)),
    ]
}

async fn run_sample_receiver(interpreter: &str, script: &str) {
    let std_secret = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode([7u8; 32]));
    let port = free_port();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/receivers").join(script);
    let mut child = Command::new(interpreter)
        .arg(&script)
        .arg(port.to_string())
        .env("WEBHOOK_SECRETS", format!("{CT_SECRET},{std_secret}"))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{interpreter} {} must run: {e}", script.display()));
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.unwrap().unwrap().unwrap();
    assert!(first.contains("listening"), "{first}");

    // Herald delivers to it, with both schemes.
    let db = TestDb::new(Backend::Sqlite).await;
    let cp = ControlPlaneProcess::start(&db.url, &["--allow-http"]).await;
    let _agent = AgentProcess::start(&cp.url(), "default", "agent-1", None, &["--allow-http"]);
    cp.wait_agents(&["agent-1"]).await;
    let mut ct = webhook("cloudthinker", &format!("http://127.0.0.1:{port}/ct"), &["incident.created"]);
    ct.secret = CT_SECRET.into();
    create(&cp, ct).await;
    let mut st = webhook("standard", &format!("http://127.0.0.1:{port}/std"), &["incident.created"]);
    st.signature_scheme = proto::SignatureScheme::StandardWebhooks as i32;
    st.secret = std_secret.clone();
    create(&cp, st).await;
    let e = publish(&cp, "incident.created", r#"{"title":"DB down"}"#).await;
    let done = settled(&db, &e.id).await;
    for d in &done {
        assert_eq!(d.status, delivery::status::SUCCEEDED, "{d:?}");
        assert_eq!(attempts_of(&db, &d.id).await[0].response_status, 204, "verified and processed");
    }
    let mut first_two = vec![next_decision(&mut lines).await, next_decision(&mut lines).await];
    first_two.sort();
    assert_eq!(
        first_two,
        vec![("/ct".into(), "processed".into(), e.id.clone()), ("/std".into(), "processed".into(), e.id.clone())]
    );

    // What an attacker or a flaky network sends.
    let body = |id: &str| {
        format!(r#"{{"id":"{id}","type":"incident.created","timestamp":"2026-01-01T00:00:00Z","workspace_id":"ws_default","data":{{}}}}"#).into_bytes()
    };
    let now = chrono::Utc::now().timestamp();
    let forged = body("evt_forged");
    let sig = |secret: &str, b: &[u8]| expected_signature(secret, b);
    let replayed = body(&e.id);
    let rotated = body("evt_rotated");
    let mut tampered_body = body("evt_tampered");
    let tampered_headers = standard_headers(&std_secret, "evt_tampered", now, &tampered_body);
    tampered_body[10] ^= 1;
    let fresh = body("evt_fresh");
    // During a rotation: the old secret (unknown to the receiver) and the new one, both listed.
    let both = body("evt_both");
    let retired = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode([9u8; 32]));
    let mut both_headers = standard_headers(&std_secret, "evt_both", now, &both);
    let old = standard_headers(&retired, "evt_both", now, &both).remove(2).1;
    both_headers[2].1 = format!("{old} {}", both_headers[2].1);
    let stale = body("evt_stale");
    let cases = [
        Forged {
            what: "a forged signature",
            path: "/ct",
            headers: vec![("X-CloudThinker-Signature", sig("guessed-secret-0000000000", &forged))],
            body: &forged,
            want: (401, "rejected"),
        },
        Forged {
            what: "a replay of a processed event",
            path: "/ct",
            headers: vec![("X-CloudThinker-Signature", sig(CT_SECRET, &replayed))],
            body: &replayed,
            want: (200, "duplicate"),
        },
        Forged {
            what: "a rotation: the old secret unknown here, the new one in -Next",
            path: "/ct",
            headers: vec![
                ("X-CloudThinker-Signature", sig("the-retired-secret-000000000", &rotated)),
                ("X-CloudThinker-Signature-Next", sig(CT_SECRET, &rotated)),
            ],
            body: &rotated,
            want: (204, "processed"),
        },
        Forged {
            what: "a stale timestamp",
            path: "/std",
            headers: standard_headers(&std_secret, "evt_stale", now - 600, &stale),
            body: &stale,
            want: (401, "rejected"),
        },
        Forged {
            what: "a tampered body",
            path: "/std",
            headers: tampered_headers,
            body: &tampered_body,
            want: (401, "rejected"),
        },
        Forged {
            what: "a rotation: two signatures listed, the second by the known secret",
            path: "/std",
            headers: both_headers,
            body: &both,
            want: (204, "processed"),
        },
        Forged {
            what: "a fresh, valid request",
            path: "/std",
            headers: standard_headers(&std_secret, "evt_fresh", now, &fresh),
            body: &fresh,
            want: (204, "processed"),
        },
    ];
    for Forged { what, path, headers, body, want: (status, outcome) } in cases {
        assert_eq!(post(port, path, &headers, body).await, status, "{interpreter}: {what}");
        let (seen_path, seen_outcome, _) = next_decision(&mut lines).await;
        assert_eq!((seen_path.as_str(), seen_outcome.as_str()), (path, outcome), "{interpreter}: {what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_receiver_verifies_and_ignores_replays() {
    run_sample_receiver("python3", "receiver.py").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_receiver_verifies_and_ignores_replays() {
    run_sample_receiver("node", "receiver.js").await;
}
