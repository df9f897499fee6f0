//! The `herald` binary: flags in, `run` out.

use anyhow::Context as _;
use clap::Parser as _;
use herald_control_plane::auth::Scope;
use herald_control_plane::config::{Cli, Command, Config, KeysCommand};
use herald_control_plane::{bind, cli, db, dev, server, shutdown_on_signals, store};

/// mimalloc rather than glibc's malloc: allocation-heavy paths (SQL building, protobuf, HTTP)
/// spent a quarter of their CPU in glibc's allocator (docs/BENCHMARKS.md). The `override` feature
/// (Cargo.toml) also routes C's `malloc` to it, which is what the bundled SQLite allocates with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A store for managing API keys beside a running control plane (keys need no secret key: they
/// are hashed, not sealed). Only `create` makes a missing SQLite database: a first key may come
/// before the first start.
async fn key_store(database_url: &str, create: bool) -> anyhow::Result<store::Store> {
    let conn = if create { db::connect(database_url).await } else { db::connect_existing(database_url).await }
        .context("cannot open the database")?;
    db::migrate(&conn).await.context("cannot migrate the database")?;
    Ok(store::Store::new(conn, herald_control_plane::crypto::SecretKey::from_bytes([0; 32])))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let small_pages = herald_shared::memory::no_huge_pages();
    let _telemetry = herald_shared::telemetry::init("herald-control-plane");
    if let Err(e) = small_pages {
        tracing::debug!(error = %e, "transparent huge pages stay on");
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    match Cli::parse().command {
        Command::Serve(args) => {
            let (grpc_addr, http_addr) = (args.grpc_addr, args.http_addr);
            let config = Config::try_from(*args)?;
            let grpc = bind(grpc_addr, "gRPC").await?;
            let http = bind(http_addr, "HTTP").await?;
            server::run(config, grpc, Some(http), shutdown_on_signals()).await
        }
        Command::Dev(args) => dev::run(args, shutdown_on_signals()).await,
        Command::Migrate(args) => {
            let conn = db::connect(&args.database_url).await.context("cannot open the database")?;
            db::migrate(&conn).await.context("cannot migrate the database")?;
            println!("migrations applied to {}", herald_control_plane::config::redact_url(&args.database_url));
            Ok(())
        }
        Command::Webhooks { client, command } => cli::webhooks(&client, command).await,
        Command::Events { client, command } => cli::events(&client, command).await,
        Command::Deliveries { client, command } => cli::deliveries(&client, command).await,
        Command::Agents { client, command } => cli::agents(&client, command).await,
        Command::Templates { client, command } => cli::templates(&client, command).await,
        Command::Rekey { db: args, keys } => {
            let key = keys.keyring()?;
            let conn = db::connect_existing(&args.database_url).await.context("cannot open the database")?;
            db::migrate(&conn).await.context("cannot migrate the database")?;
            let rewritten = store::Store::new(conn, key.clone()).reseal_all().await?;
            println!("re-sealed {rewritten} webhooks under key {}", key.id());
            Ok(())
        }
        Command::Keys(KeysCommand::Create { db: args, workspace, scope }) => {
            let scope = Scope::parse(&scope).context("--scope must be `admin` or `publish`")?;
            herald_control_plane::auth::validate_workspace_id(&workspace).map_err(anyhow::Error::msg)?;
            let store = key_store(&args.database_url, true).await?;
            let key = store::keys::generate_key();
            store.put_api_key(&workspace, &key, scope).await?;
            println!("{key}");
            Ok(())
        }
        Command::Keys(KeysCommand::List { db: args, workspace }) => {
            let store = key_store(&args.database_url, false).await?;
            let keys = store.list_api_keys(workspace.as_deref()).await?;
            println!("{:<32} {:<24} {:<8} CREATED", "ID", "WORKSPACE", "SCOPE");
            for k in keys {
                let created = chrono::DateTime::from_timestamp_millis(k.created_at)
                    .map_or_else(|| k.created_at.to_string(), |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string());
                println!("{:<32} {:<24} {:<8} {created}", k.id, k.workspace_id, k.scope);
            }
            Ok(())
        }
        Command::Keys(KeysCommand::Revoke { db: args, key }) => {
            let store = key_store(&args.database_url, false).await?;
            // Never echoed: what is not a key id is taken for a key, whatever it looks like.
            let revoked = store.revoke_api_key(key.trim()).await.map_err(|e| match e {
                store::StoreError::NotFound(_) => {
                    anyhow::anyhow!("no such API key (give a key id from `keys list`, or the key)")
                }
                other => other.into(),
            })?;
            println!("revoked {} ({}, scope {})", revoked.id, revoked.workspace_id, revoked.scope);
            Ok(())
        }
    }
}
