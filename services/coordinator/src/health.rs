//! The coordinator's health and metrics: what `/health/ready` checks and what `/metrics` reads
//! from Postgres and RabbitMQ at scrape time.
//!
//! Readiness and the queue depths use a RabbitMQ connection of their own, opened again when it
//! is lost: the engine's connections are replaced by new ones on every loss, and asking the
//! broker a question is the one sure sign it answers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_api::Probe;
use flotilla_api_model::HealthCheck;
use flotilla_broker::{BrokerConfig, Channel, Connection, QueueCounts, QueueNames};
use flotilla_core::breaker::BreakerState;
use flotilla_store::{Store, breakers, outbox, queries, registry};
use flotilla_telemetry::metrics::CoordinatorMetrics;
use tokio::sync::Mutex;

/// How long one check, or one part of a scrape, may take before it counts as failing.
pub(crate) const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long reading every agent queue's depth may take in one scrape.
const QUEUE_SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct CoordinatorProbe {
    store: Store,
    broker: BrokerConfig,
    names: QueueNames,
    metrics: Arc<CoordinatorMetrics>,
    /// The probe's own link to RabbitMQ; `None` until needed, and after it was lost. Held for
    /// a whole check or scrape, which also makes scrapes take turns: each sets the gauges it
    /// read, then renders them.
    link: Mutex<Option<Link>>,
}

/// What a scrape reads from Postgres.
struct Counts {
    backlog: i64,
    active: i64,
    oldest: Vec<(String, Duration)>,
}

struct Link {
    connection: Connection,
    channel: Channel,
}

impl CoordinatorProbe {
    pub(crate) fn new(
        store: Store,
        broker: BrokerConfig,
        metrics: Arc<CoordinatorMetrics>,
    ) -> Self {
        Self {
            store,
            names: broker.queue_names(),
            broker: BrokerConfig {
                connect_timeout: CHECK_TIMEOUT,
                ..broker
            },
            metrics,
            link: Mutex::new(None),
        }
    }

    /// The queue names of the fleet.
    pub(crate) fn names(&self) -> &QueueNames {
        &self.names
    }

    async fn check_postgres(&self) -> HealthCheck {
        match tokio::time::timeout(CHECK_TIMEOUT, self.store.ping()).await {
            Ok(Ok(())) => HealthCheck::ok("postgres", "answers"),
            Ok(Err(e)) => HealthCheck::failing("postgres", format!("Postgres is unavailable: {e}")),
            Err(_) => HealthCheck::failing(
                "postgres",
                format!("Postgres did not answer within {CHECK_TIMEOUT:?}"),
            ),
        }
    }

    /// Asks RabbitMQ about the results queue: the broker answers, and the queue the engine
    /// consumes exists.
    async fn check_rabbitmq(&self) -> HealthCheck {
        let mut link = self.link.lock().await;
        let results = self.names.results();
        match self
            .ask(&mut link, |channel| async move {
                channel.message_count(&results).await
            })
            .await
        {
            Ok(waiting) => {
                HealthCheck::ok("rabbitmq", format!("connected; {waiting} results waiting"))
            }
            Err(e) => HealthCheck::failing("rabbitmq", e.to_string()),
        }
    }

    /// Runs `question` on the probe's channel, connecting first if need be. A link that fails
    /// a question is dropped, so that the next one starts on a fresh connection: a timeout may
    /// mean a connection that no longer passes bytes.
    async fn ask<T, F, Fut>(
        &self,
        link: &mut Option<Link>,
        question: F,
    ) -> Result<T, flotilla_broker::Error>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: Future<Output = Result<T, flotilla_broker::Error>>,
    {
        if link.as_ref().is_some_and(|l| !l.connection.is_connected()) {
            *link = None;
        }
        if link.is_none() {
            let connection = flotilla_broker::connect(&self.broker, "flotilla-coordinator-probe")
                .await?
                .with_operation_timeout(CHECK_TIMEOUT);
            let channel = connection.open_channel().await?;
            *link = Some(Link {
                connection,
                channel,
            });
        }
        let current = link.as_mut().expect("the link was just set");
        // RabbitMQ closes a channel on which a question failed (a queue that does not exist).
        if !current.channel.is_open() {
            current.channel = current.connection.open_channel().await?;
        }
        let answer = question(current.channel.clone()).await;
        if let Err(flotilla_broker::Error::Timeout { .. }) = &answer
            && let Some(lost) = link.take()
        {
            // Closing may time out too; it is bounded by the connection's operation timeout.
            let _ = lost.connection.close().await;
        }
        answer
    }

    /// The ready messages of each of `agents`' task queues (see [`Self::queue_depths`]), within
    /// [`QUEUE_SCRAPE_TIMEOUT`]. For the API, which shares the probe's link.
    pub(crate) async fn agent_queue_depths(&self, agents: Vec<String>) -> Vec<(String, u32)> {
        let known: BTreeMap<String, Vec<String>> =
            self.metrics.known_agents().into_iter().collect();
        let agents = agents
            .into_iter()
            .map(|agent| {
                let label_queues = known.get(&agent).cloned().unwrap_or_default();
                (agent, label_queues)
            })
            .collect();
        let mut link = self.link.lock().await;
        self.timed_queue_depths(&mut link, agents).await
    }

    async fn timed_queue_depths(
        &self,
        link: &mut Option<Link>,
        agents: Vec<(String, Vec<String>)>,
    ) -> Vec<(String, u32)> {
        tokio::time::timeout(QUEUE_SCRAPE_TIMEOUT, self.queue_depths(link, agents))
            .await
            .unwrap_or_else(|_| {
                tracing::warn!(timeout = ?QUEUE_SCRAPE_TIMEOUT, "reading queue depths took too long");
                // A question may still be in flight on it: start the next one afresh.
                *link = None;
                Vec::new()
            })
    }

