//! Copying a hub's whole state from its SQLite store into PostgreSQL
//! (`trellis hub migrate`).
//!
//! Both databases are first brought to the same schema by their own
//! migrations; then every table both have is copied row by row, column by
//! column, parents before children (in the order of PostgreSQL's foreign
//! keys), in one PostgreSQL transaction: the copy is all or nothing. The
//! column types are read from PostgreSQL's catalogue, so a table a later
//! migration adds is copied without this file knowing it. What only a
//! shared store keeps (which instance holds which link) is not copied: it
//! describes running processes, not the hub's state.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::Row;

use crate::postgres::PgStore;
use crate::sql::backend;
use crate::sqlite::SqliteStore;
use crate::{Result, StoreError};

/// Tables of the shared store's own bookkeeping, never copied.
const NOT_COPIED: &[&str] = &["hub_instances", "link_claims", "hub_secrets"];

/// Rows inserted per statement.
const BATCH: usize = 200;

/// What was copied: rows per table, in the order copied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    pub tables: Vec<(String, u64)>,
}

impl CopyReport {
    pub fn rows(&self, table: &str) -> u64 {
        self.tables
            .iter()
            .find(|(t, _)| t == table)
            .map_or(0, |(_, n)| *n)
    }
}

/// A column as PostgreSQL declares it.
#[derive(Debug, Clone)]
struct Column {
    name: String,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Text,
    Bool,
}

fn refuse(what: String) -> StoreError {
    StoreError::InUse {
        what,
        hint: "migrate into a new, empty database (createdb), without starting a hub on it first"
            .into(),
    }
}

/// Copies everything from `from` into `to`, which must hold no hub yet.
pub async fn sqlite_to_postgres(from: &SqliteStore, to: &PgStore) -> Result<CopyReport> {
    const DOING: &str = "copying the hub's database";
    let fail = backend(DOING);
    let pg = to.pool();
    let mut tx = pg.begin().await.map_err(backend(DOING))?;
    // Nothing else may write meanwhile (the store's writers take this lock).
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(crate::postgres::WRITE_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(backend(DOING))?;

    let sqlite_tables: BTreeSet<String> = sqlx::query(
        "SELECT name FROM sqlite_master WHERE type = 'table' \
         AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '_sqlx%'",
    )
    .fetch_all(from.read_pool())
    .await
    .map_err(backend(DOING))?
    .iter()
    .map(|r| r.try_get::<String, _>("name"))
    .collect::<std::result::Result<_, _>>()
    .map_err(backend(DOING))?;
    let columns = pg_columns(&mut tx).await?;
    let order = pg_table_order(&mut tx, &columns).await?;

    for table in &order {
        if NOT_COPIED.contains(&table.as_str()) {
            continue;
        }
        if !sqlite_tables.contains(table) {
            return Err(StoreError::Backend {
                doing: DOING,
                source: format!(
                    "PostgreSQL has table {table} but the SQLite database does not; \
                     run the same Trellis version on both"
                )
                .into(),
            });
        }
        let rows: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&mut *tx)
            .await
            .map_err(backend(DOING))?;
        if rows > 0 {
            return Err(refuse(format!(
                "the target database already holds a hub: table {table} has {rows} row(s)"
            )));
        }
    }
    if let Some(extra) = sqlite_tables.iter().find(|t| !columns.contains_key(*t)) {
        return Err(StoreError::Backend {
            doing: DOING,
            source: format!(
                "the SQLite database has table {extra}, which PostgreSQL does not; \
                 run the same Trellis version on both"
            )
            .into(),
        });
    }

    let mut report = CopyReport::default();
    for table in order {
        if NOT_COPIED.contains(&table.as_str()) {
            continue;
        }
        let cols = &columns[&table];
        let names: Vec<&str> = cols.iter().map(|c| c.name.as_str()).collect();
        let select = format!("SELECT {} FROM {table}", names.join(", "));
        let rows = sqlx::query(&select)
            .fetch_all(from.read_pool())
            .await
            .map_err(backend(DOING))?;
        for batch in rows.chunks(BATCH) {
            let mut sql = format!("INSERT INTO {table} ({}) VALUES ", names.join(", "));
            let mut n = 0;
            for (i, _) in batch.iter().enumerate() {
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push('(');
                for j in 0..cols.len() {
                    if j > 0 {
                        sql.push_str(", ");
                    }
                    n += 1;
                    sql.push_str(&format!("${n}"));
                }
                sql.push(')');
            }
            let mut insert = sqlx::query(&sql);
            for row in batch {
                for col in cols {
                    let name = col.name.as_str();
                    insert = match col.kind {
                        Kind::Int => insert.bind(
                            row.try_get::<Option<i64>, _>(name)
                                .map_err(backend(DOING))?,
                        ),
                        Kind::Bool => insert.bind(
                            row.try_get::<Option<bool>, _>(name)
                                .map_err(backend(DOING))?,
                        ),
                        Kind::Text => insert.bind(
                            row.try_get::<Option<String>, _>(name)
                                .map_err(backend(DOING))?,
                        ),
                    };
                }
            }
            insert.execute(&mut *tx).await.map_err(backend(DOING))?;
        }
        report.tables.push((table, rows.len() as u64));
    }
    tx.commit().await.map_err(fail)?;
    Ok(report)
}

