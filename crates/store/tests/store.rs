//! The store against the real Postgres; each test works in a database of its own.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_core::{Definition, Event, Plan, RunState, RunStatus, StepStatus};
use flotilla_store::engine::{
    self as db, AttemptStart, Batch, NewRun, OutboxRow, RunUpdate, StepIdent, StepRow,
};
use flotilla_store::registry::{self, Announcement, Sighting};
use flotilla_store::{
    Store, StoreConfig, dead_letters, definitions, idempotency, logs, outbox, queries, schedules,
    statistics,
};
use serde_json::{Map, json};
use uuid::Uuid;

struct TestDb {
    name: String,
    store: Store,
}

fn server() -> String {
    std::env::var("FLOTILLA_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

fn config(name: &str) -> StoreConfig {
    StoreConfig {
        url: format!("{}/{name}", server()),
        pool_size: 4,
        connect_timeout: Duration::from_secs(5),
    }
}

impl TestDb {
    async fn new() -> anyhow::Result<Self> {
        let name = format!(
            "flotilla_store_{}",
            &Uuid::new_v4().simple().to_string()[..16]
        );
        let store = Store::open(&config(&name)).await?;
        Ok(Self { name, store })
    }

    async fn drop_db(self) -> anyhow::Result<()> {
        drop(self.store);
        let (client, conn) =
            tokio_postgres::connect(&format!("{}/postgres", server()), tokio_postgres::NoTls)
                .await?;
        tokio::spawn(conn);
        client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .await?;
        Ok(())
    }
}

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
}

const TWO_STEPS: &str =
    "name: pair\nsteps:\n  - {id: a, agent: x, action: y}\n  - {id: b, agent: x, action: z}\n";

/// A batch that creates a started run of [`TWO_STEPS`], as the engine would.
fn new_run_batch() -> (Batch, RunState, Plan) {
    new_run_batch_of(TWO_STEPS)
}

/// A batch that creates a started run of `yaml`, as the engine would.
fn new_run_batch_of(yaml: &str) -> (Batch, RunState, Plan) {
    let def = Definition::from_yaml(yaml).unwrap();
    let plan = Plan::compile(&def).unwrap();
    let id = Uuid::now_v7();
    let mut state = RunState::new(id, &plan, Map::new());
    let t = state.apply(&plan, Event::Start, at(0));
    let content = definitions::Content::of(&def);
    let mut batch = Batch::default();
    batch.definitions.push((content.hash.clone(), content.body));
    batch.new_runs.push(NewRun {
        id,
        name: "pair".into(),
        definition_hash: content.hash,
        status: state.status,
        params: Map::new(),
        created_at: at(0),
        ended_at: None,
        deadline: None,
        error: None,
        subset: state.subset.clone(),
        priority: state.priority,
        parent: None,
        namespace: "default".into(),
    });
    for (i, (node, step)) in plan.nodes.iter().zip(&state.steps).enumerate() {
        batch.new_steps.push((
            StepIdent {
                step_id: node.id.clone(),
                agent: node.agent.clone(),
                action: node.action.clone(),
                lease_ms: node.heartbeat_timeout.map(|t| t.as_millis() as i32),
                workflow: None,
                start_ms: node.schedule_to_start.map(|t| t.as_millis() as i32),
                labels: None,
            },
            StepRow {
                run_id: id,
                idx: i as i32,
                state: step.clone(),
            },
        ));
    }
    for effect in t.effects {
        if let flotilla_core::Effect::Dispatch {
            step,
            attempt,
            task_id,
        } = effect
        {
            batch.attempts_started.push(AttemptStart {
                run_id: id,
                idx: step as i32,
                attempt: attempt as i32,
                task_id,
                dispatched_at: at(0),
                strike: flotilla_core::Strike::Retries,
                agent: "x".into(),
            });
            batch.outbox.push(OutboxRow {
                id: task_id,
                routing_key: "q".into(),
                kind: "task".into(),
                correlation_id: Some(task_id.to_string()),
                reply_to: Some("r".into()),
                body: b"{}".to_vec(),
                created_at: at(0),
            });
        }
    }
    (batch, state, plan)
}

#[tokio::test]
async fn a_run_keeps_the_subset_it_was_submitted_with() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let (mut batch, state, _) = new_run_batch();
    let subset = flotilla_core::Subset {
        only: vec!["a".into(), "b".into()],
        skip: vec!["b".into()],
    };
    batch.new_runs[0].subset = subset.clone();
    let (whole, other, _) = new_run_batch();
    batch.new_runs.extend(whole.new_runs);
    let client = t.store.client().await?;
    db::write(&client, &batch).await?;
    let mut loaded = db::load_runs(&client, &[state.id, other.id]).await?;
    loaded.sort_by_key(|r| r.id != state.id);
    assert_eq!(loaded[0].subset, subset);
    assert_eq!(loaded[1].subset, flotilla_core::Subset::default());
    let (record, _) = flotilla_store::queries::run(&client, None, state.id)
        .await?
        .unwrap();
    assert_eq!(record.subset, subset);
    drop(client);
    t.drop_db().await
}

/// Step `a` of a run of [`TWO_STEPS`] succeeds with `output`: the batch the engine would write.
fn first_step_succeeds(state: &mut RunState, plan: &Plan, output: serde_json::Value) -> Batch {
    let task_id = state.steps[0].task_id.unwrap();
    let t = state.apply(
        plan,
        Event::AttemptFinished {
            step: 0,
            attempt: 1,
            task_id,
            outcome: flotilla_core::Outcome::Success(output),
            worker: "w".into(),
            started_at: at(1),
            finished_at: at(2),
        },
        at(2),
    );
    let mut update = Batch::default();
    for &i in &t.changed {
        update.step_updates.push(StepRow {
            run_id: state.id,
            idx: i as i32,
            state: state.steps[i].clone(),
        });
    }
    update.run_updates.push(RunUpdate {
        id: state.id,
        status: state.status,
        ended_at: state.ended_at,
        deadline: state.deadline,
        error: state.error.clone(),
    });
    update.attempts_ended.push(db::AttemptEnd {
        task_id,
        success: true,
        started_at: at(1),
        finished_at: at(2),
        worker: "w".into(),
        error: None,
    });
    update
}

