//! Run changes for the API's event stream: one connection per coordinator listens to what every
//! coordinator's engine commits (see `flotilla_store::events`) and hands each change to every
//! open stream.

use std::time::Duration;

use flotilla_api_model::RunsChanged;
use flotilla_broker::Backoff;
use flotilla_store::events::{Changed, Listener};
use futures_util::{Stream, StreamExt};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Changes kept for a stream that reads slowly; past that it is told to read everything again.
const BUFFERED: usize = 256;

/// Hands run changes to the streams that subscribe.
#[derive(Clone)]
pub(crate) struct Changes {
    sender: broadcast::Sender<RunsChanged>,
    shutdown: CancellationToken,
}

impl Changes {
    /// Streams end when `shutdown` is cancelled, so that the HTTP server's graceful shutdown does
    /// not wait for their clients to leave.
    pub(crate) fn new(shutdown: CancellationToken) -> Self {
        Self {
            sender: broadcast::channel(BUFFERED).0,
            shutdown,
        }
    }

    /// The changes from now on.
    pub(crate) fn subscribe(&self) -> impl Stream<Item = RunsChanged> + Send + use<> {
        let receiver = self.sender.subscribe();
        futures_util::stream::unfold(receiver, |mut receiver| async move {
            match receiver.recv().await {
                Ok(changed) => Some((changed, receiver)),
                // Missed changes are unknown: everything may have changed.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    Some((RunsChanged { runs: None }, receiver))
                }
                Err(broadcast::error::RecvError::Closed) => None,
            }
        })
        .take_until(self.shutdown.clone().cancelled_owned())
    }

    /// Listens to Postgres until `stop`, connecting again when the connection is lost; after a
    /// reconnect the streams are told that anything may have changed meanwhile.
    pub(crate) async fn listen(self, database_url: String, stop: CancellationToken) {
        let backoff = Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(5),
        };
        let mut failures = 0;
        let mut reconnect = false;
        loop {
            let connected = tokio::select! {
                () = stop.cancelled() => return,
                connected = Listener::connect(&database_url, Duration::from_secs(10)) => connected,
            };
            match connected {
                Ok(mut listener) => {
                    failures = 0;
                    if reconnect {
                        let _ = self.sender.send(RunsChanged { runs: None });
                    }
                    reconnect = true;
                    loop {
                        let changed = tokio::select! {
                            () = stop.cancelled() => return,
                            changed = listener.next() => changed,
                        };
                        let runs = match changed {
                            Ok(Changed::Runs(runs)) => Some(runs),
                            Ok(Changed::Many) => None,
                            Err(e) => {
                                tracing::warn!(error = %e, "lost the connection listening for run changes; reconnecting");
                                break;
                            }
                        };
                        // No stream open: nobody to tell.
                        let _ = self.sender.send(RunsChanged { runs });
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for run changes; retrying");
                    failures += 1;
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff.delay(failures)) => {}
            }
        }
    }
}
