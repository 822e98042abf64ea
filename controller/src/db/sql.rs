//! One way of running SQL on either engine the controller stores its
//! state in: SQLite (embedded, one controller) or PostgreSQL (several
//! controllers on one database).
//!
//! Every query is written once, with numbered parameters (`?1`, `?2`…,
//! which SQLite takes as they are and PostgreSQL as `$1`, `$2`…) in the SQL
//! both engines share. Values cross as [`Value`]s: integers, reals, text,
//! bytes or null, which is all the controller stores.

use std::sync::Arc;

use bytes::BytesMut;
use tokio_postgres::types::{IsNull, ToSql, Type};

use super::DbError;

/// A parameter or a column's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Text(s.to_owned())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Text(s)
    }
}
impl From<&String> for Value {
    fn from(s: &String) -> Self {
        Value::Text(s.clone())
    }
}
impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Value::Int(n)
    }
}
impl From<&i64> for Value {
    fn from(n: &i64) -> Self {
        Value::Int(*n)
    }
}
impl From<u64> for Value {
    fn from(n: u64) -> Self {
        Value::Int(n as i64)
    }
}
impl From<u32> for Value {
    fn from(n: u32) -> Self {
        Value::Int(n.into())
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Int(b.into())
    }
}
impl From<&bool> for Value {
    fn from(b: &bool) -> Self {
        Value::Int((*b).into())
    }
}
impl From<f64> for Value {
    fn from(x: f64) -> Self {
        Value::Real(x)
    }
}
impl From<Vec<u8>> for Value {
    fn from(b: Vec<u8>) -> Self {
        Value::Blob(b)
    }
}
impl From<&Vec<u8>> for Value {
    fn from(b: &Vec<u8>) -> Self {
        Value::Blob(b.clone())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// Parameters of one statement: `params![a, b, c]`.
#[macro_export]
macro_rules! params {
    ($($v:expr),* $(,)?) => { &[$($crate::db::Value::from($v)),*] as &[$crate::db::Value] };
}

/// A column's value as a Rust type; `None` when the stored value is not
/// one.
pub trait FromValue: Sized {
    fn from_value(v: &Value) -> Option<Self>;
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Int(n) => Some(*n),
            _ => None,
        }
    }
}
impl FromValue for u64 {
    fn from_value(v: &Value) -> Option<Self> {
        i64::from_value(v).and_then(|n| u64::try_from(n).ok())
    }
}
impl FromValue for bool {
    fn from_value(v: &Value) -> Option<Self> {
        i64::from_value(v).map(|n| n != 0)
    }
}
impl FromValue for f64 {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Real(x) => Some(*x),
            Value::Int(n) => Some(*n as f64),
            _ => None,
        }
    }
}
impl FromValue for String {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
}
impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Blob(b) => Some(b.clone()),
            _ => None,
        }
    }
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Null => Some(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// One row of a result.
#[derive(Debug, Clone)]
pub struct Row(Vec<Value>);

impl Row {
    /// Column `i` as a `T`; a stored value of another type is an error
    /// naming the column.
    pub fn get<T: FromValue>(&self, i: usize) -> Result<T, DbError> {
        let v = self
            .0
            .get(i)
            .ok_or_else(|| DbError::Corrupt(format!("a result has no column {i}")))?;
        T::from_value(v)
            .ok_or_else(|| DbError::Corrupt(format!("column {i} holds {v:?}, not a {}", std::any::type_name::<T>())))
    }
}

/// Which engine, and how to reach it.
#[derive(Clone)]
pub(super) enum Engine {
    /// One connection; statements run one at a time, as SQLite writes do.
    Sqlite(Arc<tokio::sync::Mutex<rusqlite::Connection>>),
    Postgres(deadpool_postgres::Pool),
}

/// A connection taken from the engine for one or more statements.
pub struct Conn {
    inner: Inner,
}

enum Inner {
    Sqlite(tokio::sync::OwnedMutexGuard<rusqlite::Connection>),
    Postgres(Option<Box<deadpool_postgres::Object>>),
}

impl Engine {
    pub(super) async fn conn(&self) -> Result<Conn, DbError> {
        let inner = match self {
            Engine::Sqlite(c) => Inner::Sqlite(c.clone().lock_owned().await),
            Engine::Postgres(pool) => Inner::Postgres(Some(Box::new(pool.get().await.map_err(pool_error)?))),
        };
        Ok(Conn { inner })
    }
}

/// Why no connection came from the pool, with the server's or the
/// network's own words.
fn pool_error(e: deadpool_postgres::PoolError) -> DbError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => DbError::postgres(e),
        deadpool_postgres::PoolError::Timeout(_) => DbError::Unavailable(
            "no database connection within 10s (the server is down or every connection is busy)".into(),
        ),
        e => DbError::Unavailable(super::with_causes(&e)),
    }
}