#[tokio::test]
async fn a_written_run_loads_back_the_same_and_versions_count_writes() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let (batch, mut state, plan) = new_run_batch();
    let id = state.id;
    let mut client = t.store.client().await?;
    let tx = client.transaction().await?;
    db::write(&tx, &batch).await?;
    tx.commit().await?;

    let loaded = db::load_runs(&client, &[id]).await?;
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].steps, state.steps);
    assert_eq!(
        (loaded[0].status, loaded[0].version),
        (RunStatus::Running, 0)
    );

    // Step a succeeds: the step rows change and the run's version goes up by one.
    let update = first_step_succeeds(&mut state, &plan, json!({"k": 1}));
    let tx = client.transaction().await?;
    let versions = db::lock_runs(&tx, &[id, Uuid::new_v4()]).await?;
    assert_eq!(versions.len(), 1, "an unknown run is simply absent");
    assert_eq!(versions[&id], 0);
    db::write(&tx, &update).await?;
    tx.commit().await?;

    let loaded = db::load_runs(&client, &[id]).await?;
    assert_eq!(loaded[0].version, 1);
    assert_eq!(loaded[0].steps[0].status, StepStatus::Success);
    assert_eq!(loaded[0].steps[0].output, Some(json!({"k": 1})));
    assert_eq!(loaded[0].steps[1].status, StepStatus::Running);
    assert_eq!(loaded[0].steps, state.steps);
    drop(client);
    t.drop_db().await
}

/// What the statements of an engine batch on one run read, in a transaction begun as the engine
/// begins its own (rolled back after).
#[derive(Debug, PartialEq)]
struct BatchReads {
    /// The tables read whole, with how many times.
    scanned: Vec<(String, i64)>,
    /// The rows of `steps` that writing `update` fetched by index.
    steps_fetched: i64,
}

async fn batch_reads(
    client: &mut flotilla_store::Client,
    state: &RunState,
    update: &Batch,
) -> anyhow::Result<BatchReads> {
    // The session's counts not yet reported to the server's statistics, so taken before and after.
    let counted = "SELECT relname::text, seq_scan, coalesce(idx_tup_fetch, 0)
                   FROM pg_stat_xact_user_tables WHERE relname IN ('runs', 'steps', 'attempts')";
    let counts = |rows: Vec<tokio_postgres::Row>| -> HashMap<String, (i64, i64)> {
        rows.iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect()
    };
    let tx = client.transaction().await?;
    let before = counts(tx.query(counted, &[]).await?);
    db::plan_by_keys(&tx).await?;
    db::lock_runs(&tx, &[state.id]).await?;
    db::load_runs(&tx, &[state.id]).await?;
    let loaded = counts(tx.query(counted, &[]).await?);
    db::write(&tx, update).await?;
    let after = counts(tx.query(counted, &[]).await?);
    tx.rollback().await?;
    let mut scanned: Vec<(String, i64)> = after
        .iter()
        .map(|(table, (scans, _))| (table.clone(), scans - before.get(table).map_or(0, |c| c.0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    scanned.sort();
    let fetched = |c: &HashMap<String, (i64, i64)>| c.get("steps").map_or(0, |c| c.1);
    Ok(BatchReads {
        scanned,
        steps_fetched: fetched(&after) - fetched(&loaded),
    })
}

#[tokio::test]
async fn the_engines_statements_reach_rows_by_key_after_the_tables_grew() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let mut client = t.store.client().await?;
    // Nothing analyzes the tables while the test runs, as between two passes of autovacuum.
    client
        .batch_execute(
            "ALTER TABLE runs SET (autovacuum_enabled = false);
             ALTER TABLE steps SET (autovacuum_enabled = false);
             ALTER TABLE attempts SET (autovacuum_enabled = false);",
        )
        .await?;
    // On a young database, one small run: its batches run past the uses after which the
    // connection keeps its plans.
    let (batch, mut state, plan) = new_run_batch();
    let tx = client.transaction().await?;
    db::write(&tx, &batch).await?;
    tx.commit().await?;
    let update = first_step_succeeds(&mut state, &plan, json!({}));
    for _ in 0..8 {
        batch_reads(&mut client, &state, &update).await?;
    }

    // Thousands of runs later, a batch on a fan-out of 500 steps reads no table whole, and finds
    // the steps it writes by their key, not by reading through the steps of their run.
    let mut yaml = String::from("name: pair\nsteps:\n");
    for i in 0..500 {
        yaml.push_str(&format!("  - {{id: s{i}, agent: x, action: y}}\n"));
    }
    let (mut many, mut state, plan) = new_run_batch_of(&yaml);
    for _ in 0..3_000 {
        let (b, _, _) = new_run_batch();
        many.definitions.extend(b.definitions);
        many.new_runs.extend(b.new_runs);
        many.new_steps.extend(b.new_steps);
        many.attempts_started.extend(b.attempts_started);
        many.outbox.extend(b.outbox);
    }
    let tx = client.transaction().await?;
    db::write(&tx, &many).await?;
    tx.commit().await?;
    let update = first_step_succeeds(&mut state, &plan, json!({}));
    assert_eq!(
        batch_reads(&mut client, &state, &update).await?,
        BatchReads {
            scanned: Vec::new(),
            steps_fetched: update.step_updates.len() as i64,
        }
    );
    drop(client);
    t.drop_db().await
}

#[tokio::test]
async fn only_the_primary_key_of_steps_begins_with_the_run() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let client = t.store.client().await?;
    let leading: Vec<String> = client
        .query(
            "SELECT i.indexrelid::regclass::text FROM pg_index i
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
             WHERE i.indrelid = 'steps'::regclass AND a.attname = 'run_id'",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        leading,
        ["steps_pkey"],
        "an index led by run_id that cannot answer idx can be taken for a step's lookup by key"
    );
    drop(client);
    t.drop_db().await
}

#[tokio::test]
async fn unsent_outbox_rows_are_taken_by_one_sweeper_at_a_time() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let (batch, ..) = new_run_batch();
    let mut c1 = t.store.client().await?;
    let mut c2 = t.store.client().await?;
    let tx = c1.transaction().await?;
    db::write(&tx, &batch).await?;
    tx.commit().await?;
    assert_eq!(outbox::backlog(&c1).await?, 1);

    let tx1 = c1.transaction().await?;
    let taken = outbox::take_unsent(&tx1, at(10), 100).await?;
    assert_eq!(taken, batch.outbox);
    // A second sweeper skips what the first holds instead of waiting for it.
    let tx2 = c2.transaction().await?;
    assert!(outbox::take_unsent(&tx2, at(10), 100).await?.is_empty());
    // Rows newer than the cut-off are left to the relay that wrote them.
    assert!(outbox::take_unsent(&tx2, at(-1), 100).await?.is_empty());
    tx2.commit().await?;
    assert_eq!(outbox::delete(&tx1, &[taken[0].id]).await?, 1);
    tx1.commit().await?;
    assert_eq!(outbox::backlog(&c1).await?, 0);
    drop((c1, c2));
    t.drop_db().await
}

#[tokio::test]
async fn due_retries_are_found_by_time() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let (mut batch, state, _) = new_run_batch();
    let mut step = batch.new_steps[0].1.state.clone();
    step.status = StepStatus::Waiting;
    step.wake_at = Some(at(30));
    batch.new_steps[0].1.state = step;
    let mut client = t.store.client().await?;
    let tx = client.transaction().await?;
    db::write(&tx, &batch).await?;
    tx.commit().await?;
    assert_eq!(db::next_wakeup(&client).await?, Some(at(30)));
    assert!(db::due_wakeups(&client, at(29), 10).await?.is_empty());
    assert_eq!(
        db::due_wakeups(&client, at(30), 10).await?,
        [(state.id, 0, 1)]
    );
    drop(client);
    t.drop_db().await
}

