//! Multi-row inserts for the hot paths (events and deliveries when publishing, attempts with
//! results), written directly rather than through `sea-query`'s builder, which cloned every value
//! twice and cost about a fifth of the control plane's CPU per published event.
//!
//! SQLite gets `INSERT … SELECT * FROM (VALUES (…), (…)) WHERE …`, padded to few shapes
//! ([`values`]). PostgreSQL gets one array per column,
//! `INSERT … SELECT … FROM UNNEST($1::text[], …)`: a statement of a thousand `VALUES` rows has
//! twenty thousand parameters that the server plans and initialises one by one on every
//! execution, which was a fifth of its CPU while publishing; with arrays the plan is the same
//! handful of nodes however many rows there are, and a table has a few prepared statements (by
//! which of its columns vary within a statement's rows: [`unnest`]).

use sea_orm::{ConnectionTrait, DbBackend, EntityTrait, Statement, Value};

use super::StoreError;

/// Rows per SQLite statement, and ids per `IN` list: well inside SQLite's bound-parameter limit.
pub(crate) const CHUNK: usize = 1000;
/// Rows per PostgreSQL statement. Arrays have no parameter limit; this and [`POSTGRES_BYTES`]
/// only bound the size of one message.
const POSTGRES_CHUNK: usize = 10_000;
/// Text per SQLite statement: a statement ends with the row that reaches it. Two statements'
/// values are held at a time ([`insert_rows`]), each copied once more to run it, and a thousand
/// events of 256 KiB would be 256 MiB a statement.
const SQLITE_BYTES: usize = 16 << 20;
/// Text per PostgreSQL statement: a statement ends with the row that reaches it. PostgreSQL
/// refuses a message or a value past 1 GB, and one merged publish may hold thousands of
/// 256 KiB payloads.
const POSTGRES_BYTES: usize = 64 << 20;

/// Inserts `rows` through sea-orm's builder, in multi-row statements: for the paths that are not
/// hot and hold active models.
pub(crate) async fn insert_chunked<A>(txn: &impl ConnectionTrait, rows: Vec<A>) -> Result<(), StoreError>
where
    A: sea_orm::ActiveModelTrait + Send,
{
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<A> = rows.by_ref().take(CHUNK).collect();
        A::Entity::insert_many(chunk).exec_without_returning(txn).await?;
    }
    Ok(())
}

/// Inserts `rows`, all columns in the entity's order.
///
/// Each statement after the first is built while the database runs the one before it: the
/// statement is sent to the connection when its execution is first polled, and building the next
/// (a copy of every value of up to [`CHUNK`] rows) is work of the same order as running it, which
/// on SQLite happens on the connection's own thread (docs/BENCHMARKS.md item 43).
pub async fn insert_rows<M, T>(txn: &impl ConnectionTrait, rows: &[T]) -> Result<(), StoreError>
where
    M: sea_orm::ModelTrait,
    T: std::borrow::Borrow<M> + Sync,
{
    insert_rows_then::<M, T>(txn, rows, &|| ()).await
}

/// [`insert_rows`], calling `moved` as each statement finishes (publishing's
/// [`super::events::Progress`]).
pub async fn insert_rows_then<M, T>(
    txn: &impl ConnectionTrait,
    rows: &[T],
    moved: &(dyn Fn() + Sync),
) -> Result<(), StoreError>
where
    M: sea_orm::ModelTrait,
    T: std::borrow::Borrow<M> + Sync,
{
    let mut statements = statements::<M, T>(txn.get_database_backend(), rows, "");
    let mut next = statements.next();
    while let Some(statement) = next {
        let (done, following) = futures::join!(txn.execute_raw(statement), async { statements.next() });
        done?;
        moved();
        next = following;
    }
    Ok(())
}

/// The statements that insert `rows`, each followed by `suffix` (an `ON CONFLICT` or
/// `RETURNING` clause), each built only when the one before has been taken: a large write holds
/// the copies of two statements' values at a time at most (one running, the next being built).
pub(crate) fn statements<'a, M, T>(
    backend: DbBackend,
    rows: &'a [T],
    suffix: &'a str,
) -> impl Iterator<Item = Statement> + 'a
where
    M: sea_orm::ModelTrait,
    T: std::borrow::Borrow<M>,
{
    let mut rest = rows;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let unnested = if backend == DbBackend::Postgres { unnest::<M, T>(rest) } else { None };
        // `VALUES` rows otherwise: SQLite, or a table with a column type `unnest` does not map.
        let (sql, values, taken) = unnested.unwrap_or_else(|| values::<M, T>(backend, rest));
        rest = &rest[taken..];
        Some(Statement::from_sql_and_values(backend, sql + suffix, values))
    })
}

