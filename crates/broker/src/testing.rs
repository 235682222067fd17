//! What tests of code that talks to RabbitMQ share (feature `test-util`): fault injection for
//! code that must survive a lost connection, and the clean-up of a test's queues.
//!
//! Restarting RabbitMQ would disturb every other test using it; [`Proxy`] hits only the
//! connections of the test that owns it.

use std::{
    io,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use crate::{Connection, Error, QueueNames};

/// The queues a test's fleet serving `agents` may have declared under `names`' prefix: results,
/// heartbeats, logs and dead letters, and every task queue a worker of each agent without labels
/// consumes (its high-priority queue included).
pub fn queues_of<'a>(names: &QueueNames, agents: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut queues = vec![
        names.results(),
        names.heartbeats(),
        names.logs(),
        names.dead_letters(),
    ];
    for agent in agents {
        let tasks = names.worker_queues(agent, &Default::default());
        queues.extend(tasks.into_iter().map(|(queue, _)| queue));
    }
    queues
}

/// Deletes `queues` and the control exchange of `names`: what a test declared under its own
/// prefix. Quorum queues outlive their declarers, and hundreds left on a node make it stop
/// answering, so every test deletes its own. Deleting one that was never declared is no error.
pub async fn delete_topology(
    connection: &Connection,
    names: &QueueNames,
    queues: &[String],
) -> Result<(), Error> {
    let channel = connection.open_channel().await?;
    for queue in queues {
        channel.delete_queue(queue).await?;
    }
    channel.delete_exchange(&names.control()).await?;
    channel.close().await
}

/// What went through a [`Proxy`] so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyCounts {
    /// Connections accepted and forwarded to the broker.
    pub forwarded: usize,
    /// Connections closed at once because the proxy was cut.
    pub refused: usize,
}

/// A TCP proxy on 127.0.0.1 in front of a RabbitMQ, whose connections a test can cut.
///
/// [`Proxy::cut`] drops every connection through it and refuses new ones (it accepts and closes
/// them at once, as a broker that is shutting down does) until [`Proxy::restore`].
/// [`Proxy::freeze`] stops its connections passing bytes but leaves them open, as a network
/// partition does. Dropping the proxy closes its connections and stops it.
#[derive(Debug)]
pub struct Proxy {
    url: String,
    state: Arc<State>,
    accepting: JoinHandle<()>,
}

#[derive(Debug)]
struct State {
    upstream: String,
    faults: Mutex<Faults>,
    /// Whether connections are refused, and the counts.
    status: watch::Sender<(bool, ProxyCounts)>,
}

/// Cancelled to hit the connections opened before; each replaced by a fresh one when used.
#[derive(Debug, Clone, Default)]
struct Faults {
    cut: CancellationToken,
    freeze: CancellationToken,
}

impl State {
    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        // Tokens are replaced whole: the value is consistent even if a holder panicked.
        self.faults.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Proxy {
    /// Starts a proxy to the broker that `url` (`amqp://user:password@host[:port]/vhost`) names.
    pub async fn start(url: &str) -> io::Result<Self> {
        let (before, authority, after) = split_authority(url).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "not an amqp://host/vhost URL")
        })?;
        let upstream = if authority.contains(':') {
            authority.to_owned()
        } else {
            format!("{authority}:5672")
        };
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("{before}{}{after}", listener.local_addr()?);
        let state = Arc::new(State {
            upstream,
            faults: Mutex::new(Faults::default()),
            status: watch::Sender::new((false, ProxyCounts::default())),
        });
        let accepting = tokio::spawn(accept(listener, state.clone()));
        Ok(Self {
            url,
            state,
            accepting,
        })
    }

    /// The broker URL through the proxy: the original one with the proxy's host and port.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Drops every connection through the proxy, and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.state
            .status
            .send_modify(|(refusing, _)| *refusing = true);
        std::mem::take(&mut self.state.faults().cut).cancel();
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.state
            .status
            .send_modify(|(refusing, _)| *refusing = false);
    }

    /// Stops the connections open now from passing bytes, and leaves them open until
    /// [`Proxy::cut`]. New connections are not affected.
    pub fn freeze(&self) {
        std::mem::take(&mut self.state.faults().freeze).cancel();
    }

    pub fn counts(&self) -> ProxyCounts {
        self.state.status.borrow().1
    }

    /// Waits until the counts satisfy `condition`; bound it with a timeout.
    pub async fn wait_for(&self, condition: impl Fn(ProxyCounts) -> bool) -> ProxyCounts {
        let mut status = self.state.status.subscribe();
        let satisfied = status
            .wait_for(|(_, counts)| condition(*counts))
            .await
            .expect("the proxy owns the sender");
        satisfied.1
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.state.faults().cut.cancel();
    }
}

async fn accept(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            // Out of file descriptors, say: nothing to forward until some are free.
            tokio::task::yield_now().await;
            continue;
        };
        let refusing = state.status.borrow().0;
        if refusing {
            drop(inbound);
            state.status.send_modify(|(_, counts)| counts.refused += 1);
            continue;
        }
        state
            .status
            .send_modify(|(_, counts)| counts.forwarded += 1);
        // Taken now, so that a fault after this accept hits this connection too.
        let faults = state.faults().clone();
        let upstream = state.upstream.clone();
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                return;
            };
            tokio::select! {
                () = faults.cut.cancelled() => return,
                () = faults.freeze.cancelled() => {}
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => return,
            }
            // Frozen: both sockets stay open, and nothing reads them.
            faults.cut.cancelled().await;
        });
    }
}

/// `(scheme://user:pass@, host[:port], /vhost...)` of a URL.
fn split_authority(url: &str) -> Option<(&str, &str, &str)> {
    let start = url.find("://")? + 3;
    let end = url[start..]
        .find('/')
        .map_or(url.len(), |slash| start + slash);
    let host = url[start..end]
        .rfind('@')
        .map_or(start, |at| start + at + 1);
    Some((&url[..host], &url[host..end], &url[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_is_found_with_and_without_credentials() {
        assert_eq!(
            split_authority("amqp://guest:guest@127.0.0.1:5672/%2f"),
            Some(("amqp://guest:guest@", "127.0.0.1:5672", "/%2f"))
        );
        assert_eq!(
            split_authority("amqp://rabbit"),
            Some(("amqp://", "rabbit", ""))
        );
        assert_eq!(
            split_authority("amqp://u:p@rabbit/vhost@home"),
            Some(("amqp://u:p@", "rabbit", "/vhost@home"))
        );
        assert_eq!(split_authority("rabbit:5672"), None);
    }
}
