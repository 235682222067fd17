//! Connecting: the pool, creating a missing database, and error messages that help.

use std::str::FromStr;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use flotilla_core::redact_url;

use crate::{Error, StoreConfig};

fn unreachable(url: &str, err: impl std::fmt::Display) -> Error {
    Error::Unreachable(format!(
        "cannot connect to Postgres at {}: {err}. Is it running? Start it with \
         `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, \
         or `docker compose -f deploy/compose.yaml up -d postgres`",
        redact_url(url)
    ))
}

pub(crate) async fn pool(config: &StoreConfig) -> Result<Pool, Error> {
    let mut pg =
        tokio_postgres::Config::from_str(&config.url).map_err(|e| Error::Config(e.to_string()))?;
    pg.connect_timeout(config.connect_timeout);
    if pg.get_application_name().is_none() {
        pg.application_name("flotilla");
    }
    ensure_database(&config.url, &pg).await?;
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(config.pool_size)
        .build()
        .map_err(|e| Error::Config(e.to_string()))?;
    Ok(pool)
}

/// Checks that the database answers, so a wrong URL fails at start with a clear message, and
/// creates it when it does not exist yet (through the server's `postgres` database). Several
/// processes starting together may race to create it; losing that race is fine.
async fn ensure_database(url: &str, pg: &tokio_postgres::Config) -> Result<(), Error> {
    let name = pg.get_dbname().unwrap_or("postgres").to_string();
    match pg.connect(NoTls).await {
        Ok((client, conn)) => {
            drop(client);
            drop(conn);
            return Ok(());
        }
        Err(e) if e.code() != Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME) => {
            return Err(unreachable(url, e));
        }
        Err(_) => {}
    }
    let mut admin = pg.clone();
    admin.dbname("postgres");
    let (client, conn) = admin
        .connect(NoTls)
        .await
        .map_err(|e| unreachable(url, e))?;
    let driver = tokio::spawn(conn);
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    let created = client
        .batch_execute(&format!("CREATE DATABASE {quoted}"))
        .await;
    drop(client);
    let _ = driver.await;
    match created {
        Ok(()) => {
            tracing::info!(database = %name, "created database");
            Ok(())
        }
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => Ok(()),
        Err(e) => Err(Error::Db(e)),
    }
}