/// The rows a SQLite `VALUES` statement of `n` rows (at most [`CHUNK`]) is written for: the next
/// power of two, or [`CHUNK`]. The database parses and plans a statement once per distinct text
/// and keeps it prepared (`sqlx`'s statement cache); with every batch size its own text, each
/// batch of results paid for a fresh parse of hundreds of rows of placeholders, a tenth of
/// SQLite's writer thread. So the statement has one of eleven shapes per table, and the rows past
/// `n` are rows of NULLs that its `WHERE` drops ([`values`]): one statement per [`CHUNK`] rows,
/// where splitting a batch into powers of two took up to nine (each a round trip to the
/// connection's thread, docs/BENCHMARKS.md item 33).
fn shape_len(n: usize) -> usize {
    n.max(1).next_power_of_two().min(CHUNK)
}

/// Rows for the next `VALUES` statement where rows are not padded (PostgreSQL, for a table
/// `unnest` does not map): [`CHUNK`], or the largest power of two that fits, for the same few
/// texts as [`shape_len`].
fn exact_shape_len(n: usize) -> usize {
    if n >= CHUNK { CHUNK } else { 1 << n.max(1).ilog2() }
}

/// Pads an `IN` list to one of eleven lengths (powers of two, then [`CHUNK`]) by repeating its
/// last value, which changes nothing it matches: a statement of each length is then prepared
/// once and found again, as [`shape_len`] does for inserts. Lists past [`CHUNK`] are left as
/// they are (callers chunk them).
pub(crate) fn pad_list<T: Clone>(list: &mut Vec<T>) {
    let n = list.len();
    if n == 0 || n >= CHUNK {
        return;
    }
    let padded = n.next_power_of_two().min(CHUNK);
    let last = list[n - 1].clone();
    list.resize(padded, last);
}

/// The columns of `E` in the entity's order, and whether each may be NULL.
fn columns<E: EntityTrait>() -> Vec<(E::Column, &'static str, bool)> {
    use sea_orm::{ColumnTrait as _, IdenStatic as _, Iterable as _};
    E::Column::iter().map(|c| (c, c.as_str(), c.def().is_null())).collect()
}

/// `INSERT INTO "table" ("a", "b", …)`.
fn insert_into<E: EntityTrait>(sql: &mut String) {
    let names: Vec<&str> = columns::<E>().into_iter().map(|(_, name, _)| name).collect();
    sql.push_str("INSERT INTO \"");
    sql.push_str(E::default().table_name());
    sql.push_str("\" (\"");
    sql.push_str(&names.join("\", \""));
    sql.push_str("\") ");
}

/// `INSERT … VALUES (…), …` for the first rows of `rows`, and how many it took: on SQLite up to
/// [`CHUNK`] rows and [`SQLITE_BYTES`] of text (at least one row), elsewhere [`exact_shape_len`]
/// rows. On SQLite it is written for [`shape_len`] rows, those past the rows taken all NULL, as
/// `INSERT … SELECT * FROM (VALUES …) WHERE columnK IS NOT NULL`, `K` a column that may not be
/// NULL (the key): the padding is dropped before it is inserted, and the text is the same for
/// every statement of up to that many rows.
fn values<M, T>(backend: DbBackend, rows: &[T]) -> (String, Vec<Value>, usize)
where
    M: sea_orm::ModelTrait,
    T: std::borrow::Borrow<M>,
{
    use std::fmt::Write as _;
    let columns = columns::<M::Entity>();
    let width = columns.len();
    let sqlite = backend == DbBackend::Sqlite;
    let key = columns.iter().position(|&(.., nullable)| !nullable).filter(|_| sqlite);
    let most = if sqlite { rows.len().min(CHUNK) } else { exact_shape_len(rows.len()) };
    let mut values = Vec::with_capacity(if key.is_some() { shape_len(most) } else { most } * width);
    let (mut taken, mut bytes) = (0, 0);
    for row in &rows[..most] {
        if sqlite && bytes >= SQLITE_BYTES {
            break;
        }
        taken += 1;
        let row = row.borrow();
        for &(column, ..) in &columns {
            let value = row.get(column);
            if let Value::String(Some(text)) = &value {
                bytes += text.len();
            }
            values.push(value);
        }
    }
    let shape = if key.is_some() { shape_len(taken) } else { taken };
    values.resize(shape * width, Value::String(None));
    let mut sql = String::with_capacity(96 + shape * width * 3);
    insert_into::<M::Entity>(&mut sql);
    sql.push_str(if key.is_some() { "SELECT * FROM (VALUES " } else { "VALUES " });
    for r in 0..shape {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..width {
            if c > 0 {
                sql.push_str(", ");
            }
            if sqlite {
                sql.push('?');
            } else {
                let _ = write!(sql, "${}", r * width + c + 1);
            }
        }
        sql.push(')');
    }
    if let Some(key) = key {
        // SQLite names the columns of `VALUES` column1, column2, …
        let _ = write!(sql, ") WHERE column{} IS NOT NULL", key + 1);
    }
    (sql, values, taken)
}