#[tokio::test]
async fn registering_a_name_again_adds_a_revision() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let mut client = t.store.client().await?;
    let first = Definition::from_yaml(TWO_STEPS)?;
    let mut second = first.clone();
    second.description = Some("now described".into());
    let r1 = definitions::register(&mut client, "default", &first).await?;
    let r2 = definitions::register(&mut client, "default", &second).await?;
    assert_eq!((r1.revision, r2.revision), (1, 2));
    assert_ne!(r1.hash, r2.hash);
    let (latest, body) = definitions::latest(&client, "default", "pair")
        .await?
        .unwrap();
    assert_eq!(latest, r2);
    assert_eq!(Definition::from_value(body)?, second);
    assert_eq!(
        definitions::list(&client, None).await?,
        std::slice::from_ref(&r2)
    );
    assert!(
        definitions::latest(&client, "default", "absent")
            .await?
            .is_none()
    );
    let hashes = definitions::latest_hashes(
        &client,
        &[
            ("default", "pair"),
            ("default", "absent"),
            ("other", "pair"),
        ],
    )
    .await?;
    assert_eq!(
        hashes,
        [(("default".to_string(), "pair".to_string()), r2.hash)].into(),
        "the latest revision's hash; nothing for names not registered in that namespace"
    );
    drop(client);
    t.drop_db().await
}

#[tokio::test]
async fn namespaces_keep_names_and_runs_apart() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let mut client = t.store.client().await?;
    let pair = Definition::from_yaml(TWO_STEPS)?;
    let a = definitions::register(&mut client, "team-a", &pair).await?;
    let b = definitions::register(&mut client, "team-b", &pair).await?;
    assert_eq!(
        (a.revision, b.revision),
        (1, 1),
        "one name, a revision 1 in each"
    );
    let only_b = ["team-b".to_string()];
    assert_eq!(definitions::list(&client, Some(&only_b)).await?, [b]);
    assert!(
        definitions::latest(&client, "team-c", "pair")
            .await?
            .is_none()
    );

    // Runs in flight: a running run of team-a counts, an ended one does not.
    let (mut batch, state, _) = new_run_batch();
    batch.new_runs[0].namespace = "team-a".into();
    let tx = client.transaction().await?;
    db::write(&tx, &batch).await?;
    tx.commit().await?;
    let (mut ended, _, _) = new_run_batch();
    ended.new_runs[0].namespace = "team-a".into();
    ended.new_runs[0].ended_at = Some(at(1));
    let tx = client.transaction().await?;
    db::write(&tx, &ended).await?;
    tx.commit().await?;
    let tx = client.transaction().await?;
    let counts = flotilla_store::quotas::lock_runs_in_flight(
        &tx,
        &["team-b".into(), "team-a".into(), "team-a".into()],
    )
    .await?;
    tx.commit().await?;
    assert_eq!(counts.get("team-a"), Some(&1));
    assert_eq!(counts.get("team-b"), Some(&0));
    let only_a = ["team-a".to_string()];
    assert!(
        queries::run(&client, Some(&only_b), state.id)
            .await?
            .is_none()
    );
    assert!(
        queries::run(&client, Some(&only_a), state.id)
            .await?
            .is_some()
    );
    drop(client);
    t.drop_db().await
}

#[tokio::test]
async fn opening_twice_runs_each_migration_once() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let again = Store::open(&config(&t.name)).await?;
    let versions: Vec<i32> = again
        .client()
        .await?
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Migration numbers may have gaps (each is `NNNN_name.sql`); each file is applied once.
    let mut files: Vec<i32> =
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))?
            .filter_map(|f| {
                let path = f.ok()?.path();
                (path.extension()? == "sql").then_some(())?;
                path.file_name()?.to_str()?.get(..4)?.parse().ok()
            })
            .collect();
    files.sort_unstable();
    assert_eq!(
        versions, files,
        "every migration file is registered and applied once, in order"
    );
    drop(again);
    t.drop_db().await
}

#[tokio::test]
async fn tables_changed_since_their_last_analyze_are_named_stale_until_analyzed()
-> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let client = t.store.client().await?;
    let autovacuum: String = client.query_one("SHOW autovacuum", &[]).await?.get(0);
    let fresh = statistics::statistics(&client).await?;
    assert_eq!(fresh.autovacuum, autovacuum == "on");
    assert_eq!(fresh.stale, Vec::<String>::new(), "nothing written yet");

    client
        .batch_execute(
            "INSERT INTO outbox (id, routing_key, kind, body, created_at)
             SELECT gen_random_uuid(), 'q', 'task', '\\x00', now() FROM generate_series(1, 100)",
        )
        .await?;
    // A backend reports its counts when idle, at most once a second unless told to.
    client
        .batch_execute("SELECT pg_stat_force_next_flush()")
        .await?;
    assert_eq!(statistics::statistics(&client).await?.stale, ["outbox"]);

    client.batch_execute("ANALYZE outbox").await?;
    assert_eq!(
        statistics::statistics(&client).await?.stale,
        Vec::<String>::new()
    );
    drop(client);
    t.drop_db().await
}

#[tokio::test]
async fn a_refused_statement_says_what_postgres_refused() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let client = t.store.client().await?;
    let refused = client.batch_execute("SELECT 'not a uuid'::uuid").await;
    let error = flotilla_store::Error::from(refused.expect_err("a text is not a uuid"));
    // Not tokio-postgres's bare "db error": the server's own message and its SQLSTATE.
    assert_eq!(
        error.to_string(),
        "database error: invalid input syntax for type uuid: \"not a uuid\" (22P02)"
    );
    drop(client);
    t.drop_db().await
}

#[tokio::test]
async fn a_deadlock_is_a_conflict_worth_trying_again() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let mut first = t.store.client().await?;
    let mut second = t.store.client().await?;
    first
        .batch_execute("CREATE TABLE pair (id int PRIMARY KEY); INSERT INTO pair VALUES (1), (2)")
        .await?;
    let one = first.transaction().await?;
    let two = second.transaction().await?;
    one.execute("UPDATE pair SET id = id WHERE id = 1", &[])
        .await?;
    two.execute("UPDATE pair SET id = id WHERE id = 2", &[])
        .await?;
    // Each now waits for the other's row: Postgres breaks the cycle by failing one of them.
    let (a, b) = tokio::join!(
        one.execute("UPDATE pair SET id = id WHERE id = 2", &[]),
        two.execute("UPDATE pair SET id = id WHERE id = 1", &[]),
    );
    let failed = match (a, b) {
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => flotilla_store::Error::from(e),
        other => panic!("exactly one side of a deadlock fails: {other:?}"),
    };
    assert!(failed.is_conflict(), "{failed}");
    assert!(!failed.is_unavailable(), "{failed}");
    assert!(failed.to_string().contains("(40P01)"), "{failed}");
    drop((one, two));
    let refused = first.batch_execute("SELECT 'x'::uuid").await.unwrap_err();
    assert!(!flotilla_store::Error::from(refused).is_conflict());
    drop((first, second));
    t.drop_db().await
}

