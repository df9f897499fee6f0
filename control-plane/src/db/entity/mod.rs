//! sea-orm entities, one per table. Times are milliseconds since the Unix epoch (`i64`), which
//! index and compare the same way on SQLite and PostgreSQL.

pub mod agent;
pub mod api_key;
pub mod attempt;
pub mod delivery;
pub mod event;
pub mod webhook;
pub mod workspace;
