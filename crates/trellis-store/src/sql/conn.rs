//! The seam between the shared SQL and each database: a statement with its
//! parameters ([`Q`]), something that runs statements ([`Conn`]), and a row
//! that gives columns back as the few types the schema uses ([`SqlRow`]).
//!
//! The shared store code is written against these traits once; each
//! backend implements them for its own connection and row types without
//! any generic bounds on sqlx's side, so a dialect's difference stays in
//! that dialect's file. Parameters are collected as [`Arg`]s (the schema
//! has only integers, text and booleans) and bound by the backend.

use async_trait::async_trait;

/// One statement parameter.
#[derive(Debug, Clone)]
pub enum Arg<'a> {
    Int(Option<i64>),
    Text(Option<&'a str>),
    Owned(Option<String>),
    Bool(bool),
}

/// A statement and its parameters, bound in order to `$1`, `$2`, …
#[derive(Debug, Clone)]
pub struct Q<'a> {
    pub sql: &'a str,
    pub args: Vec<Arg<'a>>,
}

/// Starts a statement.
pub fn q(sql: &str) -> Q<'_> {
    Q {
        sql,
        args: Vec::new(),
    }
}

/// What [`Q::bind`] takes.
pub trait IntoArg<'a> {
    fn into_arg(self) -> Arg<'a>;
}

impl<'a> IntoArg<'a> for i64 {
    fn into_arg(self) -> Arg<'a> {
        Arg::Int(Some(self))
    }
}

impl<'a> IntoArg<'a> for Option<i64> {
    fn into_arg(self) -> Arg<'a> {
        Arg::Int(self)
    }
}

impl<'a> IntoArg<'a> for bool {
    fn into_arg(self) -> Arg<'a> {
        Arg::Bool(self)
    }
}

impl<'a> IntoArg<'a> for &'a str {
    fn into_arg(self) -> Arg<'a> {
        Arg::Text(Some(self))
    }
}

impl<'a> IntoArg<'a> for &'a String {
    fn into_arg(self) -> Arg<'a> {
        Arg::Text(Some(self.as_str()))
    }
}

impl<'a> IntoArg<'a> for String {
    fn into_arg(self) -> Arg<'a> {
        Arg::Owned(Some(self))
    }
}

impl<'a> IntoArg<'a> for Option<String> {
    fn into_arg(self) -> Arg<'a> {
        Arg::Owned(self)
    }
}

impl<'a> IntoArg<'a> for &'a Option<String> {
    fn into_arg(self) -> Arg<'a> {
        Arg::Text(self.as_deref())
    }
}

impl<'a> IntoArg<'a> for Option<&'a str> {
    fn into_arg(self) -> Arg<'a> {
        Arg::Text(self)
    }
}

impl<'a> Q<'a> {
    pub fn bind(mut self, value: impl IntoArg<'a>) -> Self {
        self.args.push(value.into_arg());
        self
    }

    pub async fn fetch_all<C: Conn + ?Sized>(self, c: &mut C) -> Result<Vec<C::Row>, sqlx::Error> {
        c.fetch_all(self).await
    }

    pub async fn fetch_optional<C: Conn + ?Sized>(
        self,
        c: &mut C,
    ) -> Result<Option<C::Row>, sqlx::Error> {
        c.fetch_optional(self).await
    }

    pub async fn fetch_one<C: Conn + ?Sized>(self, c: &mut C) -> Result<C::Row, sqlx::Error> {
        c.fetch_optional(self)
            .await?
            .ok_or(sqlx::Error::RowNotFound)
    }

    /// Runs the statement; returns how many rows it changed.
    pub async fn execute<C: Conn + ?Sized>(self, c: &mut C) -> Result<u64, sqlx::Error> {
        c.execute(self).await
    }
}

