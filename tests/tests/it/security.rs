//! Safety by default: the agent's egress guard against real loopback receivers, TLS and mTLS
//! between agents and the control plane, secrets absent from the database files in every
//! encoding, and secret rotation with its grace period.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use herald_control_plane::config::{AgentToken, Config, TlsFiles};
use herald_control_plane::db::entity::delivery;
use herald_shared::proto::{self, ErrorKind, agent_message};
use herald_tests::procs::{AGENT_TOKEN, AgentProcess, ControlPlaneProcess};
use herald_tests::receiver::Receiver;
use herald_tests::tls::TestCa;
use herald_tests::{Backend, Bearer, ControlPlane, TestDb, webhook};
use sea_orm::EntityTrait;

use crate::pipeline::{WAIT, attempts_of, create, expected_signature, publish, settled};

/// A host name other than `localhost` that this machine resolves to 127.0.0.1 alone: one of the
/// names `/etc/hosts` gives a loopback address, or the machine's own name.
async fn another_name_for_loopback() -> String {
    let mut candidates: Vec<String> = Vec::new();
    if let Ok(hosts) = std::fs::read_to_string("/etc/hosts") {
        for line in hosts.lines() {
            let mut fields = line.split('#').next().unwrap_or_default().split_whitespace();
            if fields.next().and_then(|ip| ip.parse::<IpAddr>().ok()).is_some_and(|ip| ip.is_loopback()) {
                candidates.extend(fields.map(str::to_owned));
            }
        }
    }
    if let Ok(name) = std::fs::read_to_string("/etc/hostname") {
        candidates.push(name.trim().to_owned());
    }
    for name in candidates.into_iter().filter(|n| !n.is_empty() && !n.contains("localhost")) {
        let Ok(addrs) = tokio::net::lookup_host((name.as_str(), 443)).await else { continue };
        let addrs: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
        if !addrs.is_empty() && addrs.iter().all(|ip| *ip == IpAddr::from([127, 0, 0, 1])) {
            return name;
        }
    }
    panic!("this test needs a host name besides localhost that resolves to 127.0.0.1 (an /etc/hosts entry)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_guard_refuses_loopback_unless_a_range_is_opened() {
    let ca = TestCa::new();
    let name = another_name_for_loopback().await;
    let names = ["localhost", "127.0.0.1", "::1", name.as_str()];
    let v4 = Receiver::https_at(&ca, "127.0.0.1:0", &names).await;
    let v6 = Receiver::https_at(&ca, "[::1]:0", &names).await;
    let targets = [
        format!("https://localhost:{}/hook", v4.addr.port()),
        format!("https://127.0.0.1:{}/hook", v4.addr.port()),
        format!("https://[::1]:{}/hook", v6.addr.port()),
        format!("https://{name}:{}/hook", v4.addr.port()),
    ];

    let db = TestDb::new(Backend::Sqlite).await;
    // One attempt only: a refusal is a failed attempt, so these deliveries end `failed`.
    let cp = ControlPlaneProcess::start(&db.url, &["--retry-schedule", "0s"]).await;
    let _guarded = AgentProcess::guarded(&cp.url(), "guarded", "agent-guarded", Some(&ca.path), &[]);
    // A proxy the environment names, which the agent must ignore: it counts who connects.
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let proxied = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = proxied.clone();
    let _proxy = tokio::spawn(async move {
        while proxy.accept().await.is_ok() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let proxy_env: Vec<(&str, &str)> =
        ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
            .into_iter()
            .map(|name| (name, proxy_url.as_str()))
            .collect();
    let _open = AgentProcess::with_env(
        &cp.url(),
        "open",
        "agent-open",
        Some(&ca.path),
        &["--allow-cidr", "127.0.0.0/8", "--allow-cidr", "::1/128"],
        &proxy_env,
    );
    cp.wait_agents(&["agent-guarded", "agent-open"]).await;
    let mut zone_of = std::collections::HashMap::new();
    for zone in ["guarded", "open"] {
        for url in &targets {
            let mut w = webhook(&format!("{zone} {url}"), url, &["incident.created"]);
            w.zone = zone.into();
            let w = create(&cp, w).await;
            zone_of.insert(w.id, zone);
        }
    }

    let e = publish(&cp, "incident.created", r#"{"title":"egress"}"#).await;
    let deliveries = settled(&db, &e.id).await;
    assert_eq!(deliveries.len(), 8);
    let mut delivered = BTreeSet::new();
    for d in &deliveries {
        let log = attempts_of(&db, &d.id).await;
        assert_eq!(log.len(), 1, "{d:?}: one attempt");
        match zone_of[&d.webhook_id] {
            "guarded" => {
                assert_eq!(d.status, delivery::status::FAILED, "a refused attempt counts as a failed attempt");
                assert_eq!(log[0].error_kind, ErrorKind::Blocked as i32, "{:?}", log[0]);
                assert!(
                    log[0].error_message.contains("blocked") && log[0].error_message.contains("not a global address"),
                    "the reason is recorded: {:?}",
                    log[0].error_message
                );
                assert_eq!(log[0].response_status, 0);
            }
            _ => {
                assert_eq!(d.status, delivery::status::SUCCEEDED, "{:?}", log[0]);
                assert_eq!(log[0].response_status, 200);
                delivered.insert(d.id.clone());
            }
        }
    }
    // Every request the receivers saw came from the open zone; the guarded zone reached nothing.
    let seen: BTreeSet<String> =
        v4.requests().iter().chain(v6.requests().iter()).map(|r| r.header("x-cloudthinker-delivery")).collect();
    assert_eq!(seen, delivered);
    assert_eq!((v4.count(), v6.count()), (3, 1), "localhost, 127.0.0.1 and {name} on IPv4; [::1] on IPv6");
    assert_eq!(proxied.load(std::sync::atomic::Ordering::SeqCst), 0, "proxy variables are ignored");
}

/// Opens an agent session over TLS as an agent would, and returns the status it is refused with
/// (or `Ok` with the first message the control plane sent).
async fn try_session(
    cp: &ControlPlane,
    ca: &TestCa,
    identity: Option<&(PathBuf, PathBuf)>,
    token: &str,
    zone: &str,
) -> Result<proto::ControlMessage, tonic::Status> {
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&ca.pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls
            .identity(tonic::transport::Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap()));
    }
    let channel = tonic::transport::Channel::from_shared(format!("https://localhost:{}", cp.addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("the TLS handshake succeeds: client certificates are optional at that level");
    let bearer = Bearer(Some(format!("Bearer {token}").parse().unwrap()));
    let mut client = proto::agent_service_client::AgentServiceClient::with_interceptor(channel, bearer);
    let hello = proto::AgentMessage {
        msg: Some(agent_message::Msg::Hello(proto::Hello {
            agent_id: "intruder".into(),
            zone: zone.into(),
            version: "test".into(),
            capacity: 16,
            ..Default::default()
        })),
    };
    let outbound = futures::StreamExt::chain(futures::stream::iter([hello]), futures::stream::pending());
    let mut inbound = client.session(outbound).await?.into_inner();
    Ok(inbound.message().await?.expect("a first message"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_need_their_token_its_zone_and_a_client_certificate_under_mtls() {
    let ca = TestCa::new();
    let (cert, key) = ca.server_files("control-plane", &["localhost"]);
    let client = ca.client_files("agent-eu");
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = Config::for_tests(db.url.clone());
    config.tls = Some(TlsFiles { cert, key, client_ca: Some(ca.path.clone()) });
    config.agent_tokens = vec![AgentToken { token: AGENT_TOKEN.into(), zones: Some(vec!["eu".into()]) }];
    let cp = ControlPlane::start(config).await;

    // A delivery waits in zone `eu` while intruders try to take it.
    let receiver = Receiver::https(&ca).await;
    let mut w = webhook("eu", &receiver.url("/hook"), &["incident.created"]);
    w.zone = "eu".into();
    let w = cp.webhooks().create_webhook(proto::CreateWebhookRequest { webhook: Some(w) }).await.unwrap().into_inner();
    let e = cp
        .events()
        .publish_event(proto::PublishEventRequest { event: Some(herald_tests::event("incident.created", "{}")) })
        .await
        .unwrap()
        .into_inner();

    let refusals = [
        ("no client certificate", None, AGENT_TOKEN, "eu", tonic::Code::Unauthenticated, "client certificate"),
        ("wrong token", Some(&client), "not-the-agent-token-0123456789", "eu", tonic::Code::Unauthenticated, "token"),
        ("zone not covered", Some(&client), AGENT_TOKEN, "us", tonic::Code::PermissionDenied, "zone"),
    ];
    for (case, identity, token, zone, code, says) in refusals {
        let status = try_session(&cp, &ca, identity, token, zone).await.expect_err(case);
        assert_eq!(status.code(), code, "{case}: {status:?}");
        assert!(status.message().contains(says), "{case}: a clear reason, got {:?}", status.message());
    }
    // The real agent without a certificate is refused too, and says why in its log.
    let url = format!("https://localhost:{}", cp.addr.port());
    let nocert = AgentProcess::start(&url, "eu", "agent-nocert", Some(&ca.path), &[]);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !std::fs::read_to_string(&nocert.log).unwrap_or_default().contains("client certificate") {
        assert!(tokio::time::Instant::now() < deadline, "the agent without a certificate logs its refusal");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(nocert);
    let listed = cp.agents_as(Some(&cp.api_key)).list_agents(proto::ListAgentsRequest::default()).await.unwrap();
    assert!(listed.into_inner().agents.is_empty(), "no refused agent was ever registered");
    let conn = db.connect().await;
    let waiting = delivery::Entity::find().all(&conn).await.unwrap();
    assert_eq!(waiting.len(), 1);
    assert_eq!((waiting[0].status, waiting[0].attempt_count), (delivery::status::PENDING, 0), "no job went out");
    conn.close().await.ok();

    // With its certificate, over TLS, the agent takes the job and delivers it.
    let (client_cert, client_key) = (client.0.to_str().unwrap(), client.1.to_str().unwrap());
    let _agent = AgentProcess::start(
        &url,
        "eu",
        "agent-eu",
        Some(&ca.path),
        &["--client-cert", client_cert, "--client-key", client_key],
    );
    let done = settled(&db, &e.id).await;
    assert_eq!(done[0].status, delivery::status::SUCCEEDED);
    let got = receiver.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header("x-cloudthinker-signature"), expected_signature(&w.secret, &got[0].body));
    assert_eq!(attempts_of(&db, &done[0].id).await[0].agent_id, "agent-eu");
    cp.stop().await;
}

/// Every form in which a careless store could hold `secret`: clear, hex, base64.
fn encodings(secret: &[u8]) -> Vec<(String, Vec<u8>)> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let mut out = vec![
        ("clear".to_owned(), secret.to_vec()),
        ("hex".to_owned(), hex::encode(secret).into_bytes()),
        ("HEX".to_owned(), hex::encode_upper(secret).into_bytes()),
    ];
    for (name, engine) in [("base64", STANDARD), ("base64 unpadded", STANDARD_NO_PAD)] {
        out.push((name.to_owned(), engine.encode(secret).into_bytes()));
    }
    for (name, engine) in [("base64url", URL_SAFE), ("base64url unpadded", URL_SAFE_NO_PAD)] {
        out.push((name.to_owned(), engine.encode(secret).into_bytes()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_database_files_in_any_encoding() {
    let ca = TestCa::new();
    let db = TestDb::new(Backend::Sqlite).await;
    let cp = ControlPlaneProcess::start(&db.url, &[]).await;
    let _agent = AgentProcess::start(&cp.url(), "default", "agent-1", Some(&ca.path), &[]);
    cp.wait_agents(&["agent-1"]).await;
    let receiver = Receiver::https(&ca).await;
    let header_value = "Bearer customer-token-7f3a91c2e5";
    let var_value = "xoxb-transform-var-4d2e8b7a19";
    let mut w = webhook("disk", &receiver.url("/secret-test"), &["incident.created"]);
    w.headers.insert("Authorization".into(), header_value.into());
    w.headers.insert("X-Api-Key".into(), "api-key-value-5c81d0e3b2".into());
    w.transform_vars.insert("token".into(), var_value.into());
    // The variable goes into the body sent, as the PagerDuty template puts its routing key.
    let transform = serde_json::json!({"routing_key": "{{ vars.token }}", "summary": "{{ data.title }}"});
    w.transform = Some(herald_control_plane::api::json::from_json(&transform));
    let created = create(&cp, w).await;
    let rotated = cp
        .webhooks()
        .rotate_webhook_secret(proto::RotateWebhookSecretRequest { id: created.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let mut secrets: Vec<Vec<u8>> = vec![
        created.secret.clone().into_bytes(),
        rotated.secret.clone().into_bytes(),
        header_value.as_bytes().to_vec(),
        b"customer-token-7f3a91c2e5".to_vec(),
        b"api-key-value-5c81d0e3b2".to_vec(),
        var_value.as_bytes().to_vec(),
    ];
    // The key material inside `whsec_…` too, in case a store kept it decoded.
    for s in [&created.secret, &rotated.secret] {
        let raw = s.strip_prefix("whsec_").expect("a whsec_ secret");
        secrets.push(raw.as_bytes().to_vec());
        secrets.push(base64::engine::general_purpose::STANDARD.decode(raw).expect("base64 key"));
    }
    // One delivery, so that the attempt log is written too: the receiver gets every value.
    let e = publish(&cp, "incident.created", r#"{"title":"disk"}"#).await;
    assert_eq!(settled(&db, &e.id).await[0].status, delivery::status::SUCCEEDED);
    let got = receiver.requests().remove(0);
    assert_eq!(got.header("authorization"), header_value);
    assert_eq!(std::str::from_utf8(&got.body).unwrap(), format!(r#"{{"routing_key":"{var_value}","summary":"disk"}}"#));
    let logged = cp
        .deliveries()
        .get_delivery(proto::GetDeliveryRequest { id: got.header("x-cloudthinker-delivery") })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(logged.attempts[0].request_body, r#"{"routing_key":"***","summary":"disk"}"#, "the log redacts it");
    assert_eq!(logged.attempts[0].request_headers["authorization"], "***");

    let path = PathBuf::from(db.url.strip_prefix("sqlite://").unwrap());
    let files: Vec<(String, Vec<u8>)> = ["", "-wal", "-shm"]
        .iter()
        .filter_map(|suffix| {
            let p = PathBuf::from(format!("{}{suffix}", path.display()));
            std::fs::read(&p).ok().map(|bytes| (p.display().to_string(), bytes))
        })
        .collect();
    assert!(files.len() >= 2, "the main file and its WAL exist while the control plane runs");
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    // The search reads what the control plane wrote: the webhook's plain fields are there.
    assert!(files.iter().any(|(_, bytes)| contains(bytes, b"/secret-test")));
    assert!(files.iter().any(|(_, bytes)| contains(bytes, created.id.as_bytes())));
    for secret in &secrets {
        for (encoding, needle) in encodings(secret) {
            for (file, bytes) in &files {
                assert!(
                    !contains(bytes, &needle),
                    "{file} holds a secret in {encoding}: {:?}",
                    String::from_utf8_lossy(secret)
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_signs_with_both_secrets_during_the_grace_period_then_with_the_new_one() {
    let ca = TestCa::new();
    let db = TestDb::new(Backend::Sqlite).await;
    let cp = ControlPlaneProcess::start(&db.url, &["--rotation-grace", "3s"]).await;
    let _agent = AgentProcess::start(&cp.url(), "default", "agent-1", Some(&ca.path), &[]);
    cp.wait_agents(&["agent-1"]).await;
    let (r_ct, r_std) = (Receiver::https(&ca).await, Receiver::https(&ca).await);
    let ct = create(&cp, webhook("cloudthinker", &r_ct.url("/ct"), &["incident.created"])).await;
    let mut std_hook = webhook("standard", &r_std.url("/std"), &["incident.created"]);
    std_hook.signature_scheme = proto::SignatureScheme::StandardWebhooks as i32;
    let std_hook = create(&cp, std_hook).await;
    let mut grace_ends = Vec::new();
    let mut rotated = Vec::new();
    for hook in [&ct, &std_hook] {
        let r = cp
            .webhooks()
            .rotate_webhook_secret(proto::RotateWebhookSecretRequest { id: hook.id.clone(), ..Default::default() })
            .await
            .expect("rotate")
            .into_inner();
        assert_ne!(r.secret, hook.secret);
        grace_ends.push(r.rotation_grace_ends_at.expect("a grace period"));
        rotated.push(r.secret);
    }
    let verifies = |secret: &str, r: &herald_tests::receiver::Received| {
        standardwebhooks::Webhook::new(secret).unwrap().verify(&r.body, &r.headers).is_ok()
    };

    // During the grace period: old and new.
    publish(&cp, "incident.created", r#"{"n":1}"#).await;
    let during = r_ct.wait_for(1, WAIT).await.remove(0);
    assert_eq!(during.header("x-cloudthinker-signature"), expected_signature(&ct.secret, &during.body), "old");
    assert_eq!(during.header("x-cloudthinker-signature-next"), expected_signature(&rotated[0], &during.body), "new");
    let during = r_std.wait_for(1, WAIT).await.remove(0);
    assert_eq!(during.header("webhook-signature").split(' ').count(), 2, "both signatures are listed");
    assert!(verifies(&std_hook.secret, &during) && verifies(&rotated[1], &during));

    // After it: the new secret alone.
    let end = grace_ends.iter().map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000).max().unwrap();
    let wait = end - chrono::Utc::now().timestamp_millis() + 100;
    tokio::time::sleep(Duration::from_millis(wait.max(0) as u64)).await;
    publish(&cp, "incident.created", r#"{"n":2}"#).await;
    let after = r_ct.wait_for(2, WAIT).await.remove(1);
    assert_eq!(after.header("x-cloudthinker-signature"), expected_signature(&rotated[0], &after.body));
    assert_eq!(after.header("x-cloudthinker-signature-next"), "", "no second signature after the grace period");
    let after = r_std.wait_for(2, WAIT).await.remove(1);
    assert_eq!(after.header("webhook-signature").split(' ').count(), 1);
    assert!(verifies(&rotated[1], &after) && !verifies(&std_hook.secret, &after));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_key_rotates_with_rekey() {
    use herald_control_plane::crypto::SecretKey;
    use herald_control_plane::store::Store;
    let db = TestDb::new(Backend::Sqlite).await;
    let (old, new) = (SecretKey::generate_base64(), SecretKey::generate_base64());
    let mut config = Config::for_tests(db.url.clone());
    config.secret_key = SecretKey::from_base64(&old).unwrap();
    let cp = ControlPlane::start(config).await;
    let mut w = webhook("sealed", "https://example.com/hook", &["*"]);
    w.headers.insert("Authorization".into(), "Bearer header-value-6a1f".into());
    w.transform_vars.insert("token".into(), "var-value-93be".into());
    let created = cp.webhooks().create_webhook(proto::CreateWebhookRequest { webhook: Some(w) }).await.unwrap();
    let created = created.into_inner();
    let rotated = cp
        .webhooks()
        .rotate_webhook_secret(proto::RotateWebhookSecretRequest { id: created.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    cp.stop().await;

    // The new key alone cannot open what the old one sealed, and says so.
    let store = Store::new(db.connect().await, SecretKey::from_base64(&new).unwrap());
    let refused = store.get_webhook_any(&created.id).await.unwrap_err();
    assert!(refused.to_string().contains("not configured"), "{refused}");

    let rekey = || {
        tokio::process::Command::new(herald_tests::bin("herald"))
            .args(["rekey", "--database-url", &db.url])
            .env("HERALD_SECRET_KEY", &new)
            .env("HERALD_PREVIOUS_SECRET_KEYS", &old)
            .output()
    };
    let out = rekey().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("re-sealed 1 webhooks"));
    let opened = store.get_webhook_any(&created.id).await.expect("the new key opens everything now");
    assert_eq!(opened.secret, rotated.secret);
    assert_eq!(opened.previous_secret.as_deref(), Some(created.secret.as_str()));
    assert_eq!(opened.spec.headers["Authorization"], "Bearer header-value-6a1f");
    assert_eq!(opened.spec.transform_vars["token"], "var-value-93be");
    let old_id = SecretKey::from_base64(&old).unwrap().id().to_owned();
    assert!(!db.snapshot().await.contains(&format!("v1.{old_id}.")), "nothing sealed by the old key is left");
    let again = rekey().await.unwrap();
    assert!(
        String::from_utf8_lossy(&again.stdout).starts_with("re-sealed 0 webhooks"),
        "a second run has nothing to do"
    );
}