/// Every base table's columns, as PostgreSQL declares them.
async fn pg_columns(tx: &mut sqlx::PgConnection) -> Result<BTreeMap<String, Vec<Column>>> {
    const DOING: &str = "reading the PostgreSQL schema";
    let rows = sqlx::query(
        "SELECT c.table_name::text AS t, c.column_name::text AS c, c.data_type::text AS d \
         FROM information_schema.columns c JOIN information_schema.tables t \
           ON t.table_schema = c.table_schema AND t.table_name = c.table_name \
         WHERE c.table_schema = current_schema() AND t.table_type = 'BASE TABLE' \
           AND c.table_name NOT LIKE '\\_sqlx%' \
         ORDER BY c.table_name, c.ordinal_position",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(backend(DOING))?;
    let mut tables: BTreeMap<String, Vec<Column>> = BTreeMap::new();
    for row in rows {
        let table: String = row.try_get("t").map_err(backend(DOING))?;
        let name: String = row.try_get("c").map_err(backend(DOING))?;
        let data_type: String = row.try_get("d").map_err(backend(DOING))?;
        let kind = match data_type.as_str() {
            "bigint" | "integer" | "smallint" => Kind::Int,
            "boolean" => Kind::Bool,
            "text" | "character varying" => Kind::Text,
            other => {
                return Err(StoreError::Backend {
                    doing: DOING,
                    source: format!(
                        "column {table}.{name} has type {other}, which the copy does not know"
                    )
                    .into(),
                });
            }
        };
        tables.entry(table).or_default().push(Column { name, kind });
    }
    Ok(tables)
}

/// The tables, each after every table its foreign keys point to.
async fn pg_table_order(
    tx: &mut sqlx::PgConnection,
    columns: &BTreeMap<String, Vec<Column>>,
) -> Result<Vec<String>> {
    const DOING: &str = "reading the PostgreSQL schema";
    let rows = sqlx::query(
        "SELECT conrelid::regclass::text AS child, confrelid::regclass::text AS parent \
         FROM pg_constraint WHERE contype = 'f' AND connamespace = current_schema()::regnamespace",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(backend(DOING))?;
    let mut parents: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for row in rows {
        let child: String = row.try_get("child").map_err(backend(DOING))?;
        let parent: String = row.try_get("parent").map_err(backend(DOING))?;
        if child != parent {
            parents.entry(child).or_default().insert(parent);
        }
    }
    let mut order = Vec::with_capacity(columns.len());
    let mut placed = BTreeSet::new();
    while order.len() < columns.len() {
        let ready: Vec<&String> = columns
            .keys()
            .filter(|t| !placed.contains(*t))
            .filter(|t| {
                parents
                    .get(*t)
                    .is_none_or(|ps| ps.iter().all(|p| placed.contains(p)))
            })
            .collect();
        if ready.is_empty() {
            return Err(StoreError::Backend {
                doing: DOING,
                source: "the foreign keys form a cycle".into(),
            });
        }
        for table in ready {
            placed.insert(table.clone());
            order.push(table.clone());
        }
    }
    Ok(order)
}
