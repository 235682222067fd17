//! Postgres persistence of Flotilla.
//!
//! **Architecture invariant:** only this crate knows SQL and Postgres. Every write to a run's
//! steps happens in a transaction that holds the run's row lock (see [`engine::lock_runs`]) and
//! bumps the run's `version`, which is what lets a coordinator trust its cached state of a run.

pub mod access;
pub mod breakers;
mod connect;
pub mod dead_letters;
pub mod definitions;
pub mod engine;
pub mod events;
pub mod idempotency;
pub mod limits;
pub mod logs;
pub mod migrate;
pub mod outbox;
pub mod queries;
pub mod quotas;
pub mod registry;
pub mod schedules;
pub mod statistics;

use std::time::Duration;

pub use deadpool_postgres::{GenericClient, Object as Client, Transaction};

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be reached; the message names the URL (without its password) and
    /// how to start Postgres.
    #[error("{0}")]
    Unreachable(String),
    #[error("invalid DATABASE_URL: {0}")]
    Config(String),
    #[error("migration {version} failed: {source}")]
    Migration {
        version: i32,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("database error: {}", describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("stored data is not readable: {0}")]
    Corrupt(String),
}

impl Error {
    /// Whether the failure is the database being away (as opposed to a bad query or bad data).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Unreachable(_) | Error::Pool(_) => true,
            Error::Db(e) => e.is_closed() || e.as_db_error().is_none(),
            _ => false,
        }
    }

    /// Whether the transaction lost a conflict with another (a deadlock, or a serialization
    /// failure): the same work, tried again, is expected to succeed.
    pub fn is_conflict(&self) -> bool {
        use tokio_postgres::error::SqlState;
        match self {
            Error::Db(e) => matches!(
                e.code(),
                Some(&SqlState::T_R_DEADLOCK_DETECTED | &SqlState::T_R_SERIALIZATION_FAILURE)
            ),
            _ => false,
        }
    }
}

/// tokio-postgres displays a server's error as just "db error", keeping what the server said in
/// its source: name it, so that a log line says which constraint or lock failed.
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => {
            let mut text = format!("{} ({})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(": ");
                text.push_str(detail);
            }
            text
        }
        None => match std::error::Error::source(error) {
            Some(source) => format!("{error}: {source}"),
            None => error.to_string(),
        },
    }
}

/// How to reach Postgres.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub url: String,
    pub pool_size: usize,
    pub connect_timeout: Duration,
}

/// A pool of connections to a migrated Flotilla database.
#[derive(Clone)]
pub struct Store {
    pool: deadpool_postgres::Pool,
}

impl Store {
    /// Connects, creating the database if it does not exist, and runs the migrations.
    pub async fn open(config: &StoreConfig) -> Result<Self, Error> {
        let pool = connect::pool(config).await?;
        let store = Self { pool };
        let mut client = store.client().await?;
        migrate::run(&mut client).await?;
        Ok(store)
    }

    /// A pooled connection.
    pub async fn client(&self) -> Result<Client, Error> {
        Ok(self.pool.get().await?)
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), Error> {
        self.client().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// How much of the pool is in use.
    pub fn pool_use(&self) -> PoolUse {
        let status = self.pool.status();
        PoolUse {
            max: status.max_size,
            in_use: status.size.saturating_sub(status.available),
            waiting: status.waiting,
        }
    }
}

/// The connections of a [`Store`]'s pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUse {
    /// The most it may hold.
    pub max: usize,
    /// Connections lent out now.
    pub in_use: usize,
    /// Requests waiting for a connection.
    pub waiting: usize,
}
