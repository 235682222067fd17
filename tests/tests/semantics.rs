//! Workflow semantics end to end: `for_each` fan-outs, workflow timeouts and runs of a subset
//! (`--only` / `--skip`), against the real coordinator, echo workers, Postgres and RabbitMQ.

use std::time::Duration;

use flotilla_tests::Fleet;
use flotilla_tests::step;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn for_each_runs_a_thousand_items_at_most_max_parallel_at_once() -> anyhow::Result<()> {
    const ITEMS: usize = 1_000;
    const MAX_PARALLEL: i64 = 20;
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet.start_echo("echo-a", &["fan"], 16)?;
    fleet.start_echo("echo-b", &["fan"], 16)?;

    let yaml = format!(
        r#"
name: fan-out
steps:
  - id: list
    agent: fan
    action: list
    params: {{output: {{files: "${{{{ params.files }}}}"}}}}
  - id: each
    agent: fan
    action: work
    for_each: "${{{{ steps.list.output.files }}}}"
    max_parallel: {MAX_PARALLEL}
    params:
      sleep_ms: 2
      output: {{file: "${{{{ item }}}}", at: "${{{{ index }}}}"}}
  - id: count
    agent: fan
    action: count
    params: {{output: "${{{{ size(steps.each.output) }}}}"}}
"#
    );
    let files: Vec<String> = (0..ITEMS).map(|k| format!("f{k:04}")).collect();
    let started = std::time::Instant::now();
    let id = fleet.execute_yaml(&yaml, json!({ "files": files })).await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    let elapsed = started.elapsed();
    assert_eq!(
        run.status,
        "success",
        "{:#?}",
        run.steps.iter().find(|s| s.status != "success")
    );

    // The step's output is the list of its instances' outputs, in item order.
    let expected: Vec<Value> = files
        .iter()
        .enumerate()
        .map(|(k, f)| json!({"file": f, "at": k}))
        .collect();
    assert_eq!(step(&run, "each").output, Some(Value::Array(expected)));
    assert_eq!(step(&run, "count").output, Some(json!(ITEMS)));
    assert_eq!(step(&run, "each[999]").status, "success");

    // Every instance ran exactly once, and never more than max_parallel at a time (by the
    // coordinator's clock: from its dispatch to the commit of its result).
    let db = fleet.db().await?;
    let rows = db
        .query(
            "SELECT s.step_id, count(a.*), count(a.*) FILTER (WHERE a.status = 'success')
             FROM steps s LEFT JOIN attempts a USING (run_id, idx)
             WHERE s.run_id = $1 AND s.instance_of IS NOT NULL GROUP BY s.step_id",
            &[&id],
        )
        .await?;
    assert_eq!(rows.len(), ITEMS);
    for r in &rows {
        let (step_id, all, ok): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
        assert_eq!((all, ok), (1, 1), "attempts of {step_id}");
    }
    let overlap: i64 = db
        .query_one(
            "WITH spans AS (
                 SELECT a.dispatched_at AS at, 1 AS delta FROM attempts a JOIN steps s USING (run_id, idx)
                 WHERE s.run_id = $1 AND s.instance_of IS NOT NULL
                 UNION ALL
                 SELECT s.ended_at, -1 FROM steps s WHERE s.run_id = $1 AND s.instance_of IS NOT NULL)
             SELECT max(running) FROM (
                 SELECT sum(delta) OVER (ORDER BY at, delta) AS running FROM spans) t",
            &[&id],
        )
        .await?
        .get(0);
    assert!(
        (2..=MAX_PARALLEL).contains(&overlap),
        "{overlap} instances ran at once"
    );
    println!(
        "for_each: {ITEMS} items, max_parallel {MAX_PARALLEL}, {elapsed:?}, at most {overlap} at once"
    );

    // The report spans the fan-out's instances, first start to last end, and counts them.
    let (status, stdout, stderr) = fleet
        .cli(&["workflows", "report", &id.to_string(), "-o", "json"])
        .await?;
    assert!(status.success(), "{stderr}");
    let report: flotilla_api_model::RunReport = serde_json::from_str(&stdout)?;
    let each = report.steps.iter().find(|s| s.step_id == "each").unwrap();
    assert_eq!(each.instances, [("success".to_string(), ITEMS)].into());
    let span: (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) = {
        let row = db
            .query_one(
                "SELECT min(a.started_at), max(a.finished_at) FROM attempts a
                 JOIN steps s USING (run_id, idx) WHERE s.run_id = $1 AND s.instance_of IS NOT NULL",
                &[&id],
            )
            .await?;
        (row.get(0), row.get(1))
    };
    let expected = u64::try_from((span.1 - span.0).num_milliseconds())?;
    assert!(expected > 0);
    assert_eq!(each.run_ms, expected, "{each:?}");
    let (_, text, _) = fleet.cli(&["workflows", "report", &id.to_string()]).await?;
    assert!(text.contains("each instances: 1000 success"), "{text}");
    fleet.stop().await
}

