//! The `herald-agent` binary: flags in, `run` out.

use clap::Parser as _;

/// mimalloc rather than glibc's malloc: allocation-heavy paths (SQL building, protobuf, HTTP)
/// spent a quarter of their CPU in glibc's allocator (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let small_pages = herald_shared::memory::no_huge_pages();
    let args = herald_agent::Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.worker_threads {
        runtime.worker_threads(threads.get());
    }
    runtime.enable_all().build()?.block_on(async move {
        let _telemetry = herald_shared::telemetry::init("herald-agent");
        if let Err(e) = small_pages {
            tracing::debug!(error = %e, "transparent huge pages stay on");
        }
        let shutdown = tokio_util::sync::CancellationToken::new();
        let token = shutdown.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutting down");
            token.cancel();
        });
        herald_agent::run(args, shutdown).await
    })
}