#[tokio::test]
async fn an_unreachable_server_is_named_without_its_password() {
    let err = Store::open(&StoreConfig {
        url: "postgres://flotilla:hunter2@127.0.0.1:1/flotilla".into(),
        pool_size: 1,
        connect_timeout: Duration::from_secs(2),
    })
    .await
    .err()
    .expect("nothing listens on port 1")
    .to_string();
    assert!(
        err.contains("postgres://flotilla:***@127.0.0.1:1/flotilla"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    assert!(err.contains("pg_ctlcluster"), "{err}");
}

/// Asked for verified TLS, a server whose certificate cannot be verified (or that offers no
/// TLS) is refused: the store never falls back to plaintext.
#[tokio::test]
async fn verified_tls_refuses_a_server_it_cannot_verify() -> anyhow::Result<()> {
    let name = format!(
        "flotilla_store_{}",
        &Uuid::new_v4().simple().to_string()[..16]
    );
    let err = Store::open(&config(&format!("{name}?sslmode=verify-full")))
        .await
        .err()
        .expect("the local server's certificate is not one the platform trusts for 127.0.0.1")
        .to_string();
    assert!(err.contains("certificate") || err.contains("TLS"), "{err}");
    // The same server in plaintext, when asked for.
    let store = Store::open(&config(&format!("{name}?sslmode=disable"))).await?;
    TestDb { name, store }.drop_db().await
}

async fn lease_ends(
    client: &impl deadpool_postgres::GenericClient,
    run: Uuid,
) -> anyhow::Result<Vec<Option<DateTime<Utc>>>> {
    let rows = client
        .query(
            "SELECT lease_until FROM steps WHERE run_id = $1 ORDER BY idx",
            &[&run],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

const FIVE: chrono::Duration = chrono::Duration::seconds(5);

#[tokio::test]
async fn a_step_with_a_heartbeat_timeout_has_that_lease() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let (batch, state, _) = new_run_batch_of(
        "name: l\nsteps:\n  - {id: own, agent: x, action: y, heartbeat_timeout: 3s, depends_on: []}\n  - {id: default, agent: x, action: z, depends_on: []}\n",
    );
    let id = state.id;
    let own = state.steps[0].task_id.unwrap();
    let default = state.steps[1].task_id.unwrap();
    let mut client = t.store.client().await?;
    let tx = client.transaction().await?;
    db::write(&tx, &batch).await?;
    tx.commit().await?;
    let held = [
        (id, "own".to_string(), own),
        (id, "default".to_string(), default),
    ];
    assert_eq!(db::renew_leases(&client, &held, at(10), FIVE).await?, 2);
    assert_eq!(lease_ends(&client, id).await?, [Some(at(13)), Some(at(15))]);
    // Heartbeats resume after a gap: each lease is extended by its own length from then.
    assert!(db::pulse(&client, at(100), FIVE).await?);
    assert_eq!(
        lease_ends(&client, id).await?,
        [Some(at(103)), Some(at(105))]
    );
    let expired = db::expired_leases(&client, at(104), 10).await?;
    assert!(expired.is_empty(), "the pulse is still at 100 s");
    assert!(!db::pulse(&client, at(104), FIVE).await?);
    let expired = db::expired_leases(&client, at(104), 10).await?;
    assert_eq!(
        expired.iter().map(|e| e.task_id).collect::<Vec<_>>(),
        [own],
        "only the 3 s lease has run out"
    );
    drop(client);
    t.drop_db().await
}

#[tokio::test]
async fn leases_are_renewed_for_the_running_attempt_only_and_end_with_it() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let (batch, mut state, plan) = new_run_batch();
    let id = state.id;
    let task = state.steps[0].task_id.unwrap();
    let mut client = t.store.client().await?;
    let tx = client.transaction().await?;
    db::write(&tx, &batch).await?;
    tx.commit().await?;

    // A heartbeat naming another attempt's task renews nothing.
    assert_eq!(
        db::renew_leases(&client, &[(id, "a".into(), Uuid::new_v4())], at(5), FIVE).await?,
        0
    );
    assert_eq!(
        db::renew_leases(&client, &[(id, "a".into(), task)], at(5), FIVE).await?,
        1
    );
    assert_eq!(db::next_lease_end(&client).await?, Some(at(10)));
    // While no heartbeat gets through, no lease expires, however late it is.
    assert!(db::expired_leases(&client, at(100), 10).await?.is_empty());
    // Heartbeats flow (at 9 s): a lease that ended before them expires; the pulse came after a
    // long gap (the migration's), so every lease is first extended once.
    let lease = chrono::Duration::seconds(15);
    assert!(db::pulse(&client, at(9), lease).await?);
    assert_eq!(db::next_lease_end(&client).await?, Some(at(24)));
    assert!(
        !db::pulse(&client, at(24), lease).await?,
        "no gap since the last pulse"
    );
    assert!(db::expired_leases(&client, at(23), 10).await?.is_empty());
    let expired = db::expired_leases(&client, at(24), 10).await?;
    assert_eq!(
        (
            expired[0].run_id,
            expired[0].idx,
            expired[0].attempt,
            expired[0].task_id
        ),
        (id, 0, 1, task)
    );

    // The attempt ends: its lease goes with it.
    state.apply(
        &plan,
        Event::AttemptFinished {
            step: 0,
            attempt: 1,
            task_id: task,
            outcome: flotilla_core::Outcome::Success(json!(1)),
            worker: "w".into(),
            started_at: at(1),
            finished_at: at(2),
        },
        at(2),
    );
    let mut update = Batch::default();
    update.step_updates.push(StepRow {
        run_id: id,
        idx: 0,
        state: state.steps[0].clone(),
    });
    let tx = client.transaction().await?;
    db::write(&tx, &update).await?;
    tx.commit().await?;
    assert_eq!(db::next_lease_end(&client).await?, None);
    assert!(db::expired_leases(&client, at(100), 10).await?.is_empty());
    assert_eq!(
        db::renew_leases(&client, &[(id, "a".into(), task)], at(15), FIVE).await?,
        0,
        "a finished attempt is not renewed"
    );
    drop(client);
    t.drop_db().await
}

#[tokio::test]
async fn idempotency_keys_answer_their_run_until_they_expire() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let mut client = t.store.client().await?;
    let run = Uuid::new_v4();
    let tx = client.transaction().await?;
    assert!(idempotency::claim(&tx, &["k1"], at(0)).await?.is_empty());
    idempotency::record(&tx, &[("k1".into(), run)], at(100)).await?;
    tx.commit().await?;
    let tx = client.transaction().await?;
    assert_eq!(
        idempotency::claim(&tx, &["k1", "k2"], at(50)).await?,
        [("k1".to_string(), run)].into()
    );
    assert!(
        idempotency::claim(&tx, &["k1"], at(101)).await?.is_empty(),
        "past its retention the key is free"
    );
    tx.commit().await?;
    assert_eq!(idempotency::purge(&client, at(101)).await?, 1);
    drop(client);
    t.drop_db().await
}

#[tokio::test]
async fn dead_letters_are_recorded_once_and_redriven_once() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let mut client = t.store.client().await?;
    let letter = dead_letters::DeadLetter {
        id: Uuid::new_v4(),
        run_id: Some(Uuid::new_v4()),
        step_id: Some("a".into()),
        attempt: Some(1),
        task_id: None,
        reason: "dead-lettered".into(),
        deliveries: Some(5),
        body: b"{}".to_vec(),
        created_at: at(0),
        redriven_at: None,
    };
    dead_letters::insert(&client, std::slice::from_ref(&letter)).await?;
    dead_letters::insert(&client, std::slice::from_ref(&letter)).await?;
    assert_eq!(
        dead_letters::list(&client, true, 10).await?,
        std::slice::from_ref(&letter)
    );
    let tx = client.transaction().await?;
    assert_eq!(
        dead_letters::lock_pending(&tx, &[]).await?,
        std::slice::from_ref(&letter)
    );
    dead_letters::mark_redriven(&tx, &[letter.id], at(5)).await?;
    tx.commit().await?;
    assert!(dead_letters::list(&client, true, 10).await?.is_empty());
    assert_eq!(
        dead_letters::list(&client, false, 10).await?[0].redriven_at,
        Some(at(5))
    );
    assert!(
        dead_letters::lock_pending(&client, &[letter.id])
            .await?
            .is_empty()
    );
    drop(client);
    t.drop_db().await
}