/// `?N` → `$N`: the same parameters in PostgreSQL's spelling.
pub(super) fn postgres_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

fn sqlite_value(v: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(n) => Value::Int(n),
        ValueRef::Real(x) => Value::Real(x),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(n) => ValueRef::Integer(*n),
            Value::Real(x) => ValueRef::Real(*x),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

/// A value in the type PostgreSQL inferred for its parameter.
impl ToSql for Value {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(n) => match *ty {
                Type::INT8 => n.to_sql(ty, out),
                Type::INT4 => i32::try_from(*n)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*n)?.to_sql(ty, out),
                Type::BOOL => (*n != 0).to_sql(ty, out),
                Type::FLOAT8 => (*n as f64).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => n.to_string().to_sql(ty, out),
                _ => Err(format!("an integer cannot be stored as {ty}").into()),
            },
            Value::Real(x) => match *ty {
                Type::FLOAT8 => x.to_sql(ty, out),
                Type::FLOAT4 => (*x as f32).to_sql(ty, out),
                _ => Err(format!("a real number cannot be stored as {ty}").into()),
            },
            Value::Text(s) => s.as_str().to_sql(ty, out),
            Value::Blob(b) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

fn postgres_row(row: &tokio_postgres::Row) -> Result<Row, DbError> {
    let mut out = Vec::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        let ty = col.type_();
        let v = match *ty {
            Type::INT8 => row.try_get::<_, Option<i64>>(i).map(|v| v.map(Value::Int)),
            Type::INT4 => row
                .try_get::<_, Option<i32>>(i)
                .map(|v| v.map(|n| Value::Int(n.into()))),
            Type::INT2 => row
                .try_get::<_, Option<i16>>(i)
                .map(|v| v.map(|n| Value::Int(n.into()))),
            Type::BOOL => row
                .try_get::<_, Option<bool>>(i)
                .map(|v| v.map(|b| Value::Int(b.into()))),
            Type::FLOAT8 => row.try_get::<_, Option<f64>>(i).map(|v| v.map(Value::Real)),
            Type::FLOAT4 => row
                .try_get::<_, Option<f32>>(i)
                .map(|v| v.map(|x| Value::Real(x.into()))),
            Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(i).map(|v| v.map(Value::Blob)),
            Type::TEXT | Type::VARCHAR | Type::NAME | Type::BPCHAR => {
                row.try_get::<_, Option<String>>(i).map(|v| v.map(Value::Text))
            }
            _ => {
                return Err(DbError::Corrupt(format!(
                    "column {} is of type {ty}, which convoy does not read",
                    col.name()
                )))
            }
        };
        out.push(v.map_err(DbError::postgres)?.unwrap_or(Value::Null));
    }
    Ok(Row(out))
}

