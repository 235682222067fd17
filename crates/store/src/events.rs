//! Run changes announced to whoever watches: after each engine batch commits, its coordinator
//! notifies, on [`CHANNEL`], the runs it changed ([`announce`]), so a batch rolled back is never
//! heard of; a [`Listener`] hears them on a connection of its own, whichever coordinator wrote.
//!
//! Not inside the batch's transaction: Postgres holds one server-wide lock from a notifying
//! transaction's commit through its WAL flush, so notifying transactions commit one at a time
//! across every database of the server (pgbench, 8 clients: 2,900 commits/s without, 220–400
//! with). The announcement is a transaction of its own whose commit does not wait for the flush,
//! so the lock is held for microseconds. One lost in a crash only delays a watcher's view.

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use uuid::Uuid;

use crate::Error;

/// The notification channel of run changes.
pub const CHANNEL: &str = "flotilla_runs";

/// The most run ids one notification names. A payload must stay under 8000 bytes (37 per id);
/// a batch that changed more runs notifies an empty payload: "many runs changed".
const MAX_NAMED: usize = 200;

/// What one notification says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// These runs changed (their steps, status or both).
    Runs(Vec<Uuid>),
    /// Too many runs changed to name them: read everything again.
    Many,
}

/// The payload naming `runs` (`None` when there is none): their ids, comma-separated, or empty
/// when there are more than [`MAX_NAMED`].
fn payload(runs: impl IntoIterator<Item = Uuid>) -> Option<String> {
    let runs: BTreeSet<Uuid> = runs.into_iter().collect();
    if runs.is_empty() {
        return None;
    }
    if runs.len() > MAX_NAMED {
        return Some(String::new());
    }
    let ids: Vec<String> = runs.iter().map(Uuid::to_string).collect();
    Some(ids.join(","))
}

/// Tells watchers that `runs` changed (nothing when there are none), after their commit.
pub async fn announce(
    client: &impl crate::GenericClient,
    runs: impl IntoIterator<Item = Uuid>,
) -> Result<(), Error> {
    let Some(payload) = payload(runs) else {
        return Ok(());
    };
    // Run ids and commas only: safe to quote as a literal, so the whole transaction is one
    // round trip.
    client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL synchronous_commit TO off; \
             SELECT pg_notify('{CHANNEL}', '{payload}'); COMMIT"
        ))
        .await?;
    Ok(())
}

/// What a payload says; one that names something other than run ids (not ours) is read as
/// [`Changed::Many`], which costs a reader a refresh and never hides a change.
fn parse(payload: &str) -> Changed {
    if payload.is_empty() {
        return Changed::Many;
    }
    payload
        .split(',')
        .map(Uuid::parse_str)
        .collect::<Result<Vec<_>, _>>()
        .map_or(Changed::Many, Changed::Runs)
}

/// A connection listening on [`CHANNEL`].
pub struct Listener {
    notifications: mpsc::UnboundedReceiver<Result<Changed, Error>>,
    // Dropping the client closes the connection.
    _client: tokio_postgres::Client,
}

impl Listener {
    /// Connects to `url` (not through the pool: the connection is held as long as the listener)
    /// and listens.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, Error> {
        let (mut config, tls) = crate::connect::target(url)?;
        config.connect_timeout(timeout);
        if config.get_application_name().is_none() {
            config.application_name("flotilla-events");
        }
        let (client, mut connection) = config.connect(tls).await?;
        let (tx, notifications) = mpsc::unbounded_channel();
        // The connection delivers notifications only while it is polled for messages.
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(|cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                let forwarded = match message {
                    Ok(AsyncMessage::Notification(n)) if n.channel() == CHANNEL => {
                        tx.send(Ok(parse(n.payload())))
                    }
                    Ok(_) => Ok(()),
                    Err(e) => {
                        let _ = tx.send(Err(Error::Db(e)));
                        return;
                    }
                };
                if forwarded.is_err() {
                    return;
                }
            }
        });
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        Ok(Self {
            notifications,
            _client: client,
        })
    }

    /// The next notification; an error when the connection is lost (notifications sent
    /// meanwhile are lost with it: connect again and read everything again).
    pub async fn next(&mut self) -> Result<Changed, Error> {
        self.notifications.recv().await.unwrap_or_else(|| {
            Err(Error::Unreachable(
                "the connection listening for run changes closed".into(),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_name_each_run_once_and_read_back() {
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        let text = payload([b, a, b]).unwrap();
        assert_eq!(text, format!("{a},{b}"));
        assert_eq!(parse(&text), Changed::Runs(vec![a, b]));
        assert_eq!(payload([]), None);
    }

    #[test]
    fn too_many_runs_fit_no_payload_and_are_read_as_many() {
        let text = payload((0..=MAX_NAMED as u128).map(Uuid::from_u128)).unwrap();
        assert_eq!(text, "");
        assert_eq!(parse(&text), Changed::Many);
        let most = payload((0..MAX_NAMED as u128).map(Uuid::from_u128)).unwrap();
        assert!(most.len() < 8000, "{} bytes", most.len());
        assert_eq!(parse("not-a-run"), Changed::Many);
    }
}