/// `INSERT … SELECT … FROM UNNEST($1::type[], …)` for the first rows of `rows`, as many as
/// [`POSTGRES_CHUNK`] and [`POSTGRES_BYTES`] allow (at least one), and how many it took: one
/// array per column that varies. A column with the same value in every row taken (a workspace, a
/// webhook, a status, a lease column still NULL) is bound once, as `$k::type`, or written as
/// `NULL`: most columns of a published batch are, and each array costs the server an array to
/// receive and a function scan to unnest, and the control plane a copy of every value
/// (docs/BENCHMARKS.md item 52). Arrays bound through sea-orm cannot hold NULL, so a varying
/// column with NULLs comes with a second array that marks them
/// (`CASE WHEN n3 THEN NULL ELSE c3 END`). The text depends on the table and on which columns
/// vary, are NULL, or have NULLs: a few texts per table, each prepared once per connection.
/// `None` for a table with a column of a type not mapped here.
fn unnest<M, T>(rows: &[T]) -> Option<(String, Vec<Value>, usize)>
where
    M: sea_orm::ModelTrait,
    T: std::borrow::Borrow<M>,
{
    use std::fmt::Write as _;
    let columns = columns::<M::Entity>();
    // A value knows its type also when it is NULL, and a chunk is never empty.
    let first = rows.first()?.borrow();
    let firsts: Vec<Value> = columns.iter().map(|&(column, ..)| first.get(column)).collect();
    let types: Vec<(sea_orm::sea_query::ArrayType, &str)> = firsts
        .iter()
        .map(|value| {
            let ty = value.array_type();
            pg_type(&ty).map(|name| (ty, name))
        })
        .collect::<Option<_>>()?;
    let most = rows.len().min(POSTGRES_CHUNK);
    // Per column: its values, once one differs from the first row's (that row's value, then
    // the rest as they come), and whether one is NULL.
    let mut varying: Vec<Option<Vec<Value>>> = vec![None; columns.len()];
    let mut nulls = vec![false; columns.len()];
    let (mut taken, mut bytes) = (0, 0);
    for row in &rows[..most] {
        if bytes >= POSTGRES_BYTES {
            break;
        }
        let row = row.borrow();
        for (c, &(column, ..)) in columns.iter().enumerate() {
            let value = row.get(column);
            if let Value::String(Some(text)) = &value {
                bytes += text.len();
            }
            nulls[c] |= !value.is_some();
            match &mut varying[c] {
                Some(values) => values.push(value),
                None if value != firsts[c] => {
                    let mut values = Vec::with_capacity(most);
                    values.resize(taken, firsts[c].clone());
                    values.push(value);
                    varying[c] = Some(values);
                }
                None => {}
            }
        }
        taken += 1;
    }
    // Rows that are all alike still need one array to say how many there are.
    if taken > 1 && varying.iter().all(Option::is_none) {
        varying[0] = Some(vec![firsts[0].clone(); taken]);
    }
    let mut sql = String::with_capacity(512);
    insert_into::<M::Entity>(&mut sql);
    sql.push_str("SELECT ");
    let mut from = String::with_capacity(256);
    let mut names = String::with_capacity(256);
    let mut bound = Vec::with_capacity(columns.len() * 2);
    let columns = firsts.into_iter().zip(varying).zip(nulls).zip(types);
    for (c, (((first, varying), has_null), (ty, name))) in columns.enumerate() {
        if c > 0 {
            sql.push_str(", ");
        }
        let Some(values) = varying else {
            if first.is_some() {
                bound.push(first);
                let _ = write!(sql, "${}::{name}", bound.len());
            } else {
                let _ = write!(sql, "NULL::{name}");
            }
            continue;
        };
        if !from.is_empty() {
            from.push_str(", ");
            names.push_str(", ");
        }
        let _ = write!(names, "c{c}");
        if has_null {
            let marks: Vec<Value> = values.iter().map(|v| Value::Bool(Some(!v.is_some()))).collect();
            let values: Vec<Value> =
                values.into_iter().map(|v| if v.is_some() { v } else { v.dummy_value() }).collect();
            bound.push(Value::Array(ty, Some(Box::new(values))));
            let _ = write!(from, "${}::{name}[]", bound.len());
            bound.push(Value::Array(sea_orm::sea_query::ArrayType::Bool, Some(Box::new(marks))));
            let _ = write!(from, ", ${}::bool[]", bound.len());
            let _ = write!(names, ", n{c}");
            let _ = write!(sql, "CASE WHEN n{c} THEN NULL ELSE c{c} END");
        } else {
            bound.push(Value::Array(ty, Some(Box::new(values))));
            let _ = write!(from, "${}::{name}[]", bound.len());
            let _ = write!(sql, "c{c}");
        }
    }
    if !from.is_empty() {
        let _ = write!(sql, " FROM UNNEST({from}) AS u({names})");
    }
    Some((sql, bound, taken))
}

