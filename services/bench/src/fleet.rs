//! The scenarios that run a real fleet: a coordinator and echo workers, the binaries of the
//! profile the bench was built in, on a database and queue prefix of their own (the harness of
//! the end-to-end tests). Figures are read from what the fleet recorded in Postgres, so the
//! bench's polling adds nothing to them.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use flotilla_store::statistics;
use flotilla_tests::workload::{Patience, Workflow, wait_for_runs};
use flotilla_tests::{Fleet, Launch, Managed};
use futures_util::{StreamExt, stream};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio::time::Instant;
use uuid::Uuid;

use crate::machine::{CpuTimes, Spenders, peak_rss_mb, rss_mb};
use crate::{Latency, Report, Rss, Sizes};

/// The agent of the echo workers.
const AGENT: &str = "bench";
/// An agent no step uses: its worker stays idle (`memory`).
const IDLE_AGENT: &str = "bench-idle";
/// Submissions sent at once when many runs are submitted.
const SUBMITTERS: usize = 32;
/// A scenario gives up when nothing moved for this long.
const STALL: Duration = Duration::from_secs(120);
/// How long a step of `memory` sleeps: longer than the scenario.
const SLEEP_MS: u64 = 3_600_000;

/// A fleet started for one scenario.
pub struct Bench {
    fleet: Fleet,
    http: reqwest::Client,
    db: tokio_postgres::Client,
    /// Indexes of the workers that run the scenario's steps (not the idle one).
    busy_workers: Vec<usize>,
}

impl Bench {
    /// Starts a coordinator (with its default pool of 16 connections, and room for the largest
    /// definitions) and `sizes.workers` echo
    /// workers, and waits until every worker consumes. The processes' logs go to
    /// `target/bench-logs/<scenario>-<id>/`.
    pub async fn start(scenario: &str, sizes: &Sizes) -> anyhow::Result<Self> {
        let fleet = Fleet::new();
        let logs = logs_dir(scenario, &fleet.prefix);
        let mut fleet = fleet
            .log_to(logs)?
            .coordinator_env("FLOTILLA_DB_POOL_SIZE", "16")
            // A fan-out of 100,000 steps is a definition of about 8 MB.
            .coordinator_env("FLOTILLA_MAX_BODY_BYTES", &(64 << 20).to_string())
            .coordinator_env("FLOTILLA_MAX_DEFINITION_BYTES", &(64 << 20).to_string())
            .coordinator_env("FLOTILLA_MAX_STEPS", "100000");
        fleet.start_coordinator().await?;
        let db = fleet.db().await?;
        let http = fleet.http();
        let mut bench = Self {
            fleet,
            http,
            db,
            busy_workers: Vec::new(),
        };
        for i in 0..sizes.workers {
            let index = bench
                .add_worker(&format!("worker-{i}"), AGENT, sizes.concurrency)
                .await?;
            bench.busy_workers.push(index);
        }
        // One run first: connections, caches and prepared statements are warm afterwards.
        let warm_up = bench
            .execute(json!({"yaml": Workflow::chain("bench-warm-up", AGENT, 2, |_| 0).yaml()}))
            .await?;
        bench.wait(&[warm_up]).await?;
        Ok(bench)
    }