#[tokio::test]
async fn a_due_schedule_is_claimed_by_one_coordinator_and_moves_on() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let mut c1 = t.store.client().await?;
    let mut c2 = t.store.client().await?;
    let row = schedules::ScheduleRow {
        namespace: "default".into(),
        name: "monitor".into(),
        cron: "*/5 * * * *".into(),
        timezone: "UTC".into(),
        missed: "skip".into(),
        overlap: "skip".into(),
        params: serde_json::Map::new(),
        next_at: at(300),
        last_run_id: None,
        created_at: at(0),
    };
    assert_eq!(schedules::put(&c1, &row).await?, row);
    assert_eq!(schedules::next_tick(&c1).await?, Some(at(300)));
    let tx1 = c1.transaction().await?;
    assert!(schedules::claim_due(&tx1, at(299), 10).await?.is_empty());
    assert_eq!(schedules::claim_due(&tx1, at(300), 10).await?.len(), 1);
    // Another coordinator skips the tick the first one holds.
    let tx2 = c2.transaction().await?;
    assert!(schedules::claim_due(&tx2, at(300), 10).await?.is_empty());
    tx2.commit().await?;
    let run = Uuid::new_v4();
    schedules::advance(&tx1, "default", "monitor", at(600), Some(run)).await?;
    tx1.commit().await?;
    let listed = schedules::list(&c1, None).await?;
    assert_eq!(
        (listed[0].next_at, listed[0].last_run_id),
        (at(600), Some(run))
    );
    assert!(
        !schedules::run_active(&c1, run).await?,
        "an unknown run is not active"
    );
    assert!(schedules::delete(&c1, "default", "monitor").await?);
    assert!(schedules::list(&c1, None).await?.is_empty());
    drop((c1, c2));
    t.drop_db().await
}

#[tokio::test]
async fn instances_and_run_deadlines_load_back_and_past_deadlines_are_found() -> anyhow::Result<()>
{
    let t = TestDb::new().await?;
    let def = Definition::from_yaml(
        "name: fan\ntimeout: 10s\nsteps:\n  - {id: each, agent: x, action: y, for_each: \"${{ params.items }}\"}\n",
    )?;
    let plan = Plan::compile(&def)?;
    let id = Uuid::now_v7();
    let mut state = RunState::new(
        id,
        &plan,
        json!({"items": ["a", {"b": 1}]})
            .as_object()
            .unwrap()
            .clone(),
    );
    state.apply(&plan, Event::Start, at(0));
    assert_eq!(state.steps.len(), 3, "the node and its two instances");
    let content = definitions::Content::of(&def);
    let mut batch = Batch::default();
    batch.definitions.push((content.hash.clone(), content.body));
    batch.new_runs.push(NewRun {
        id,
        name: "fan".into(),
        definition_hash: content.hash,
        status: state.status,
        params: state.params.clone(),
        created_at: at(0),
        ended_at: None,
        deadline: state.deadline,
        error: None,
        subset: state.subset.clone(),
        priority: state.priority,
        parent: None,
        namespace: "default".into(),
    });
    for (i, step) in state.steps.iter().enumerate() {
        batch.new_steps.push((
            StepIdent {
                step_id: state.slot_id(&plan, i),
                agent: "x".into(),
                action: "y".into(),
                lease_ms: None,
                workflow: None,
                start_ms: None,
                labels: None,
            },
            StepRow {
                run_id: id,
                idx: i as i32,
                state: step.clone(),
            },
        ));
    }
    let mut client = t.store.client().await?;
    let tx = client.transaction().await?;
    db::write(&tx, &batch).await?;
    tx.commit().await?;

    let loaded = db::load_runs(&client, &[id]).await?;
    assert_eq!(
        loaded[0].steps, state.steps,
        "instances keep their node, index and item"
    );
    assert_eq!(loaded[0].deadline, Some(at(10)));
    assert!(db::past_run_deadlines(&client, at(9), 10).await?.is_empty());
    assert_eq!(db::past_run_deadlines(&client, at(10), 10).await?, [id]);
    assert_eq!(db::next_run_deadline(&client).await?, Some(at(10)));
    drop(client);
    t.drop_db().await
}