    /// The ready messages of each of `agents`' task queues together: its own, its
    /// high-priority twin and those of the label sets its tasks went to. Agents none of whose
    /// queues exist are left out.
    async fn queue_depths(
        &self,
        link: &mut Option<Link>,
        agents: Vec<(String, Vec<String>)>,
    ) -> Vec<(String, u32)> {
        let mut depths = Vec::new();
        'agents: for (agent, label_queues) in agents {
            let own = [
                self.names.agent(&agent),
                self.names.tasks(&agent, &Default::default(), true),
            ];
            let mut depth = None;
            for queue in own.into_iter().chain(label_queues) {
                match self
                    .ask(link, |channel| async move {
                        channel.message_count(&queue).await
                    })
                    .await
                {
                    Ok(n) => depth = Some(depth.unwrap_or(0) + n),
                    Err(e) if link.is_none() => {
                        tracing::warn!(error = %e, "cannot read queue depths from RabbitMQ");
                        break 'agents;
                    }
                    // The queue is gone (deleted by hand, or never declared); the link stays.
                    Err(e) => tracing::debug!(agent, error = %e, "no queue depth"),
                }
            }
            if let Some(depth) = depth {
                depths.push((agent, depth));
            }
        }
        depths
    }

    /// What RabbitMQ tells of each of `queues` (ready messages and consumers), `None` for a
    /// queue that does not exist; an error when the broker cannot be asked.
    pub(crate) async fn queue_counts(
        &self,
        queues: Vec<String>,
    ) -> Result<Vec<(String, Option<QueueCounts>)>, String> {
        let mut link = self.link.lock().await;
        let ask_all = async {
            let mut counts = Vec::new();
            for queue in queues {
                let name = queue.clone();
                match self
                    .ask(&mut link, |channel| async move {
                        channel.queue_counts(&name).await
                    })
                    .await
                {
                    Ok(c) => counts.push((queue, Some(c))),
                    Err(e) if link.is_none() => return Err(e.to_string()),
                    // RabbitMQ refused the passive declare: the queue does not exist.
                    Err(_) => counts.push((queue, None)),
                }
            }
            Ok(counts)
        };
        match tokio::time::timeout(QUEUE_SCRAPE_TIMEOUT, ask_all).await {
            Ok(answer) => answer,
            Err(_) => {
                link.take();
                Err(format!(
                    "RabbitMQ did not answer within {QUEUE_SCRAPE_TIMEOUT:?}"
                ))
            }
        }
    }

    /// Each agent's breaker as its gauge shows it (0 closed, 1 half-open, 2 open); absent when
    /// Postgres did not answer in time.
    async fn breaker_states(&self) -> Option<Vec<(String, i64)>> {
        let read = async {
            let client = self.store.client().await?;
            breakers::list(&client).await
        };
        match tokio::time::timeout(CHECK_TIMEOUT, read).await {
            Ok(Ok(list)) => Some(
                list.into_iter()
                    .map(|b| {
                        let gauge = match b.breaker.state {
                            BreakerState::Closed => 0,
                            BreakerState::HalfOpen => 1,
                            BreakerState::Open => 2,
                        };
                        (b.agent, gauge)
                    })
                    .collect(),
            ),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the circuit breakers");
                None
            }
            Err(_) => {
                tracing::warn!(timeout = ?CHECK_TIMEOUT, "the circuit breakers took too long to read");
                None
            }
        }
    }

    /// The outbox backlog, the active runs and how long the oldest attempt not yet started has
    /// waited by agent, all absent when Postgres did not answer in time.
    async fn counts(&self) -> Option<Counts> {
        let count = async {
            let client = self.store.client().await?;
            let now = chrono::Utc::now();
            Ok::<_, flotilla_store::Error>(Counts {
                backlog: outbox::backlog(&client).await?,
                active: queries::active_runs(&client).await?,
                oldest: registry::queued(&client)
                    .await?
                    .into_iter()
                    .map(|q| (q.agent, (now - q.oldest).to_std().unwrap_or_default()))
                    .collect(),
            })
        };
        match tokio::time::timeout(CHECK_TIMEOUT, count).await {
            Ok(Ok(counts)) => Some(counts),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the outbox backlog, active runs and queued attempts");
                None
            }
            Err(_) => {
                tracing::warn!(timeout = ?CHECK_TIMEOUT, "the outbox backlog, active runs and queued attempts took too long to read");
                None
            }
        }
    }
}

impl Probe for CoordinatorProbe {
    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    async fn checks(&self) -> Vec<HealthCheck> {
        let (postgres, rabbitmq) = tokio::join!(self.check_postgres(), self.check_rabbitmq());
        vec![
            postgres,
            rabbitmq,
            // `run` applies them before it serves anything, this route included.
            HealthCheck::ok("migrations", "applied at start-up"),
        ]
    }

    async fn metrics(&self) -> String {
        let mut link = self.link.lock().await;
        let (counts, breaker_states, depths) = tokio::join!(
            self.counts(),
            self.breaker_states(),
            self.timed_queue_depths(&mut link, self.metrics.known_agents()),
        );
        self.metrics
            .set_outbox_backlog(counts.as_ref().map(|c| c.backlog));
        self.metrics
            .set_active_runs(counts.as_ref().map(|c| c.active));
        self.metrics
            .set_queue_oldest_ages(counts.as_ref().map(|c| c.oldest.as_slice()));
        self.metrics.set_queue_depths(&depths);
        self.metrics.set_breaker_states(breaker_states.as_deref());
        self.metrics.render()
    }
}