#[tokio::test]
async fn a_for_each_over_a_value_that_is_not_a_list_fails_naming_its_type() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet.start_echo("echo", &["fan"], 4)?;
    let yaml = "name: not-a-list\nsteps:\n  - id: each\n    agent: fan\n    action: work\n    for_each: \"${{ params.files }}\"\n";
    let id = fleet.execute_yaml(yaml, json!({"files": "f1,f2"})).await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "failure");
    let each = step(&run, "each");
    assert_eq!(each.status, "failure");
    assert_eq!(
        each.error.as_deref(),
        Some("for_each: `${{ params.files }}` gives a string, not a list")
    );
    fleet.stop().await
}

#[tokio::test]
async fn a_run_past_its_workflow_timeout_fails_after_its_handlers_ran() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet.start_echo("echo", &["slow"], 4)?;
    let yaml = "name: timed\ntimeout: 2s\nsteps:\n  - {id: quick, agent: slow, action: a}\n  - {id: long, agent: slow, action: b, params: {sleep_ms: 8000}}\n  - {id: never, agent: slow, action: c}\nerror_handling:\n  on_failure:\n    - {id: cleanup, agent: slow, action: log}\n";
    let started = std::time::Instant::now();
    let id = fleet.execute_yaml(yaml, json!({})).await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    let took = started.elapsed();
    assert_eq!(run.status, "failure");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(20),
        "ended after {took:?}"
    );
    assert_eq!(step(&run, "quick").status, "success");
    for id in ["long", "never"] {
        let s = step(&run, id);
        assert_eq!(
            (s.status.as_str(), s.error.as_deref()),
            ("cancelled", Some("workflow timed out after 2s")),
            "step {id}"
        );
    }
    assert_eq!(step(&run, "cleanup").status, "success", "the handler ran");
    // The run's own error is in its view, since no step's failure says it.
    assert_eq!(run.error.as_deref(), Some("workflow timed out after 2s"));
    let db = fleet.db().await?;
    let row = db
        .query_one("SELECT error, deadline FROM runs WHERE id = $1", &[&id])
        .await?;
    let (error, deadline): (Option<String>, Option<chrono::DateTime<chrono::Utc>>) =
        (row.get(0), row.get(1));
    assert_eq!(error.as_deref(), Some("workflow timed out after 2s"));
    assert_eq!(deadline, None, "the deadline is cleared once it fired");
    fleet.stop().await
}

