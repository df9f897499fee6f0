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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = herald_shared::telemetry::init("herald-control-plane");
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
            let conn = db::connect(&args.database_url).await.context("cannot open the database")?;
            db::migrate(&conn).await.context("cannot migrate the database")?;
            let rewritten = store::Store::new(conn, key.clone()).reseal_all().await?;
            println!("re-sealed {rewritten} webhooks under key {}", key.id());
            Ok(())
        }
        Command::Keys(KeysCommand::Create { db: args, workspace, scope }) => {
            let scope = Scope::parse(&scope).context("--scope must be `admin` or `publish`")?;
            herald_control_plane::auth::validate_workspace_id(&workspace).map_err(anyhow::Error::msg)?;
            let conn = db::connect(&args.database_url).await.context("cannot open the database")?;
            db::migrate(&conn).await.context("cannot migrate the database")?;
            // Keys need no secret key: they are hashed, not sealed.
            let store = store::Store::new(conn, herald_control_plane::crypto::SecretKey::from_bytes([0; 32]));
            let key = store::keys::generate_key();
            store.put_api_key(&workspace, &key, scope).await?;
            println!("{key}");
            Ok(())
        }
    }
}