impl Conn {
    /// Runs one statement; returns the rows it changed.
    pub async fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        match &mut self.inner {
            Inner::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                Ok(stmt.execute(rusqlite::params_from_iter(params.iter()))? as u64)
            }
            Inner::Postgres(c) => {
                let c = c.as_ref().expect("a connection until dropped");
                let stmt = c.prepare_cached(&postgres_sql(sql)).await.map_err(DbError::postgres)?;
                let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
                c.execute(&stmt, &refs).await.map_err(DbError::postgres)
            }
        }
    }

    /// Runs one query; returns every row.
    pub async fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        match &mut self.inner {
            Inner::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let n = stmt.column_count();
                let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    out.push(Row((0..n)
                        .map(|i| r.get_ref(i).map(sqlite_value))
                        .collect::<Result<_, _>>()?));
                }
                Ok(out)
            }
            Inner::Postgres(c) => {
                let c = c.as_ref().expect("a connection until dropped");
                let stmt = c.prepare_cached(&postgres_sql(sql)).await.map_err(DbError::postgres)?;
                let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
                c.query(&stmt, &refs)
                    .await
                    .map_err(DbError::postgres)?
                    .iter()
                    .map(postgres_row)
                    .collect()
            }
        }
    }

    /// The first row, if any.
    pub async fn query_opt(&mut self, sql: &str, params: &[Value]) -> Result<Option<Row>, DbError> {
        Ok(self.query(sql, params).await?.into_iter().next())
    }

    /// The first row, which must be there.
    pub async fn query_one(&mut self, sql: &str, params: &[Value]) -> Result<Row, DbError> {
        self.query_opt(sql, params)
            .await?
            .ok_or_else(|| DbError::Corrupt(format!("no row from: {sql}")))
    }

    /// Runs statements without parameters (a schema).
    pub async fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        match &mut self.inner {
            Inner::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Inner::Postgres(c) => c
                .as_ref()
                .expect("a connection until dropped")
                .batch_execute(sql)
                .await
                .map_err(DbError::postgres),
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.inner, Inner::Postgres(_))
    }

    /// Starts a transaction on this connection.
    pub async fn begin(mut self) -> Result<Tx, DbError> {
        // SQLite: take the write lock now, so that a read-then-write
        // transaction cannot fail halfway on another writer.
        // PostgreSQL: the bound on a stopped controller's transaction
        // (`IDLE_IN_TRANSACTION`); SET LOCAL lasts the transaction only, so
        // it holds behind transaction-pooling proxies too.
        let begin = if self.is_postgres() {
            format!(
                "BEGIN; SET LOCAL idle_in_transaction_session_timeout = {}",
                super::IDLE_IN_TRANSACTION.as_millis()
            )
        } else {
            "BEGIN IMMEDIATE".to_owned()
        };
        self.batch(&begin).await?;
        Ok(Tx { conn: Some(self) })
    }
}

/// A transaction: committed by [`Tx::commit`], rolled back if dropped
/// before.
pub struct Tx {
    conn: Option<Conn>,
}

impl std::ops::Deref for Tx {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn.as_ref().expect("open until committed")
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("open until committed")
    }
}

impl Tx {
    pub async fn commit(mut self) -> Result<(), DbError> {
        let mut conn = self.conn.take().expect("committed once");
        if let Err(e) = conn.batch("COMMIT").await {
            // Whatever state the connection is in, it must not be reused.
            conn.discard();
            return Err(e);
        }
        Ok(())
    }
}

impl Conn {
    /// Drops the connection instead of returning it to the pool (the
    /// server rolls back whatever it had open).
    fn discard(&mut self) {
        match &mut self.inner {
            Inner::Sqlite(c) => {
                if !c.is_autocommit() {
                    let _ = c.execute_batch("ROLLBACK");
                }
            }
            Inner::Postgres(c) => {
                if let Some(obj) = c.take() {
                    drop(deadpool_postgres::Object::take(*obj));
                }
            }
        }
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            conn.discard();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parameters_in_postgres_spelling() {
        assert_eq!(
            super::postgres_sql("SELECT a FROM t WHERE b = ?1 AND c = ?12 AND d = '?'"),
            "SELECT a FROM t WHERE b = $1 AND c = $12 AND d = '?'"
        );
    }
}
