//! End-to-end tests, one binary. Storage and API tests run on SQLite and on PostgreSQL through
//! `both_databases!`, which makes a `sqlite::name` and a `postgres::name` test of each function.

/// Generates, for each `async fn name(backend: Backend)`, one test per database.
macro_rules! both_databases {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(herald_tests::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(herald_tests::Backend::Postgres).await
                }
            )*
        }
    };
}

mod auth;
mod binaries;
mod command_line;
mod events;
mod faults;
mod hostile;
mod logs;
mod metrics;
mod pipeline;
mod queue;
mod receivers;
mod reliability;
mod security;
mod support;
mod traces;
mod walkthrough;
mod webhooks;