/// PostgreSQL's name for the elements of an array of `ty`.
fn pg_type(ty: &sea_orm::sea_query::ArrayType) -> Option<&'static str> {
    use sea_orm::sea_query::ArrayType;
    Some(match ty {
        ArrayType::Bool => "bool",
        ArrayType::SmallInt => "int2",
        ArrayType::Int => "int4",
        ArrayType::BigInt => "int8",
        ArrayType::Double => "float8",
        ArrayType::String => "text",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::entity::attempt;

    fn attempt(i: usize, body: usize) -> attempt::Model {
        attempt::Model {
            id: format!("att_{i}"),
            delivery_id: "dlv_1".to_owned(),
            workspace_id: "ws".to_owned(),
            number: 1,
            agent_id: "agent".to_owned(),
            zone: "default".to_owned(),
            started_at: 0,
            duration_ms: 0,
            request_headers: "{}".to_owned(),
            request_body: Some("x".repeat(body)),
            response_status: 200,
            response_headers: "{}".to_owned(),
            response_body: String::new(),
            error_kind: 0,
            error_message: String::new(),
            stale: false,
            manual: false,
        }
    }

    /// Rows in each statement: the length of its first array (PostgreSQL), or its rows whose id
    /// is not NULL (SQLite; the rest are padding).
    fn rows_per_statement(backend: DbBackend, rows: &[attempt::Model]) -> Vec<usize> {
        statements::<attempt::Model, _>(backend, rows, "")
            .map(|s| {
                let values = s.values.expect("bound values").0;
                match values.iter().find(|v| matches!(v, Value::Array(..))) {
                    Some(Value::Array(_, Some(first))) => first.len(),
                    _ => values
                        .chunks(columns::<attempt::Entity>().len())
                        .filter(|row| !matches!(row[0], Value::String(None)))
                        .count(),
                }
            })
            .collect()
    }

    #[test]
    fn sqlite_batches_share_a_statement_per_power_of_two() {
        let rows: Vec<attempt::Model> = (0..CHUNK).map(|i| attempt(i, 10)).collect();
        let width = columns::<attempt::Entity>().len();
        let statement = |n: usize| {
            let mut all: Vec<Statement> = statements::<attempt::Model, _>(DbBackend::Sqlite, &rows[..n], "").collect();
            assert_eq!(all.len(), 1, "{n} rows: one statement");
            all.remove(0)
        };
        for (n, shape) in [(1, 1), (3, 4), (4, 4), (5, 8), (170, 256), (256, 256), (513, 1_000)] {
            let s = statement(n);
            assert_eq!(s.sql, statement(shape).sql, "{n} rows share the text of {shape}");
            let values = s.values.expect("bound values").0;
            assert_eq!(values.len(), shape * width, "{n} rows: bound as {shape}");
            assert!(values[..n * width].iter().all(|v| !matches!(v, Value::String(None))), "{n}: the rows come first");
            assert!(values[n * width..].iter().all(|v| matches!(v, Value::String(None))), "{n}: padding is NULL");
            assert!(s.sql.ends_with(") WHERE column1 IS NOT NULL"), "{n}: the padding is dropped by its id");
        }
    }

    #[test]
    fn postgres_binds_a_column_alike_in_every_row_once() {
        let mut rows: Vec<attempt::Model> = (0..4).map(|i| attempt(i, 10)).collect();
        rows[2].request_body = None;
        let statement = |rows: &[attempt::Model]| {
            let mut all: Vec<Statement> = statements::<attempt::Model, _>(DbBackend::Postgres, rows, "").collect();
            assert_eq!(all.len(), 1);
            let s = all.remove(0);
            (s.sql, s.values.expect("bound values").0)
        };
        let (sql, values) = statement(&rows);
        // The id varies; the body varies with a NULL (its array, and one marking the NULL).
        assert!(sql.contains("FROM UNNEST($1::text[], $10::text[], $11::bool[]) AS u(c0, c9, n9)"), "{sql}");
        assert!(sql.starts_with("INSERT INTO \"attempts\""), "{sql}");
        assert!(sql.contains("SELECT c0, $2::text, "), "the delivery is bound once: {sql}");
        assert!(sql.contains("CASE WHEN n9 THEN NULL ELSE c9 END"), "{sql}");
        assert_eq!(values.iter().filter(|v| matches!(v, Value::Array(..))).count(), 3);
        assert_eq!(values[1], Value::String(Some("dlv_1".to_owned())));
        assert_eq!(values.len(), 3 + columns::<attempt::Entity>().len() - 2);
        // A column NULL in every row is written as NULL; one without a NULL needs no marks.
        for row in &mut rows {
            row.request_body = None;
        }
        let (sql, _) = statement(&rows);
        assert!(sql.contains("NULL::text") && !sql.contains("CASE"), "{sql}");
        for row in &mut rows {
            row.request_body = Some(row.id.clone());
        }
        let (sql, _) = statement(&rows);
        assert!(sql.contains("FROM UNNEST($1::text[], $10::text[]) AS u(c0, c9)") && !sql.contains("CASE"), "{sql}");
        // One row: no arrays at all; rows alike but in number: one array says how many.
        let (sql, values) = statement(&rows[..1]);
        assert!(!sql.contains("UNNEST") && !values.iter().any(|v| matches!(v, Value::Array(..))), "{sql}");
        let alike = vec![rows[0].clone(); 3];
        let (sql, values) = statement(&alike);
        assert!(sql.contains("FROM UNNEST($1::text[]) AS u(c0)"), "{sql}");
        assert!(matches!(&values[0], Value::Array(_, Some(ids)) if ids.len() == 3));
    }

    #[test]
    fn lists_are_padded_to_few_lengths_with_their_last_value() {
        let mut lengths = std::collections::BTreeSet::new();
        for n in 1..=CHUNK {
            let mut list: Vec<usize> = (0..n).collect();
            pad_list(&mut list);
            assert!(list.len() >= n && list[..n].iter().copied().eq(0..n), "{n}: the values come first, in order");
            assert!(list[n..].iter().all(|&v| v == n - 1), "{n}: padded with the last value");
            lengths.insert(list.len());
        }
        assert_eq!(lengths.into_iter().collect::<Vec<_>>(), [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1_000]);
        let mut empty: Vec<u8> = Vec::new();
        pad_list(&mut empty);
        assert!(empty.is_empty());
        let mut long: Vec<usize> = (0..1_500).collect();
        pad_list(&mut long);
        assert_eq!(long.len(), 1_500);
    }

    #[test]
    fn statements_are_bounded_in_rows_and_in_bytes() {
        let small: Vec<attempt::Model> = (0..25_001).map(|i| attempt(i, 10)).collect();
        assert_eq!(rows_per_statement(DbBackend::Postgres, &small), [10_000, 10_000, 5_001]);
        assert_eq!(rows_per_statement(DbBackend::Sqlite, &small[..2_500]), [1_000, 1_000, 500]);
        assert_eq!(rows_per_statement(DbBackend::Sqlite, &small[..1]), [1]);
        // 256 KiB bodies: a statement ends with the row that reaches 64 MiB of text.
        let big: Vec<attempt::Model> = (0..300).map(|i| attempt(i, 256 << 10)).collect();
        assert_eq!(rows_per_statement(DbBackend::Postgres, &big), [256, 44]);
        let huge = [attempt(0, POSTGRES_BYTES + 1), attempt(1, 1)];
        assert_eq!(rows_per_statement(DbBackend::Postgres, &huge), [1, 1], "one row over the bound still goes");
        // On SQLite at 16 MiB, padded as any other statement.
        assert_eq!(rows_per_statement(DbBackend::Sqlite, &big), [64, 64, 64, 64, 44]);
        let last = statements::<attempt::Model, _>(DbBackend::Sqlite, &big, "").last().expect("statements");
        let width = columns::<attempt::Entity>().len();
        assert_eq!(last.values.expect("bound values").0.len(), 64 * width, "44 rows written as 64");
        let huge = [attempt(0, SQLITE_BYTES + 1), attempt(1, 1)];
        assert_eq!(rows_per_statement(DbBackend::Sqlite, &huge), [1, 1], "one row over the bound still goes");
    }
}
