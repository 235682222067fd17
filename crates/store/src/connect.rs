//! Connecting: the pool, creating a missing database, TLS, and error messages that help.
//!
//! TLS follows the URL's `sslmode`: none or `disable` is plaintext; `require`, `verify-ca` and
//! `verify-full` all mean TLS with the server's certificate verified (chain and host name)
//! against the platform's roots, or the CA file of `sslrootcert`. `prefer` and `allow`, which
//! fall back to plaintext without a word, are refused. The connector is rustls either way: with
//! plaintext it is never used.

use std::str::FromStr;
use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

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

/// The connection settings of `url` (a `postgres://` URL) and the TLS connector they need.
pub(crate) fn target(url: &str) -> Result<(tokio_postgres::Config, MakeRustlsConnect), Error> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut sslmode = None;
    let mut rootcert = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.split_once('=') {
            Some(("sslmode", mode)) => {
                sslmode = Some(mode);
                false
            }
            Some(("sslrootcert", path)) => {
                rootcert = Some(path);
                false
            }
            _ => !pair.is_empty(),
        })
        .collect();
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    let mut pg =
        tokio_postgres::Config::from_str(&rest).map_err(|e| Error::Config(e.to_string()))?;
    let tls = match sslmode {
        // A key-value `DATABASE_URL` (`host=… sslmode=require`) whose mode tokio-postgres read.
        None if pg.get_ssl_mode() == SslMode::Require => true,
        None if rest.contains("sslmode") && pg.get_ssl_mode() == SslMode::Prefer => {
            return Err(Error::Config(
                "sslmode=prefer falls back to plaintext without a word; use sslmode=require or \
                 sslmode=disable"
                    .into(),
            ));
        }
        None | Some("disable") => false,
        Some("require" | "verify-ca" | "verify-full") => true,
        Some(mode @ ("prefer" | "allow")) => {
            return Err(Error::Config(format!(
                "sslmode={mode} falls back to plaintext without a word; use sslmode=verify-full \
                 (TLS, the server's certificate verified) or sslmode=disable"
            )));
        }
        Some(other) => {
            return Err(Error::Config(format!(
                "sslmode={other} is none of disable, require, verify-ca, verify-full"
            )));
        }
    };
    pg.ssl_mode(if tls {
        SslMode::Require
    } else {
        SslMode::Disable
    });
    let mut roots = rustls::RootCertStore::empty();
    if tls {
        let certs = match rootcert {
            Some(path) => CertificateDer::pem_file_iter(path)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .map_err(|e| Error::Config(format!("sslrootcert {path}: {e}")))?,
            None => rustls_native_certs::load_native_certs().certs,
        };
        roots.add_parsable_certificates(certs);
        if roots.is_empty() {
            return Err(Error::Config(format!(
                "sslmode asks for TLS, but there is no CA to verify the server with ({})",
                rootcert.map_or("the platform's store is empty".to_owned(), |p| format!(
                    "none in {p}"
                ))
            )));
        }
    }
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Config(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok((pg, MakeRustlsConnect::new(client)))
}

pub(crate) async fn pool(config: &StoreConfig) -> Result<Pool, Error> {
    let (mut pg, tls) = target(&config.url)?;
    pg.connect_timeout(config.connect_timeout);
    if pg.get_application_name().is_none() {
        pg.application_name("flotilla");
    }
    ensure_database(&config.url, &pg, &tls).await?;
    let manager = Manager::from_config(
        pg,
        tls,
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
async fn ensure_database(
    url: &str,
    pg: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
) -> Result<(), Error> {
    let name = pg.get_dbname().unwrap_or("postgres").to_string();
    match pg.connect(tls.clone()).await {
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
        .connect(tls.clone())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(url: &str) -> Result<SslMode, String> {
        target(url)
            .map(|(pg, _)| pg.get_ssl_mode())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn sslmode_is_plaintext_or_verified_tls_never_a_fallback() {
        let base = "postgres://app:pw@db:5432/flotilla";
        assert_eq!(mode(base), Ok(SslMode::Disable));
        assert_eq!(
            mode(&format!("{base}?sslmode=disable")),
            Ok(SslMode::Disable)
        );
        for verified in ["require", "verify-ca", "verify-full"] {
            assert_eq!(
                mode(&format!("{base}?application_name=x&sslmode={verified}")),
                Ok(SslMode::Require),
                "{verified}"
            );
        }
        for fallback in ["prefer", "allow"] {
            let err = mode(&format!("{base}?sslmode={fallback}")).unwrap_err();
            assert!(err.contains("falls back to plaintext"), "{err}");
        }
        let err = mode(&format!(
            "{base}?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"
        ))
        .unwrap_err();
        assert!(err.contains("sslrootcert /nonexistent/ca.pem"), "{err}");
        let other = target(&format!("{base}?application_name=x&sslmode=disable"))
            .unwrap()
            .0;
        assert_eq!(other.get_application_name(), Some("x"));
    }
}