/// Attempts recorded per step of a run, by step id.
async fn attempts_by_step(
    fleet: &Fleet,
    id: uuid::Uuid,
) -> anyhow::Result<std::collections::BTreeMap<String, i64>> {
    let db = fleet.db().await?;
    let rows = db
        .query(
            "SELECT s.step_id, count(a.attempt) FROM steps s
             LEFT JOIN attempts a ON a.run_id = s.run_id AND a.idx = s.idx
             WHERE s.run_id = $1 GROUP BY s.step_id",
            &[&id],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

#[tokio::test]
async fn only_and_skip_from_the_cli_run_a_subset_and_the_rest_never_get_an_attempt()
-> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet.start_echo("echo", &["pipe"], 4)?;
    let dir = std::env::temp_dir().join(format!("flotilla-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("pipeline.yaml");
    std::fs::write(
        &file,
        "name: pipeline\nsteps:\n  - {id: fetch, agent: pipe, action: fetch}\n  - {id: build, agent: pipe, action: build}\n  - {id: test, agent: pipe, action: test}\n  - {id: deploy, agent: pipe, action: deploy}\n",
    )?;
    let file = file.to_str().unwrap();

    // An unknown step is refused by name, and nothing is stored.
    let (status, stdout, stderr) = fleet
        .cli(&["workflows", "execute", file, "--only", "biuld"])
        .await?;
    assert_eq!(status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(
            "unknown step in the selection: `biuld` is not a step of workflow `pipeline`"
        ),
        "{stderr}"
    );
    let db = fleet.db().await?;
    let runs: i64 = db.query_one("SELECT count(*) FROM runs", &[]).await?.get(0);
    assert_eq!(runs, 0, "nothing is stored for a refused selection");

    // --only: the two selected steps run; the others are skipped, saying why.
    let (status, stdout, stderr) = fleet
        .cli(&[
            "workflows",
            "execute",
            file,
            "--only",
            "build",
            "--only",
            "test",
            "--wait",
            "-o",
            "json",
        ])
        .await?;
    assert_eq!(status.code(), Some(0), "{stdout}\n{stderr}");
    let run: flotilla_api_model::WorkflowResult = serde_json::from_str(&stdout)?;
    assert_eq!(run.status, "success");
    assert_eq!(run.only, ["build", "test"]);
    for id in ["fetch", "deploy"] {
        let s = step(&run, id);
        assert_eq!(
            (s.status.as_str(), s.error.as_deref(), s.attempts),
            ("skipped", Some("not selected: --only build, test"), 0),
            "{id}"
        );
    }
    assert_eq!(step(&run, "build").status, "success");
    assert_eq!(step(&run, "test").status, "success");
    let attempts = attempts_by_step(&fleet, run.workflow_id).await?;
    assert_eq!(
        attempts.into_iter().collect::<Vec<_>>(),
        [
            ("build".to_string(), 1),
            ("deploy".to_string(), 0),
            ("fetch".to_string(), 0),
            ("test".to_string(), 1)
        ]
    );

    // --skip: the skipped step never runs; its dependents do.
    let (status, stdout, stderr) = fleet
        .cli(&["workflows", "execute", file, "--skip", "test", "--wait"])
        .await?;
    assert_eq!(status.code(), Some(0), "{stdout}\n{stderr}");
    let id: uuid::Uuid = stdout.lines().next().unwrap_or_default().trim().parse()?;
    let run = fleet.run(id).await?;
    assert_eq!(run.status, "success");
    assert_eq!(run.skip, ["test"]);
    for id in ["fetch", "build", "deploy"] {
        assert_eq!(step(&run, id).status, "success", "{id}");
    }
    assert_eq!(
        step(&run, "test").error.as_deref(),
        Some("skipped: --skip test")
    );
    assert_eq!(attempts_by_step(&fleet, id).await?["test"], 0);

    // `workflows status` and the history say so too.
    let ids = id.to_string();
    let (_, status_text, _) = fleet.cli(&["workflows", "status", &ids]).await?;
    assert!(
        status_text.contains("Subset    --skip test"),
        "{status_text}"
    );
    assert!(
        status_text.lines().any(|l| l.starts_with("test ")
            && l.contains("skipped")
            && l.contains("skipped: --skip test")),
        "{status_text}"
    );
    let (_, history, _) = fleet
        .cli(&["workflows", "history", &ids, "-o", "json"])
        .await?;
    let history: Value = serde_json::from_str(&history)?;
    assert_eq!(
        history["events"][0],
        json!({"at": history["events"][0]["at"], "actor": "flotilla", "action": "subset",
               "detail": {"only": [], "skip": ["test"]}})
    );
    std::fs::remove_dir_all(dir)?;
    fleet.stop().await
}