#[tokio::test]
async fn attempts_are_summarised_by_agent_from_a_time_on() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let mut client = t.store.client().await?;
    // Two runs, each with its first attempt dispatched; one a worker ran from 1 s to 3 s, one
    // the coordinator ended at 5 s (a lease that ran out: no run time).
    let mut ends = Vec::new();
    for (success, started, finished, worker) in [(true, 1, 3, "w"), (false, 5, 5, "")] {
        let (batch, state, _) = new_run_batch();
        let tx = client.transaction().await?;
        db::write(&tx, &batch).await?;
        tx.commit().await?;
        ends.push(db::AttemptEnd {
            task_id: state.steps[0].task_id.unwrap(),
            success,
            started_at: at(started),
            finished_at: at(finished),
            worker: worker.into(),
            error: (!success).then(|| "lease expired".into()),
        });
    }
    let update = Batch {
        attempts_ended: ends,
        ..Batch::default()
    };
    let tx = client.transaction().await?;
    db::write(&tx, &update).await?;
    tx.commit().await?;

    let all = queries::attempts_since(&client, at(0)).await?;
    assert_eq!(
        all,
        [queries::AgentAttempts {
            agent: "x".into(),
            executions: 2,
            successes: 1,
            run_time_ms: Some([2000.0; 3]),
        }]
    );
    let late = queries::attempts_since(&client, at(4)).await?;
    assert_eq!(
        late,
        [queries::AgentAttempts {
            agent: "x".into(),
            executions: 1,
            successes: 0,
            run_time_ms: None,
        }]
    );
    assert!(queries::attempts_since(&client, at(6)).await?.is_empty());
    drop(client);
    t.drop_db().await
}

#[tokio::test]
async fn breakers_are_locked_written_listed_and_release_their_held_steps() -> anyhow::Result<()> {
    use flotilla_core::breaker::{Breaker, BreakerConfig, BreakerState, Probe};
    use flotilla_store::breakers;

    let t = TestDb::new().await?;
    let config = BreakerConfig {
        cool_down: Duration::from_secs(10),
        ..BreakerConfig::default()
    };
    // Step a is held by agent x's breaker; step b runs.
    let (mut batch, state, _) = new_run_batch();
    let held = &mut batch.new_steps[0].1.state;
    *held = flotilla_core::StepState {
        status: StepStatus::Waiting,
        held: Some("x".into()),
        ..Default::default()
    };
    let b_task = Uuid::now_v7();
    batch.new_steps[1].1.state = flotilla_core::StepState {
        status: StepStatus::Running,
        attempt: 1,
        task_id: Some(b_task),
        ..Default::default()
    };
    let mut client = t.store.client().await?;
    let tx = client.transaction().await?;
    db::write(&tx, &batch).await?;
    let locked = breakers::lock(&tx, &["x".to_string()]).await?;
    assert_eq!(locked["x"], Breaker::default(), "created closed");
    let open = Breaker {
        state: BreakerState::Open,
        window: [true, false, true].into(),
        opened_at: Some(at(0)),
        probe: None,
    };
    breakers::write(&tx, &config, [("x", &open)].into_iter()).await?;
    tx.commit().await?;

    let list = breakers::list(&client).await?;
    assert_eq!(list.len(), 1);
    assert_eq!(
        (&list[0].breaker, list[0].probe_at, list[0].held),
        (&open, Some(at(10)), 1)
    );
    assert_eq!(breakers::next_probe(&client).await?, Some(at(10)));
    assert!(
        breakers::due_releases(&client, at(9), 10, &[])
            .await?
            .is_empty()
    );
    assert_eq!(
        breakers::due_releases(&client, at(10), 10, &[]).await?,
        [(state.id, 0)]
    );

    // A half-open breaker keeps the probe that runs (step b's attempt)...
    let running = Probe {
        run_id: state.id,
        step: 1,
        task_id: b_task,
    };
    let probing = Breaker {
        state: BreakerState::HalfOpen,
        probe: Some(running),
        ..open.clone()
    };
    breakers::write(&client, &config, [("x", &probing)].into_iter()).await?;
    let tx = client.transaction().await?;
    let locked = breakers::lock(&tx, &["x".to_string()]).await?;
    assert_eq!(locked["x"].probe, Some(running));
    tx.rollback().await?;

    // ...and forgets one that no longer runs, which lets the next one go.
    let half_open = Breaker {
        state: BreakerState::HalfOpen,
        probe: Some(Probe {
            run_id: state.id,
            step: 1,
            task_id: Uuid::new_v4(),
        }),
        ..open.clone()
    };
    breakers::write(&client, &config, [("x", &half_open)].into_iter()).await?;
    assert_eq!(
        breakers::due_releases(&client, at(0), 10, &[]).await?,
        [(state.id, 0)]
    );
    let tx = client.transaction().await?;
    let locked = breakers::lock(&tx, &["x".to_string()]).await?;
    assert_eq!(locked["x"].probe, None);
    tx.rollback().await?;

    // An operator's reset closes it: its held steps are due.
    assert!(breakers::reset(&client, "x", "ana@host", at(20)).await?);
    assert!(!breakers::reset(&client, "nobody", "ana@host", at(20)).await?);
    let list = breakers::list(&client).await?;
    assert_eq!(list[0].breaker, Breaker::default());
    assert_eq!(list[0].reset, Some(("ana@host".to_string(), at(20))));
    assert_eq!(
        breakers::due_releases(&client, at(0), 10, &[]).await?,
        [(state.id, 0)]
    );
    drop(client);
    t.drop_db().await
}

#[tokio::test]
async fn a_dispatched_attempt_is_queued_until_a_heartbeat_lists_it() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let (batch, state, _) = new_run_batch_of(
        "name: q\nsteps:\n  - {id: own, agent: x, action: y, schedule_to_start: 2s, depends_on: []}\n  - {id: other, agent: x, action: z, depends_on: []}\n",
    );
    let id = state.id;
    let own = state.steps[0].task_id.unwrap();
    let mut client = t.store.client().await?;
    let tx = client.transaction().await?;
    db::write(&tx, &batch).await?;
    tx.commit().await?;

    let queued = registry::queued(&client).await?;
    assert_eq!(queued.len(), 1, "{queued:?}");
    assert_eq!((queued[0].agent.as_str(), queued[0].attempts), ("x", 2));
    assert!(db::not_started(&client, Utc::now(), 10).await?.is_empty());
    let late = db::not_started(&client, Utc::now() + chrono::Duration::seconds(3), 10).await?;
    assert_eq!(
        late.iter().map(|l| l.task_id).collect::<Vec<_>>(),
        [own],
        "only the step with a schedule_to_start"
    );
    let (run, steps) = queries::run(&client, None, id).await?.unwrap();
    assert_eq!(run.id, id);
    assert!(steps.iter().all(|s| s.queued_for.as_deref() == Some("x")));

    // A worker took it: it is started, no longer queued nor due to fail.
    db::renew_leases(&client, &[(id, "own".into(), own)], at(5), FIVE).await?;
    assert_eq!(registry::queued(&client).await?[0].attempts, 1);
    assert!(db::next_start_by(&client).await?.is_none());
    let (_, steps) = queries::run(&client, None, id).await?.unwrap();
    assert_eq!(steps[0].queued_for, None);
    drop(client);
    t.drop_db().await
}

