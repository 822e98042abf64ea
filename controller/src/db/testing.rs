//! Stores on both engines for tests: a SQLite file and a database on a
//! PostgreSQL server shared by the whole test binary (started on first
//! use; it stops and removes itself when the binary exits).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use convoy_nspawn::postgres::Postgres;

use convoy_common::AppName;

use super::{Db, NewRollout, PostgresOptions};

pub fn postgres() -> &'static Postgres {
    static PG: OnceLock<Postgres> = OnceLock::new();
    PG.get_or_init(|| Postgres::start().expect("starting PostgreSQL for the tests"))
}

pub fn options(url: &str) -> PostgresOptions {
    PostgresOptions {
        url: url.to_owned(),
        ca: None,
        cert: None,
        key: None,
        pool: 4,
    }
}

/// A fresh, empty PostgreSQL store.
pub async fn postgres_db(name: &str) -> Db {
    static N: AtomicU32 = AtomicU32::new(0);
    let db = format!("{name}_{}", N.fetch_add(1, Ordering::Relaxed));
    let pg = postgres();
    pg.create_database(&db).unwrap();
    Db::connect(&options(&pg.url(&db)), "test").await.unwrap().0
}

/// A fresh store on each engine: (engine, store, what keeps it alive).
pub async fn both(name: &str) -> Vec<(&'static str, Db, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Db::open(&dir.path().join(format!("{name}.db"))).unwrap();
    vec![
        ("sqlite", sqlite, Some(dir)),
        ("postgres", postgres_db(name).await, None),
    ]
}

/// A deploy of `app` 1.0.0 into `env` by operator:alice, for store tests.
pub fn deploy<'a>(id: &'a str, app: &'a AppName, env: &'a str) -> NewRollout<'a> {
    NewRollout {
        id,
        app,
        version: "1.0.0",
        env,
        kind: "deploy",
        strategy: "rolling",
        hotfix_reason: "",
        operator: "operator:alice",
        plan: "{}",
    }
}