    /// Starts an echo worker serving `agent` and waits until its `/health/ready` answers 200
    /// (connected and consuming). Returns its index.
    async fn add_worker(
        &mut self,
        id: &str,
        agent: &str,
        concurrency: usize,
    ) -> anyhow::Result<usize> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let launch = Launch::once().env("FLOTILLA_METRICS_PORT", &port.to_string());
        let index = self.fleet.start_worker(id, &[agent], concurrency, launch)?;
        let url = format!("http://127.0.0.1:{port}/health/ready");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self
                .http
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(index);
            }
            let state = self.fleet.worker(index).state();
            ensure!(!state.finished, "worker {id} exited at start");
            ensure!(
                Instant::now() < deadline,
                "worker {id} was not ready within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `POST /api/workflows/execute` with `body`; the new run's id.
    async fn execute(&self, body: Value) -> anyhow::Result<Uuid> {
        submit(&self.http, &self.fleet.url(), &body).await
    }

    /// Registers the definition `workflow` (`POST /api/definitions`).
    async fn register(&self, workflow: &Workflow) -> anyhow::Result<()> {
        let response = self
            .http
            .post(format!("{}/api/definitions", self.fleet.url()))
            .json(&json!({"yaml": workflow.yaml()}))
            .send()
            .await?;
        let status = response.status();
        ensure!(
            status.is_success(),
            "registering a definition answered {status}: {}",
            response.text().await.unwrap_or_default()
        );
        Ok(())
    }

    /// Submits `count` runs of the registered definition `name`, [`SUBMITTERS`] at a time.
    async fn execute_many(&self, name: &str, count: usize) -> anyhow::Result<Vec<Uuid>> {
        let url = self.fleet.url();
        let body = json!({"workflow": name});
        stream::iter(0..count)
            .map(|_| submit(&self.http, &url, &body))
            .buffer_unordered(SUBMITTERS)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    /// Waits until every run of `runs` has ended, and checks that each one succeeded.
    async fn wait(&self, runs: &[Uuid]) -> anyhow::Result<()> {
        let patience = Patience {
            deadline: Duration::from_secs(3600),
            stall: STALL,
        };
        let waited = wait_for_runs(&self.fleet, runs, patience).await;
        if let Some(why) = waited.gave_up {
            bail!("the runs did not end: {why}");
        }
        let failed: i64 = self
            .db
            .query_one(
                "SELECT count(*) FROM runs WHERE id = ANY($1) AND status <> 'success'",
                &[&runs],
            )
            .await?
            .get(0);
        ensure!(
            failed == 0,
            "{failed} of {} runs did not succeed",
            runs.len()
        );
        Ok(())
    }

    /// From the first run's creation to the last run's end, as recorded.
    async fn span(&self, runs: &[Uuid]) -> anyhow::Result<Duration> {
        let row = self
            .db
            .query_one(
                "SELECT extract(epoch FROM max(ended_at) - min(created_at))::float8
                 FROM runs WHERE id = ANY($1)",
                &[&runs],
            )
            .await?;
        seconds(row.get(0))
    }

    /// The machine's CPU time from `start` to now, split among the fleet's processes, the
    /// servers and the rest, per unit of the `n` done (see [`CpuTimes::since`]).
    fn cpu_since(&self, start: &CpuTimes, n: usize) -> Value {
        let coordinators: Vec<u32> = (0..self.fleet.coordinator_count())
            .filter_map(|i| pid(self.fleet.coordinator(i)))
            .collect();
        let workers: Vec<u32> = self.fleet.workers().iter().filter_map(pid).collect();
        CpuTimes::read().since(
            start,
            &Spenders {
                coordinators: &coordinators,
                workers: &workers,
            },
            n,
        )
    }

    /// Peak resident memory of the coordinator and the workers so far.
    fn rss(&self) -> Rss {
        Rss {
            coordinator_mb: pid(self.fleet.coordinator(0)).and_then(peak_rss_mb),
            workers_mb: self
                .fleet
                .workers()
                .iter()
                .filter_map(|w| pid(w).and_then(peak_rss_mb))
                .collect(),
        }
    }

    /// Stops the processes, then reads what the fleet wrote to each table over its whole life
    /// (warm-up included), drops the database and deletes the queues.
    pub async fn stop(mut self) -> anyhow::Result<Value> {
        self.fleet.shutdown().await;
        let written = self.rows_written().await;
        self.fleet.cleanup().await?;
        written
    }

    /// Rows inserted, updated (of which HOT: without touching indexes) and deleted per table,
    /// and their sum per attempt dispatched. Read once every coordinator's connection is gone,
    /// since a server process reports its counts when it ends (or every few seconds before).
    async fn rows_written(&self) -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let others: i64 = self
                .db
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    &[],
                )
                .await?
                .get(0);
            if others == 0 {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{others} connections to the fleet's database outlived its processes"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let attempts: i64 = self
            .db
            .query_one("SELECT count(*) FROM attempts", &[])
            .await?
            .get(0);
        let rows = self
            .db
            .query(
                "SELECT relname::text, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del
                 FROM pg_stat_user_tables WHERE n_tup_ins + n_tup_upd + n_tup_del > 0
                 ORDER BY relname",
                &[],
            )
            .await?;
        let mut tables = serde_json::Map::new();
        let mut total = 0i64;
        for row in &rows {
            let (inserted, updated, hot, deleted): (i64, i64, i64, i64) =
                (row.get(1), row.get(2), row.get(3), row.get(4));
            total += inserted + updated + deleted;
            tables.insert(
                row.get(0),
                json!({"inserted": inserted, "updated": updated, "hot_updated": hot, "deleted": deleted}),
            );
        }
        Ok(json!({
            "tables": tables,
            "attempts": attempts,
            "per_attempt": (attempts > 0).then(|| total as f64 / attempts as f64),
        }))
    }
}

fn pid(process: &Managed) -> Option<u32> {
    process.state().pid
}

fn seconds(value: Option<f64>) -> anyhow::Result<Duration> {
    let value = value.context("no timestamps recorded")?;
    Ok(Duration::from_secs_f64(value.max(0.0)))
}

fn logs_dir(scenario: &str, prefix: &str) -> PathBuf {
    flotilla_tests::target_dir()
        .join("bench-logs")
        .join(format!("{scenario}-{prefix}"))
}