#[tokio::test]
async fn the_registry_keeps_what_workers_tell_and_forgets_the_departed_and_the_silent()
-> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let client = t.store.client().await?;
    let beat = |id: &str, in_flight, seen| Sighting {
        worker_id: id.into(),
        agents: vec!["a".into()],
        concurrency: 4,
        in_flight: Some(in_flight),
        seen_at: at(seen),
        registration: None,
    };
    let registered = Sighting {
        agents: vec!["a".into(), "b".into()],
        in_flight: None,
        registration: Some(Announcement {
            actions: vec!["work".into()],
            sdk: "flotilla-worker/0.1.0".into(),
            host: "h".into(),
            pid: 7,
            labels: [("region".to_owned(), "eu".to_owned())].into(),
            started_at: at(0),
        }),
        ..beat("w2", 0, 10)
    };
    registry::record(&client, &[beat("w1", 2, 10), registered], &[], at(-100)).await?;
    let workers = registry::workers(&client, None).await?;
    assert_eq!(workers.len(), 2);
    assert_eq!((workers[0].in_flight, workers[0].sdk.as_deref()), (2, None));
    assert_eq!(workers[1].sdk.as_deref(), Some("flotilla-worker/0.1.0"));

    // A heartbeat keeps what the registration told.
    registry::record(&client, &[beat("w2", 1, 12)], &[], at(-100)).await?;
    let of_b = registry::workers(&client, Some("a")).await?;
    assert_eq!(of_b.len(), 2);
    let w2 = &registry::workers(&client, None).await?[1];
    assert_eq!((w2.in_flight, w2.last_seen), (1, at(12)));
    assert_eq!(w2.labels["region"], "eu");
    assert_eq!(w2.actions, ["work"]);
    assert_eq!(w2.agents, ["a"], "what the heartbeat says it serves now");
    assert!(registry::workers(&client, Some("c")).await?.is_empty());

    registry::record(&client, &[], &["w2".into()], at(5)).await?;
    let left: Vec<String> = registry::workers(&client, None)
        .await?
        .into_iter()
        .map(|w| w.worker_id)
        .collect();
    assert_eq!(left, ["w1"]);
    registry::record(&client, &[], &[], at(11)).await?;
    assert!(registry::workers(&client, None).await?.is_empty());
    drop(client);
    t.drop_db().await
}

fn log_line(
    run_id: Uuid,
    step: &str,
    execution_id: Uuid,
    line_no: i64,
    text: &str,
) -> logs::NewLine {
    logs::NewLine {
        run_id,
        step_id: step.into(),
        attempt: 1,
        execution_id,
        line_no,
        stream: "stdout".into(),
        line: text.into(),
        at: at(line_no),
    }
}

fn texts(lines: &[logs::StoredLine]) -> Vec<(i64, &str, &str)> {
    lines
        .iter()
        .map(|l| (l.seq, l.step_id.as_str(), l.line.as_str()))
        .collect()
}

#[tokio::test]
async fn step_logs_store_each_line_once_in_order_up_to_the_cap() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let (batch, state, _) = new_run_batch();
    let mut client = t.store.client().await?;
    db::write(&client, &batch).await?;
    let run = state.id;
    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    let all = logs::LogQuery {
        limit: 100,
        ..logs::LogQuery::default()
    };

    let batch_one = vec![
        log_line(run, "a", first, 1, "one"),
        log_line(run, "a", first, 2, "two"),
        // Published twice by its worker.
        log_line(run, "a", first, 2, "two"),
        // A run that does not exist.
        log_line(Uuid::now_v7(), "a", first, 1, "lost"),
    ];
    assert_eq!(logs::append(&mut client, &batch_one, 12).await?, 2);
    // Delivered again: nothing new.
    assert_eq!(logs::append(&mut client, &batch_one, 12).await?, 0);
    // The attempt run again elsewhere numbers from 1 too; another step has a cap of its own.
    let batch_two = vec![
        log_line(run, "a", second, 1, "again"),
        log_line(run, "b", first, 1, "b-one"),
        log_line(run, "a", second, 2, "over"),
        log_line(run, "a", second, 3, "x"),
    ];
    assert_eq!(logs::append(&mut client, &batch_two, 12).await?, 2);
    assert_eq!(
        texts(&logs::read(&client, run, &all).await?),
        [
            (1, "a", "one"),
            (2, "a", "two"),
            (3, "a", "again"),
            (4, "b", "b-one")
        ]
    );
    // "one", "two" and "again" are 11 bytes: "over" goes past 12, and it and what follows are
    // dropped.
    assert_eq!(
        logs::truncated(&client, run, None, None).await?,
        [logs::Truncated {
            step_id: "a".into(),
            attempt: 1,
            bytes: 11,
        }]
    );
    let later = vec![log_line(run, "a", second, 4, "y")];
    assert_eq!(logs::append(&mut client, &later, 12).await?, 0);

    let only_b_after_1 = logs::LogQuery {
        step_id: Some("b".into()),
        attempt: Some(1),
        after: 1,
        limit: 10,
    };
    assert_eq!(
        texts(&logs::read(&client, run, &only_b_after_1).await?),
        [(4, "b", "b-one")]
    );
    assert!(
        logs::truncated(&client, run, Some("b"), None)
            .await?
            .is_empty()
    );

    // The log goes with its run.
    client
        .execute("DELETE FROM runs WHERE id = $1", &[&run])
        .await?;
    assert!(logs::read(&client, run, &all).await?.is_empty());
    let left: i64 = client
        .query_one("SELECT count(*) FROM step_logs", &[])
        .await?
        .get(0);
    assert_eq!(left, 0);
    drop(client);
    t.drop_db().await
}

#[tokio::test]
async fn announced_runs_are_heard_by_every_listener_and_many_as_many() -> anyhow::Result<()> {
    use flotilla_store::events::{Changed, Listener, announce};
    let t = TestDb::new().await?;
    let url = config(&t.name).url;
    let mut first = Listener::connect(&url, Duration::from_secs(5)).await?;
    let mut second = Listener::connect(&url, Duration::from_secs(5)).await?;
    let client = t.store.client().await?;

    // Nothing to announce sends nothing: the first thing heard is the announcement after it.
    announce(&client, []).await?;
    let (b, a) = (Uuid::from_u128(2), Uuid::from_u128(1));
    announce(&client, [b, a, b]).await?;
    for listener in [&mut first, &mut second] {
        let heard = tokio::time::timeout(Duration::from_secs(5), listener.next()).await??;
        assert_eq!(heard, Changed::Runs(vec![a, b]));
    }

    // Too many runs to name: watchers read everything again.
    announce(&client, (0..250).map(Uuid::from_u128)).await?;
    let heard = tokio::time::timeout(Duration::from_secs(5), first.next()).await??;
    assert_eq!(heard, Changed::Many);
    drop((client, first, second));
    t.drop_db().await
}