/// A connection (or an open transaction on one) that runs statements.
#[async_trait]
pub trait Conn: Send {
    type Row: SqlRow + Send;
    async fn fetch_all(&mut self, q: Q<'_>) -> Result<Vec<Self::Row>, sqlx::Error>;
    async fn fetch_optional(&mut self, q: Q<'_>) -> Result<Option<Self::Row>, sqlx::Error>;
    async fn execute(&mut self, q: Q<'_>) -> Result<u64, sqlx::Error>;
}

/// A result row, read by column name.
pub trait SqlRow {
    fn int(&self, col: &str) -> Result<Option<i64>, sqlx::Error>;
    fn text(&self, col: &str) -> Result<Option<String>, sqlx::Error>;
    fn flag(&self, col: &str) -> Result<bool, sqlx::Error>;
}

/// The column types the schema uses, for [`super::col`].
pub trait FromCol: Sized {
    fn from_col<R: SqlRow + ?Sized>(row: &R, col: &str) -> Result<Self, sqlx::Error>;
}

fn null(col: &str) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: col.to_owned(),
        source: "unexpected NULL".into(),
    }
}

impl FromCol for i64 {
    fn from_col<R: SqlRow + ?Sized>(row: &R, col: &str) -> Result<Self, sqlx::Error> {
        row.int(col)?.ok_or_else(|| null(col))
    }
}

impl FromCol for Option<i64> {
    fn from_col<R: SqlRow + ?Sized>(row: &R, col: &str) -> Result<Self, sqlx::Error> {
        row.int(col)
    }
}

impl FromCol for String {
    fn from_col<R: SqlRow + ?Sized>(row: &R, col: &str) -> Result<Self, sqlx::Error> {
        row.text(col)?.ok_or_else(|| null(col))
    }
}

impl FromCol for Option<String> {
    fn from_col<R: SqlRow + ?Sized>(row: &R, col: &str) -> Result<Self, sqlx::Error> {
        row.text(col)
    }
}

impl FromCol for bool {
    fn from_col<R: SqlRow + ?Sized>(row: &R, col: &str) -> Result<Self, sqlx::Error> {
        row.flag(col)
    }
}

/// Implements [`Conn`] and [`SqlRow`] for one sqlx database: its
/// connection, its row, and how each [`Arg`] binds. The same few lines for
/// every backend, so they are written once here.
macro_rules! sqlx_conn {
    ($conn:ty, $row:ty) => {
        fn prepare<'q>(
            q: $crate::sql::conn::Q<'q>,
        ) -> sqlx::query::Query<
            'q,
            <$conn as sqlx::Connection>::Database,
            <<$conn as sqlx::Connection>::Database as sqlx::Database>::Arguments<'q>,
        > {
            use $crate::sql::conn::Arg;
            let mut query = sqlx::query(q.sql);
            for arg in q.args {
                query = match arg {
                    Arg::Int(v) => query.bind(v),
                    Arg::Text(v) => query.bind(v),
                    Arg::Owned(v) => query.bind(v),
                    Arg::Bool(v) => query.bind(v),
                };
            }
            query
        }

        #[async_trait::async_trait]
        impl $crate::sql::conn::Conn for $conn {
            type Row = $row;

            async fn fetch_all(
                &mut self,
                q: $crate::sql::conn::Q<'_>,
            ) -> Result<Vec<$row>, sqlx::Error> {
                prepare(q).fetch_all(&mut *self).await
            }

            async fn fetch_optional(
                &mut self,
                q: $crate::sql::conn::Q<'_>,
            ) -> Result<Option<$row>, sqlx::Error> {
                prepare(q).fetch_optional(&mut *self).await
            }

            async fn execute(&mut self, q: $crate::sql::conn::Q<'_>) -> Result<u64, sqlx::Error> {
                Ok(prepare(q).execute(&mut *self).await?.rows_affected())
            }
        }

        impl $crate::sql::conn::SqlRow for $row {
            fn int(&self, col: &str) -> Result<Option<i64>, sqlx::Error> {
                sqlx::Row::try_get(self, col)
            }

            fn text(&self, col: &str) -> Result<Option<String>, sqlx::Error> {
                sqlx::Row::try_get(self, col)
            }

            fn flag(&self, col: &str) -> Result<bool, sqlx::Error> {
                sqlx::Row::try_get(self, col)
            }
        }
    };
}

pub(crate) use sqlx_conn;