async fn submit(http: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<Uuid> {
    let response = http
        .post(format!("{url}/api/workflows/execute"))
        .json(body)
        .timeout(Duration::from_secs(120))
        .send()
        .await?;
    let status = response.status();
    let answer: Value = response.json().await?;
    ensure!(
        status.as_u16() == 202,
        "execute answered {status}: {answer}"
    );
    Ok(answer["workflowId"]
        .as_str()
        .context("workflowId in the answer")?
        .parse()?)
}

/// Runs `scenario` on a fleet started for it, and stops the fleet whatever the outcome.
pub async fn with_bench<F>(name: &str, sizes: &Sizes, scenario: F) -> anyhow::Result<Vec<Report>>
where
    F: AsyncFnOnce(&mut Bench) -> anyhow::Result<Vec<Report>>,
{
    let mut bench = Bench::start(name, sizes).await?;
    let outcome = scenario(&mut bench).await;
    let written = bench.stop().await;
    let mut reports = outcome?;
    let written = written?;
    // The seeded history would swamp what the fleet itself wrote.
    if name != "history" {
        for report in &mut reports {
            report.details["rows_written"] = written.clone();
        }
    }
    Ok(reports)
}

/// `fanout`: one run of `steps` no-op steps in all: `steps - 1` independent ones and one that
/// waits for all of them (so that 100,000, the most a definition may have, can be measured).
pub async fn fanout(bench: &mut Bench, scenario: &str, steps: usize) -> anyhow::Result<Report> {
    let leaves = steps.saturating_sub(1).max(1);
    let all: Vec<String> = (0..leaves).map(|i| format!("s{i}")).collect();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let workflow = Workflow::fan_out("bench-fanout", AGENT, leaves, |_| 0).step(
        "join",
        AGENT,
        Some(&all),
        json!({}),
    );
    let cpu = CpuTimes::read();
    let run = bench.execute(json!({"yaml": workflow.yaml()})).await?;
    bench.wait(&[run]).await?;
    let cpu = bench.cpu_since(&cpu, steps);
    let elapsed = bench.span(&[run]).await?;
    let recorded = Recorded::read(&bench.db, run).await?;
    let latencies = recorded
        .attempts
        .iter()
        .filter_map(|a| {
            let ended = recorded.ended.get(&a.idx).copied().flatten()?;
            Some(between(a.dispatched, ended))
        })
        .collect();
    let mut report = Report::new(scenario, steps, "steps", elapsed)
        .latency(Latency::of(
            "a step: dispatched to ended, as recorded",
            latencies,
        ))
        .details(json!({"join_steps": 1, "cpu": cpu}))
        .rss(bench.rss());
    report.step_rate = Some(report.throughput);
    Ok(report)
}

/// How long each step of `scaling` waits: an I/O-bound step, which the workers' slots bound.
const SCALING_SLEEP_MS: u64 = 20;
/// The worker processes `scaling` measures with, in order.
const SCALING_WORKERS: [usize; 3] = [1, 2, 4];

/// `scaling`: the same run of `steps` independent I/O-bound steps (echo `sleep_ms: 20`) with 1,
/// then 2, then 4 worker processes of `sizes.concurrency` slots each; one report per count,
/// each with its speed-up over one worker. The fleet starts with one worker (the bench's
/// sizes) and gets the others added between runs.
pub async fn scaling(
    bench: &mut Bench,
    steps: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Report>> {
    let workflow = Workflow::fan_out("bench-scaling", AGENT, steps, |_| SCALING_SLEEP_MS);
    let mut reports: Vec<Report> = Vec::new();
    for workers in SCALING_WORKERS {
        while bench.busy_workers.len() < workers {
            let id = format!("worker-{}", bench.busy_workers.len());
            let index = bench.add_worker(&id, AGENT, concurrency).await?;
            bench.busy_workers.push(index);
        }
        let run = bench.execute(json!({"yaml": workflow.yaml()})).await?;
        bench.wait(&[run]).await?;
        let elapsed = bench.span(&[run]).await?;
        let mut report = Report::new(&format!("scaling-{workers}"), steps, "steps", elapsed);
        report.step_rate = Some(report.throughput);
        // The run's dispatch (one transaction and N publishes before any worker starts) is the
        // coordinator's and the same for every worker count: the workers' own rate is taken from
        // the first attempt's start to the last one's end.
        let row = bench
            .db
            .query_one(
                "SELECT extract(epoch FROM max(finished_at) - min(started_at))::float8
                 FROM attempts WHERE run_id = $1",
                &[&run],
            )
            .await?;
        let working = seconds(row.get(0))?.as_secs_f64();
        let working_rate = steps as f64 / working;
        let first = reports.first();
        let speedup = report.throughput / first.map_or(report.throughput, |r| r.throughput);
        let working_speedup = working_rate
            / first
                .and_then(|r| r.details["working_rate"].as_f64())
                .unwrap_or(working_rate);
        report = report
            .details(json!({
                "workers": workers,
                "concurrency": concurrency,
                "sleep_ms": SCALING_SLEEP_MS,
                "speedup_vs_1_worker": speedup,
                "working_s": working,
                "working_rate": working_rate,
                "working_speedup_vs_1_worker": working_speedup,
            }))
            .rss(bench.rss());
        reports.push(report);
    }
    Ok(reports)
}

/// `chain`: one run of `hops` steps, each starting when the one before has ended.
pub async fn chain(bench: &mut Bench, scenario: &str, hops: usize) -> anyhow::Result<Report> {
    let workflow = Workflow::chain("bench-chain", AGENT, hops, |_| 0);
    let cpu = CpuTimes::read();
    let run = bench.execute(json!({"yaml": workflow.yaml()})).await?;
    bench.wait(&[run]).await?;
    let cpu = bench.cpu_since(&cpu, hops);
    let elapsed = bench.span(&[run]).await?;
    // The run's creation, then each step's end in order: a hop is the time between two of them.
    let created: f64 = bench
        .db
        .query_one(
            "SELECT extract(epoch FROM created_at)::float8 FROM runs WHERE id = $1",
            &[&run],
        )
        .await?
        .get(0);
    let recorded = Recorded::read(&bench.db, run).await?;
    let ends: Vec<f64> = std::iter::once(Some(created))
        .chain(recorded.ended.values().copied())
        .collect::<Option<_>>()
        .context("a step of the chain has no end recorded")?;
    let hops_taken: Vec<Duration> = ends
        .windows(2)
        .map(|pair| between(pair[0], pair[1]))
        .collect();
    Ok(Report::new(scenario, hops, "hops", elapsed)
        .latency(Latency::of(
            "one hop: a step's end to the next step's end (the first from the submission)",
            hops_taken,
        ))
        .details(json!({"hop_parts": hop_parts(&recorded), "cpu": cpu}))
        .rss(bench.rss()))
}

/// Where a chain's hops go, from its stored first attempts (the worker's clock is the
/// coordinator's here): `result` is a step's end at its worker to the batch that records it
/// (which dispatches the next step), `task` is that dispatch to the next step's start at its
/// worker (commit, outbox publish, delivery), `run` is the step's own run time at its worker.
fn hop_parts(recorded: &Recorded) -> Value {
    let first: Vec<&AttemptTimes> = recorded
        .attempts
        .iter()
        .filter(|a| a.attempt == 1)
        .collect();
    let result = first
        .windows(2)
        .filter(|pair| pair[1].idx == pair[0].idx + 1)
        .filter_map(|pair| Some(between(pair[0].finished?, pair[1].dispatched)))
        .collect();
    let task = first
        .iter()
        .filter_map(|a| Some(between(a.dispatched, a.started?)))
        .collect();
    let run_time = first
        .iter()
        .filter_map(|a| Some(between(a.started?, a.finished?)))
        .collect();
    json!({
        "result": Latency::of("a step's end at its worker to the batch that records it", result),
        "task": Latency::of("a dispatch to the step's start at its worker", task),
        "run": Latency::of("a step's run time at its worker", run_time),
    })
}

/// The times one run's attempts and steps recorded (seconds since the epoch), each table read
/// with one range scan of its primary key and joined here: a join in SQL is planned on
/// statistics taken before the run existed, and on a young database Postgres chose a nested
/// loop that read the run's 10,000 attempts once per step (28 s, counted as the run's work).
struct Recorded {
    /// In the order of step index, then attempt.
    attempts: Vec<AttemptTimes>,
    /// When each step ended, by step index.
    ended: BTreeMap<usize, Option<f64>>,
}

struct AttemptTimes {
    idx: usize,
    attempt: i32,
    dispatched: f64,
    started: Option<f64>,
    finished: Option<f64>,
}

impl Recorded {
    async fn read(db: &tokio_postgres::Client, run: Uuid) -> anyhow::Result<Self> {
        let attempts = db
            .query(
                "SELECT idx, attempt, extract(epoch FROM dispatched_at)::float8,
                        extract(epoch FROM started_at)::float8,
                        extract(epoch FROM finished_at)::float8
                 FROM attempts WHERE run_id = $1 ORDER BY idx, attempt",
                &[&run],
            )
            .await?
            .iter()
            .map(|r| {
                Ok(AttemptTimes {
                    idx: usize::try_from(r.get::<_, i32>(0))?,
                    attempt: r.get(1),
                    dispatched: r.get(2),
                    started: r.get(3),
                    finished: r.get(4),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let ended = db
            .query(
                "SELECT idx, extract(epoch FROM ended_at)::float8 FROM steps WHERE run_id = $1",
                &[&run],
            )
            .await?
            .iter()
            .map(|r| Ok((usize::try_from(r.get::<_, i32>(0))?, r.get(1))))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { attempts, ended })
    }
}

/// The time from `start` to `end` (seconds since the epoch); zero if the clocks disagree.
fn between(start: f64, end: f64) -> Duration {
    Duration::from_secs_f64((end - start).max(0.0))
}

/// `many-runs`: `runs` runs of a registered 3-step chain, submitted at once.
pub async fn many_runs(bench: &mut Bench, runs: usize) -> anyhow::Result<Report> {
    let workflow = Workflow::chain("bench-three", AGENT, 3, |_| 0);
    bench.register(&workflow).await?;
    let cpu = CpuTimes::read();
    let submitted = Instant::now();
    let ids = bench.execute_many("bench-three", runs).await?;
    let submit_elapsed = submitted.elapsed();
    bench.wait(&ids).await?;
    let cpu = bench.cpu_since(&cpu, runs);
    let elapsed = bench.span(&ids).await?;
    let latencies = durations(
        &bench.db,
        "SELECT extract(epoch FROM ended_at - created_at)::float8 FROM runs WHERE id = ANY($1)",
        ids,
    )
    .await?;
    let mut report = Report::new("many-runs", runs, "runs", elapsed)
        .latency(Latency::of("a run: created to ended", latencies))
        .details(json!({
            "steps_per_run": 3,
            "submitters": SUBMITTERS,
            "submitted_per_s": runs as f64 / submit_elapsed.as_secs_f64(),
            "cpu": cpu,
        }))
        .rss(bench.rss());
    report.step_rate = Some(report.throughput * 3.0);
    Ok(report)
}

/// `submit-latency`: `POST /api/workflows/execute` of a registered one-step definition at a
/// fixed rate, open loop: each request is sent at its scheduled time whatever the answers before
/// it, and timed from that time, so a slow answer delays no later measurement.
pub async fn submit_latency(bench: &mut Bench, sizes: &Sizes) -> anyhow::Result<Report> {
    let workflow = Workflow::chain("bench-one", AGENT, 1, |_| 0);
    bench.register(&workflow).await?;
    let requests = usize::try_from(sizes.submit_rate * sizes.submit_seconds)?;
    let interval = Duration::from_secs_f64(1.0 / sizes.submit_rate.max(1) as f64);
    let body = json!({"workflow": "bench-one"});
    let url = bench.fleet.url();
    let cpu = CpuTimes::read();
    let started = Instant::now();
    let mut pending = JoinSet::new();
    for i in 0..requests {
        let due = started + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due).await;
        let http = bench.http.clone();
        let url = url.clone();
        let body = body.clone();
        pending.spawn(async move {
            submit(&http, &url, &body).await?;
            anyhow::Ok(due.elapsed())
        });
    }
    let mut latencies = Vec::with_capacity(requests);
    while let Some(answered) = pending.join_next().await {
        latencies.push(answered??);
    }
    let elapsed = started.elapsed();
    let cpu = bench.cpu_since(&cpu, requests);
    Ok(Report::new("submit-latency", requests, "requests", elapsed)
        .latency(Latency::of(
            "POST /api/workflows/execute: scheduled send to 202",
            latencies,
        ))
        .details(json!({"rate_per_s": sizes.submit_rate, "cpu": cpu}))
        .rss(bench.rss()))
}

/// `memory`: `runs` runs whose one step sleeps for an hour, all in flight at once; the
/// coordinator's memory once every step is dispatched, and that of a worker with nothing to do.
pub async fn memory(bench: &mut Bench, runs: usize) -> anyhow::Result<Report> {
    let idle = bench.add_worker("worker-idle", IDLE_AGENT, 16).await?;
    let workflow =
        Workflow::new("bench-sleep").step("sleep", AGENT, None, json!({"sleep_ms": SLEEP_MS}));
    bench.register(&workflow).await?;
    let submitted = Instant::now();
    let ids = bench.execute_many("bench-sleep", runs).await?;
    let submit_elapsed = submitted.elapsed();
    let expected = i64::try_from(runs)?;
    let deadline = Instant::now() + STALL;
    loop {
        let dispatched: i64 = bench
            .db
            .query_one(
                "SELECT count(*) FROM attempts WHERE run_id = ANY($1)",
                &[&ids],
            )
            .await?
            .get(0);
        if dispatched >= expected {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "only {dispatched} of {runs} steps were dispatched within {STALL:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let coordinator = pid(bench.fleet.coordinator(0));
    let idle_worker = pid(bench.fleet.worker(idle));
    let report = Report::new("memory", runs, "runs", submit_elapsed)
        .details(json!({
            "coordinator_rss_mb": coordinator.and_then(rss_mb),
            "idle_worker_rss_mb": idle_worker.and_then(rss_mb),
            "idle_worker_peak_rss_mb": idle_worker.and_then(peak_rss_mb),
            "step_sleep_ms": SLEEP_MS,
        }))
        .rss(bench.rss());
    // Their steps would sleep for an hour: the workers are not asked to drain.
    for &i in &bench.busy_workers {
        bench.fleet.worker(i).kill().await?;
    }
    Ok(report)
}

/// `history`: `fanout` and `chain`, each `repeats` times (taking turns) on the same fleet, then
/// as often again after seeding `steps` finished steps (runs of 10). A line is the measurement of
/// median throughput after the seeding; the ratio is of the medians, and every measurement is
/// in `details`, so that a difference can be told from the host's noise.
pub async fn history(bench: &mut Bench, sizes: &Sizes) -> anyhow::Result<Vec<Report>> {
    let tables = Tables::list(&bench.db).await?;
    let autovacuum = statistics::statistics(&bench.db).await?.autovacuum;
    let before = history_rounds(bench, sizes, &tables).await?;
    let seeding = Instant::now();
    let flushed = seed_history(&bench.db, sizes.history_steps).await?;
    let seed_s = seeding.elapsed().as_secs_f64();
    let after = history_rounds(bench, sizes, &tables).await?;
    let mut reports = Vec::new();
    for (before, after) in before.into_iter().zip(after) {
        let mut details = json!({
            "seeded_steps": sizes.history_steps,
            "seed_s": seed_s,
            "checkpointed": flushed,
            "autovacuum": autovacuum,
            "without_history": figures(&before),
            "with_history": figures(&after),
        });
        details["blocks_per_step_vs_without"] =
            json!(median_blocks_per_step(&after) / median_blocks_per_step(&before));
        let without = median(before);
        let mut report = median(after);
        details["throughput_vs_without"] = json!(report.throughput / without.throughput);
        report.details["history"] = details;
        reports.push(report);
    }
    Ok(reports)
}

/// `repeats` fan-outs and chains, taking turns (fan-out, chain, fan-out, …), as [fan-outs,
/// chains], each with the Postgres work it took (see [`counted`]).
async fn history_rounds(
    bench: &mut Bench,
    sizes: &Sizes,
    tables: &Tables,
) -> anyhow::Result<[Vec<Report>; 2]> {
    let (mut fanouts, mut chains) = (Vec::new(), Vec::new());
    for _ in 0..sizes.history_repeats.max(1) {
        let fanout = async |b: &mut Bench| fanout(b, "history-fanout", sizes.steps).await;
        fanouts.push(counted(bench, tables, fanout).await?);
        let chain = async |b: &mut Bench| chain(b, "history-chain", sizes.chain).await;
        chains.push(counted(bench, tables, chain).await?);
    }
    Ok([fanouts, chains])
}

/// The report of `measure`, with the Postgres work it took in `details.postgres`. Where the
/// server's autovacuum is off, the engine's tables it would have analyzed by now are vacuumed
/// and analyzed first: else the statements are planned on statistics of tables a fraction of
/// their size, and the measurement is of that (see `flotilla doctor`'s statistics check).
async fn counted<F>(bench: &mut Bench, tables: &Tables, measure: F) -> anyhow::Result<Report>
where
    F: AsyncFnOnce(&mut Bench) -> anyhow::Result<Report>,
{
    let stats = statistics::statistics(&bench.db).await?;
    if !stats.autovacuum {
        for table in &stats.stale {
            bench
                .db
                .batch_execute(&format!("VACUUM (ANALYZE) {table}"))
                .await?;
        }
    }
    // The bench's own statements (the seeding, the vacuum) are not the measurement's.
    bench
        .db
        .batch_execute("SELECT pg_stat_force_next_flush()")
        .await?;
    let start = PostgresWork::read(&bench.db, tables).await?;
    let mut report = measure(bench).await?;
    let end = PostgresWork::settled(&bench.db, tables, &start).await?;
    report.details["postgres"] = end.since(&start, report.n, tables);
    Ok(report)
}

/// The database's tables and their indexes, the system catalogs' too (planning reads them),
/// listed once: listing them scans the catalog, which would count as rows read.
struct Tables {
    oids: Vec<u32>,
    names: Vec<String>,
    /// Every index, beside the table it belongs to.
    indexes: Vec<u32>,
    owners: Vec<u32>,
}

impl Tables {
    async fn list(db: &tokio_postgres::Client) -> anyhow::Result<Self> {
        let tables = db
            .query(
                "SELECT relid, CASE WHEN schemaname = 'public' THEN relname::text
                                    ELSE schemaname || '.' || relname END
                 FROM pg_stat_all_tables ORDER BY 2",
                &[],
            )
            .await?;
        let indexes = db
            .query("SELECT indexrelid, relid FROM pg_stat_all_indexes", &[])
            .await?;
        Ok(Self {
            oids: tables.iter().map(|r| r.get(0)).collect(),
            names: tables.iter().map(|r| r.get(1)).collect(),
            indexes: indexes.iter().map(|r| r.get(0)).collect(),
            owners: indexes.iter().map(|r| r.get(1)).collect(),
        })
    }
}

/// What Postgres did in the fleet's database so far (`pg_stat_database` and the tables'
/// counters): work counted rather than timed, so that `history` can tell a cost per step that
/// grows with the history (more blocks or rows read per step) from the host's noise, and name
/// the table that grows it. The fleet's idle work (timers, heartbeats) adds a few dozen blocks
/// a second.
struct PostgresWork {
    /// Table and index blocks read, from Postgres's cache or from the disk.
    blocks: i64,
    /// Rows returned by scans (every row a sequential scan passes) and fetched by index scans.
    rows: i64,
    /// Per table (in the order of [`Tables`]): rows its sequential scans passed, index entries
    /// its index scans read, and blocks of the table and its indexes read.
    sequential: Vec<i64>,
    indexed: Vec<i64>,
    table_blocks: Vec<i64>,
    /// Autovacuum and autoanalyze passes over the tables.
    autovacuums: i64,
    /// Sessions opened on the database: a new backend reads the catalogs to fill its caches.
    sessions: i64,
    /// Whether the backends had reported the work measured (see [`PostgresWork::settled`]).
    settled: bool,
}

impl PostgresWork {
    /// The counters as every backend has reported them so far.
    async fn read(db: &tokio_postgres::Client, tables: &Tables) -> anyhow::Result<Self> {
        // Outside a transaction block, so each reading is a fresh snapshot of the statistics.
        let row = db
            .query_one(
                "SELECT d.blks_hit + d.blks_read, d.tup_returned + d.tup_fetched, d.sessions,
                        t.autovacuums, t.sequential, t.indexed, t.blocks
                 FROM pg_stat_database d,
                      LATERAL (
                          SELECT coalesce(sum(pg_stat_get_autovacuum_count(x.t)
                                              + pg_stat_get_autoanalyze_count(x.t)), 0)::int8
                                     AS autovacuums,
                                 coalesce(array_agg(pg_stat_get_tuples_returned(x.t)
                                                    ORDER BY x.n), '{}') AS sequential,
                                 coalesce(array_agg(i.entries ORDER BY x.n), '{}') AS indexed,
                                 coalesce(array_agg(pg_stat_get_blocks_fetched(x.t) + i.blocks
                                                    ORDER BY x.n), '{}') AS blocks
                          FROM unnest($1::oid[]) WITH ORDINALITY AS x(t, n),
                               LATERAL (
                                   SELECT coalesce(sum(pg_stat_get_tuples_returned(y.i)), 0)::int8
                                              AS entries,
                                          coalesce(sum(pg_stat_get_blocks_fetched(y.i)), 0)::int8
                                              AS blocks
                                   FROM unnest($2::oid[], $3::oid[]) AS y(i, owner)
                                   WHERE y.owner = x.t) i) t
                 WHERE d.datname = current_database()",
                &[&tables.oids, &tables.indexes, &tables.owners],
            )
            .await?;
        Ok(Self {
            blocks: row.get(0),
            rows: row.get(1),
            sessions: row.get(2),
            autovacuums: row.get(3),
            sequential: row.get(4),
            indexed: row.get(5),
            table_blocks: row.get(6),
            settled: true,
        })
    }

    /// The counters once the backends have reported the work since `start`: a backend reports
    /// at most once a second, so they are read every second until one adds less than 2 % of
    /// the blocks counted since `start` (at most 30 times; `settled` says whether it came to
    /// that).
    async fn settled(
        db: &tokio_postgres::Client,
        tables: &Tables,
        start: &Self,
    ) -> anyhow::Result<Self> {
        let mut last = Self::read(db, tables).await?;
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = Self::read(db, tables).await?;
            if (now.blocks - last.blocks) * 50 < now.blocks - start.blocks {
                return Ok(now);
            }
            last = now;
        }
        Ok(Self {
            settled: false,
            ..last
        })
    }

    /// The work from `start` to `self`, per step of the `steps` measured in between; by table
    /// for the tables with at least one row or block read per step.
    fn since(&self, start: &Self, steps: usize, tables: &Tables) -> Value {
        let per_step = |end: i64, start: i64| (end - start) as f64 / steps.max(1) as f64;
        let mut by_table = serde_json::Map::new();
        for (i, name) in tables.names.iter().enumerate() {
            let sequential = per_step(self.sequential[i], start.sequential[i]);
            let indexed = per_step(self.indexed[i], start.indexed[i]);
            let blocks = per_step(self.table_blocks[i], start.table_blocks[i]);
            if sequential + indexed >= 1.0 || blocks >= 1.0 {
                by_table.insert(
                    name.clone(),
                    json!({"sequential_rows": sequential, "index_entries": indexed, "blocks": blocks}),
                );
            }
        }
        json!({
            "blocks_per_step": per_step(self.blocks, start.blocks),
            "rows_per_step": per_step(self.rows, start.rows),
            "per_step_by_table": by_table,
            "autovacuums": self.autovacuums - start.autovacuums,
            "sessions_opened": self.sessions - start.sessions,
            "settled": self.settled,
        })
    }
}

/// Each report's throughput, median latency and Postgres work per step, in the order measured.
fn figures(reports: &[Report]) -> Vec<Value> {
    reports
        .iter()
        .map(|r| {
            json!({
                "throughput": r.throughput,
                "latency_p50": r.latency.as_ref().map(|l| l.p50),
                "postgres": r.details["postgres"],
            })
        })
        .collect()
}

/// The report of median throughput (the upper one of an even count); there is at least one.
fn median(mut reports: Vec<Report>) -> Report {
    reports.sort_by(|a, b| a.throughput.total_cmp(&b.throughput));
    reports.swap_remove(reports.len() / 2)
}

/// The median of the reports' Postgres blocks read per step (the upper one of an even count).
fn median_blocks_per_step(reports: &[Report]) -> f64 {
    let mut blocks: Vec<f64> = reports
        .iter()
        .filter_map(|r| r.details["postgres"]["blocks_per_step"].as_f64())
        .collect();
    blocks.sort_by(f64::total_cmp);
    blocks.get(blocks.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Steps per seeded run.
const SEEDED_STEPS_PER_RUN: usize = 10;

/// Inserts `steps` finished steps with their runs and attempts in a few bulk statements, then
/// vacuums and analyzes them and writes them out with a checkpoint, as autovacuum and the
/// checkpointer would have done while such a history grew: left to them, the bulk insert's
/// vacuum and checkpoint would run during the measurement instead. Answers whether the
/// checkpoint ran (it needs a superuser or `pg_checkpoint`).
async fn seed_history(db: &tokio_postgres::Client, steps: usize) -> anyhow::Result<bool> {
    let runs = i64::try_from(steps.div_ceil(SEEDED_STEPS_PER_RUN))?;
    let per_run = i32::try_from(SEEDED_STEPS_PER_RUN)?;
    db.batch_execute(
        "CREATE TEMP TABLE seed_runs (id uuid PRIMARY KEY, n bigint NOT NULL);
         INSERT INTO definition_contents (hash, body) VALUES ('bench-history', '{}')
         ON CONFLICT DO NOTHING;",
    )
    .await?;
    db.execute(
        "INSERT INTO seed_runs SELECT gen_random_uuid(), n FROM generate_series(1, $1::int8) n",
        &[&runs],
    )
    .await?;
    db.batch_execute(
        "INSERT INTO runs (id, name, definition_hash, status, params, version, created_at, ended_at)
         SELECT id, 'bench-history', 'bench-history', 'success', '{}', 1,
                now() - make_interval(secs => n), now() - make_interval(secs => n) + interval '1 second'
         FROM seed_runs;",
    )
    .await?;
    db.execute(
        "INSERT INTO steps (run_id, idx, step_id, agent, action, status, attempt, task_id,
                            started_at, ended_at, output)
         SELECT r.id, i, 's' || i, 'bench', 'work', 'success', 1, gen_random_uuid(),
                now() - make_interval(secs => r.n), now() - make_interval(secs => r.n), '{}'
         FROM seed_runs r, generate_series(0, $1::int4 - 1) i",
        &[&per_run],
    )
    .await?;
    db.batch_execute(
        "INSERT INTO attempts (run_id, idx, attempt, task_id, status, dispatched_at, started_at,
                               finished_at, worker)
         SELECT s.run_id, s.idx, 1, s.task_id, 'success', s.started_at, s.started_at, s.ended_at,
                'seed'
         FROM steps s JOIN seed_runs r ON r.id = s.run_id;
         DROP TABLE seed_runs;",
    )
    .await?;
    // Not in a transaction block, so a statement of its own.
    db.batch_execute("VACUUM (ANALYZE)").await?;
    Ok(match db.batch_execute("CHECKPOINT").await {
        Ok(()) => true,
        Err(error) => {
            eprintln!(
                "history: no checkpoint after seeding ({error}); the measurement may pay for it"
            );
            false
        }
    })
}

/// The durations (seconds as `float8`) selected by `query` with the one parameter `param`.
async fn durations<P>(
    db: &tokio_postgres::Client,
    query: &str,
    param: P,
) -> anyhow::Result<Vec<Duration>>
where
    P: tokio_postgres::types::ToSql + Sync,
{
    let rows = db.query(query, &[&param]).await?;
    Ok(rows
        .iter()
        .filter_map(|row| row.get::<_, Option<f64>>(0))
        .map(|s| Duration::from_secs_f64(s.max(0.0)))
        .collect())
}