#[tokio::test]
async fn an_agents_attempts_are_counted_in_total_and_by_bucket() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let mut client = t.store.client().await?;
    // Three attempts of agent `x` ending at 1 s (success, run 1 s), 12 s (failure, run 4 s) and
    // 14 s (success, ended by the coordinator: no run time); buckets of 10 s from 0 s.
    let mut ends = Vec::new();
    for (success, started, finished, worker) in
        [(true, 0, 1, "w"), (false, 8, 12, "w"), (true, 14, 14, "")]
    {
        let (batch, state, _) = new_run_batch();
        let tx = client.transaction().await?;
        db::write(&tx, &batch).await?;
        tx.commit().await?;
        ends.push(db::AttemptEnd {
            task_id: state.steps[0].task_id.unwrap(),
            success,
            started_at: at(started),
            finished_at: at(finished),
            worker: worker.into(),
            error: (!success).then(|| "boom".into()),
        });
    }
    let tx = client.transaction().await?;
    db::write(
        &tx,
        &Batch {
            attempts_ended: ends,
            ..Batch::default()
        },
    )
    .await?;
    tx.commit().await?;

    let (total, buckets) =
        queries::agent_attempts(&client, "x", at(0), at(30), Duration::from_secs(10)).await?;
    assert_eq!(
        total,
        queries::AttemptFigures {
            executions: 3,
            errors: 1,
            run_time_ms: Some([2500.0, 3850.0, 3970.0]),
        }
    );
    assert_eq!(
        buckets,
        [
            (
                0,
                queries::AttemptFigures {
                    executions: 1,
                    errors: 0,
                    run_time_ms: Some([1000.0; 3]),
                }
            ),
            (
                1,
                queries::AttemptFigures {
                    executions: 2,
                    errors: 1,
                    run_time_ms: Some([4000.0; 3]),
                }
            ),
        ]
    );
    // `until` is left out, and other agents have nothing.
    let (early, _) =
        queries::agent_attempts(&client, "x", at(0), at(12), Duration::from_secs(10)).await?;
    assert_eq!(early.executions, 1);
    let (nobody, none) =
        queries::agent_attempts(&client, "y", at(0), at(30), Duration::from_secs(10)).await?;
    assert_eq!(
        (nobody.executions, nobody.run_time_ms, none.len()),
        (0, None, 0)
    );
    drop(client);
    t.drop_db().await
}

#[tokio::test]
async fn runs_are_listed_by_status_definition_and_start() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let mut client = t.store.client().await?;
    let mut ids = Vec::new();
    for (name, created) in [("pair", 0), ("other", 10), ("pair", 20)] {
        let (mut batch, _, _) = new_run_batch();
        batch.new_runs[0].name = name.into();
        batch.new_runs[0].created_at = at(created);
        ids.push(batch.new_runs[0].id);
        let tx = client.transaction().await?;
        db::write(&tx, &batch).await?;
        tx.commit().await?;
    }
    let listed = |filter: queries::RunFilter<'static>| {
        let client = &client;
        async move {
            let runs = queries::list_runs(client, filter, 10, None).await?;
            anyhow::Ok(runs.into_iter().map(|r| r.id).collect::<Vec<_>>())
        }
    };
    assert_eq!(
        listed(queries::RunFilter::default()).await?,
        [ids[2], ids[1], ids[0]]
    );
    let pairs = queries::RunFilter {
        name: Some("pair"),
        ..queries::RunFilter::default()
    };
    assert_eq!(listed(pairs).await?, [ids[2], ids[0]]);
    let recent = queries::RunFilter {
        since: Some(at(10)),
        ..queries::RunFilter::default()
    };
    assert_eq!(listed(recent).await?, [ids[2], ids[1]]);
    let recent_pairs = queries::RunFilter {
        since: Some(at(10)),
        ..pairs
    };
    assert_eq!(listed(recent_pairs).await?, [ids[2]]);
    let none = queries::RunFilter {
        status: Some("failure"),
        ..pairs
    };
    assert!(listed(none).await?.is_empty());
    drop(client);
    t.drop_db().await
}

/// Blocks read in the database so far, once this session's counts are reported.
async fn blocks_read(client: &impl deadpool_postgres::GenericClient) -> anyhow::Result<i64> {
    // A backend reports its counts when it goes idle, at most once a second unless told to.
    client
        .batch_execute("SELECT pg_stat_force_next_flush()")
        .await?;
    Ok(client
        .query_one(
            "SELECT blks_hit + blks_read FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await?
        .get(0))
}

/// The timers pass every few milliseconds under load: what a pass reads must not grow with the
/// steps kept after their runs ended, nor start parallel workers (which read the catalogs anew
/// each time). A plan on a large table that estimates a third of it due does both.
#[tokio::test]
async fn a_timer_pass_reads_a_few_blocks_however_many_steps_finished() -> anyhow::Result<()> {
    let t = TestDb::new().await?;
    let client = t.store.client().await?;
    client
        .batch_execute(
            "INSERT INTO definition_contents (hash, body) VALUES ('history', '{}');
             INSERT INTO runs (id, name, definition_hash, status, params, version, created_at,
                               ended_at)
             SELECT gen_random_uuid(), 'history', 'history', 'success', '{}', 1, now(), now()
             FROM generate_series(1, 2000);
             INSERT INTO steps (run_id, idx, step_id, agent, action, status, attempt, task_id,
                                started_at, ended_at, output)
             SELECT r.id, i, 's' || i, 'a', 'b', 'success', 1, gen_random_uuid(), now(), now(),
                    '{}'
             FROM runs r, generate_series(0, 9) i;
             ANALYZE;
             -- Parallel workers priced as for a table 50 times larger (a million steps), so
             -- that this one need not be written to see what the planner would do there.
             SET parallel_setup_cost = 20;
             SET parallel_tuple_cost = 0.002;
             SET min_parallel_table_scan_size = 0;
             SET min_parallel_index_scan_size = 0;",
        )
        .await?;
    let pass = async || -> anyhow::Result<()> {
        let now = Utc::now();
        db::due_wakeups(&client, now, 1_000).await?;
        db::expired_leases(&client, now, 1_000).await?;
        db::past_deadlines(&client, now, 1_000).await?;
        db::past_run_deadlines(&client, now, 1_000).await?;
        db::not_started(&client, now, 1_000).await?;
        db::next_wakeup(&client).await?;
        db::next_lease_end(&client).await?;
        db::next_deadline(&client).await?;
        db::next_run_deadline(&client).await?;
        db::next_start_by(&client).await?;
        Ok(())
    };
    // Past the first five executions of each prepared statement, after which Postgres may plan
    // it once for every parameter.
    for _ in 0..6 {
        pass().await?;
    }
    let before = blocks_read(&client).await?;
    for _ in 0..10 {
        pass().await?;
    }
    let per_pass = (blocks_read(&client).await? - before) / 10;
    assert!(
        per_pass < 100,
        "a timer pass read {per_pass} blocks among 20,000 finished steps"
    );
    drop(client);
    t.drop_db().await
}
