//! Sub-workflows against the real services: a step that runs a registered definition as a run of
//! its own, with the coordinator, echo workers and the CLI as separate processes and the real
//! Postgres and RabbitMQ.

use std::time::Duration;

use flotilla_api_model::WorkflowResult;
use flotilla_tests::workload::eventually;
use flotilla_tests::{Fleet, Launch, step};
use serde_json::{Value, json};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

/// Registers a definition given as YAML; fails unless it is accepted.
async fn register(fleet: &Fleet, yaml: &str) -> anyhow::Result<()> {
    let (status, body) = fleet
        .post_on(0, "/api/definitions", json!({ "yaml": yaml }))
        .await?;
    anyhow::ensure!(status == 201, "register answered {status}: {body}");
    Ok(())
}

/// Waits until `condition` holds for run `id`, and returns the run.
async fn wait_for(
    fleet: &Fleet,
    id: Uuid,
    what: &str,
    condition: impl Fn(&WorkflowResult) -> bool,
) -> anyhow::Result<WorkflowResult> {
    eventually(WAIT, what, || async {
        let run = fleet.run(id).await?;
        Ok(condition(&run).then_some(run))
    })
    .await
}

/// The child run a sub-workflow step's latest attempt started.
fn child_of(run: &WorkflowResult, step_id: &str) -> Uuid {
    step(run, step_id)
        .child_workflow_id
        .unwrap_or_else(|| panic!("step {step_id} names no child run: {run:?}"))
}

/// A fleet with one coordinator and an echo worker serving the agent `sub`, logging what it
/// does.
async fn fleet_with(fleet: Fleet) -> anyhow::Result<Fleet> {
    let mut fleet = fleet;
    fleet.start_coordinator().await?;
    fleet.start_worker(
        "echo-sub",
        &["sub"],
        4,
        Launch::once().env("RUST_LOG", "info"),
    )?;
    Ok(fleet)
}

/// The child's outputs, by step id, are its parent step's output: a later step of the parent
/// reads them through a template. Each run names the other in the API and the CLI. A `for_each`
/// workflow step starts a child per item.
#[tokio::test]
async fn a_child_run_s_outputs_are_its_parent_step_s_output() -> anyhow::Result<()> {
    let fleet = fleet_with(Fleet::new()).await?;
    register(
        &fleet,
        "name: greet\nsteps:\n  - {id: hello, agent: sub, action: hi, params: {who: \"${{ params.who }}\"}}\n",
    )
    .await?;
    let id = fleet
        .execute_yaml(
            "name: parent\nsteps:\n  - {id: call, workflow: greet, params: {who: \"${{ params.name }}\"}}\n  - {id: after, agent: sub, action: use, params: {got: \"${{ steps.call.output.hello.who }}\"}}\n",
            json!({"name": "ada"}),
        )
        .await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "success", "{run:?}");
    let call = step(&run, "call");
    assert_eq!(call.workflow.as_deref(), Some("greet"));
    assert_eq!(call.output.as_ref().unwrap()["hello"]["who"], "ada");
    assert_eq!(step(&run, "after").output.as_ref().unwrap()["got"], "ada");

    let child = fleet.run(child_of(&run, "call")).await?;
    assert_eq!(
        (child.name.as_str(), child.status.as_str()),
        ("greet", "success")
    );
    let parent = child.parent.as_ref().expect("the child names its parent");
    assert_eq!((parent.workflow_id, parent.step_id.as_str()), (id, "call"));
    assert_eq!(child.params["who"], "ada");

    let (status, stdout, stderr) = fleet.cli(&["workflows", "status", &id.to_string()]).await?;
    assert!(status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("workflow greet: run {}", child.workflow_id)),
        "{stdout}"
    );
    let (status, stdout, stderr) = fleet
        .cli(&["workflows", "status", &child.workflow_id.to_string()])
        .await?;
    assert!(status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("Parent    {id} (step call)")),
        "{stdout}"
    );

    // A `for_each` workflow step runs one child per item; its output lists theirs.
    let id = fleet
        .execute_yaml(
            "name: fan\nsteps:\n  - {id: each, workflow: greet, for_each: \"${{ params.names }}\", params: {who: \"${{ item }}\"}}\n",
            json!({"names": ["ada", "bob"]}),
        )
        .await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "success", "{run:?}");
    let whos: Vec<&Value> = step(&run, "each")
        .output
        .as_ref()
        .and_then(Value::as_array)
        .expect("a list of the children's outputs")
        .iter()
        .map(|o| &o["hello"]["who"])
        .collect();
    assert_eq!(whos, [&json!("ada"), &json!("bob")]);
    let second = fleet.run(child_of(&run, "each[1]")).await?;
    let parent = second
        .parent
        .expect("the instance's child names its parent");
    assert_eq!(
        (parent.workflow_id, parent.step_id.as_str()),
        (id, "each[1]")
    );
    fleet.stop().await
}

/// Registers `breaks`, a workflow whose one step always fails, runs `parent` (which runs it) to
/// its end, and checks that it failed.
async fn run_over_a_failing_child(fleet: &Fleet, parent: &str) -> anyhow::Result<WorkflowResult> {
    register(
        fleet,
        "name: breaks\nsteps:\n  - {id: boom, agent: sub, action: x, params: {fail_attempts: 9}}\n",
    )
    .await?;
    let id = fleet.execute_yaml(parent, json!({})).await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    anyhow::ensure!(run.status == "failure", "the parent did not fail: {run:?}");
    Ok(run)
}

/// A child that fails fails its parent's step with an error naming the child run and its failed
/// step; the parent's failure handler runs.
#[tokio::test]
async fn a_failing_child_fails_its_parent_whose_failure_handler_runs() -> anyhow::Result<()> {
    let fleet = fleet_with(Fleet::new()).await?;
    let run = run_over_a_failing_child(
        &fleet,
        "name: parent\nsteps:\n  - {id: call, workflow: breaks}\n  - {id: never, agent: sub, action: y}\nerror_handling:\n  on_failure: [{id: cleanup, agent: sub, action: clean}]\n",
    )
    .await?;
    let child = child_of(&run, "call");
    let call = step(&run, "call");
    assert_eq!(call.status, "failure");
    let error = call.error.as_deref().unwrap_or_default();
    assert!(
        error.contains(&format!("sub-workflow run {child} (breaks) failed"))
            && error.contains("step `boom` failed"),
        "{error}"
    );
    assert_eq!(step(&run, "never").status, "skipped");
    assert_eq!(step(&run, "cleanup").status, "success");
    assert_eq!(fleet.run(child).await?.status, "failure");
    fleet.stop().await
}

/// Each attempt of a sub-workflow step starts a child of its own; the step names the latest.
#[tokio::test]
async fn a_retry_of_the_parent_step_starts_a_new_child() -> anyhow::Result<()> {
    let fleet = fleet_with(Fleet::new()).await?;
    let run = run_over_a_failing_child(
        &fleet,
        "name: parent\nsteps:\n  - {id: call, workflow: breaks, retry: {max_attempts: 2, delay: 0s}}\n",
    )
    .await?;
    let id = run.workflow_id;
    assert_eq!(step(&run, "call").attempts, 2);
    let db = fleet.db().await?;
    let children: Vec<(Uuid, i32, String)> = db
        .query(
            "SELECT id, parent_attempt, status FROM runs WHERE parent_run_id = $1 ORDER BY parent_attempt",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let attempts: Vec<(i32, &str)> = children.iter().map(|c| (c.1, c.2.as_str())).collect();
    assert_eq!(attempts, [(1, "failure"), (2, "failure")]);
    assert_eq!(children[1].0, child_of(&run, "call"));
    // Each child's id is the task id of the attempt that started it.
    let task_ids: Vec<Uuid> = db
        .query(
            "SELECT task_id FROM attempts WHERE run_id = $1 ORDER BY attempt",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(task_ids, [children[0].0, children[1].0]);
    fleet.stop().await
}

/// Cancelling the parent cancels its running child, whose worker is told to stop; a parent
/// step's timeout does the same to its child.
#[tokio::test]
async fn cancelling_the_parent_or_timing_out_its_step_cancels_the_child() -> anyhow::Result<()> {
    let fleet = Fleet::new();
    let logs = flotilla_tests::target_dir()
        .join("subflows-logs")
        .join(fleet.queue_names().prefix());
    let fleet = fleet_with(fleet.log_to(&logs)?).await?;
    register(
        &fleet,
        "name: naps\nsteps:\n  - {id: nap, agent: sub, action: sleep, params: {sleep_ms: 60000}}\n",
    )
    .await?;

    let id = fleet
        .execute_yaml(
            "name: parent\nsteps:\n  - {id: call, workflow: naps}\n",
            json!({}),
        )
        .await?;
    let run = wait_for(&fleet, id, "the child starts", |run| {
        step(run, "call").child_workflow_id.is_some()
    })
    .await?;
    let child = child_of(&run, "call");
    wait_for(&fleet, child, "the child's step runs", |run| {
        step(run, "nap").status == "running"
    })
    .await?;
    let (status, stdout, stderr) = fleet.cli(&["workflows", "cancel", &id.to_string()]).await?;
    assert!(status.success(), "{stdout}{stderr}");
    // Cancelled in the parent's transaction: no waiting needed.
    let child_run = fleet.run(child).await?;
    assert_eq!(
        (
            child_run.status.as_str(),
            step(&child_run, "nap").status.as_str()
        ),
        ("cancelled", "cancelled")
    );
    eventually(WAIT, "the worker stops the child's step", || async {
        Ok((fleet.count_in_logs("echo-sub", "task cancelled") > 0).then_some(()))
    })
    .await?;
    assert_eq!(fleet.run(id).await?.status, "cancelled");

    let id = fleet
        .execute_yaml(
            "name: impatient\nsteps:\n  - {id: call, workflow: naps, timeout: 1s}\n",
            json!({}),
        )
        .await?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    let call = step(&run, "call");
    assert_eq!(call.status, "failure", "{run:?}");
    assert!(
        call.error
            .as_deref()
            .unwrap_or_default()
            .contains("timed out"),
        "{call:?}"
    );
    let child_run = fleet.run(child_of(&run, "call")).await?;
    assert_eq!(child_run.status, "cancelled", "{child_run:?}");
    fleet.stop().await
}

/// A definition whose step names an unregistered workflow is refused, naming the step and the
/// name, and nothing is stored; a definition may name itself.
#[tokio::test]
async fn an_unregistered_workflow_name_is_refused_and_nothing_is_stored() -> anyhow::Result<()> {
    let fleet = fleet_with(Fleet::new()).await?;
    let yaml = "name: parent\nsteps:\n  - {id: call, workflow: nowhere}\n";
    for (path, body) in [
        ("/api/definitions", json!({ "yaml": yaml })),
        ("/api/workflows/execute", json!({ "yaml": yaml })),
    ] {
        let (status, answer) = fleet.post_on(0, path, body).await?;
        assert_eq!(status, 400, "{path}: {answer}");
        assert_eq!(
            answer["error"]["code"], "invalid_definition",
            "{path}: {answer}"
        );
        assert_eq!(
            answer["error"]["details"]["problems"],
            json!(["step `call`: workflow `nowhere` is not a registered definition"]),
            "{path}: {answer}"
        );
    }
    let (status, answer) = fleet
        .post_on(
            0,
            "/api/definitions",
            json!({"yaml": "name: versioned\nsteps:\n  - {id: call, workflow: versioned, version: 7}\n"}),
        )
        .await?;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer
            .to_string()
            .contains("workflow `versioned` has no version or revision `7`"),
        "{answer}"
    );
    let db = fleet.db().await?;
    let stored: i64 = db
        .query_one(
            "SELECT (SELECT count(*) FROM definitions) + (SELECT count(*) FROM runs)",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(stored, 0);
    fleet.stop().await
}

/// A workflow that runs itself nests until the depth limit, where the step that would go deeper
/// fails with the reason; every level then fails, and nothing runs on.
#[tokio::test]
async fn a_recursive_workflow_stops_at_the_depth_limit() -> anyhow::Result<()> {
    let fleet =
        fleet_with(Fleet::new().coordinator_env("FLOTILLA_MAX_WORKFLOW_DEPTH", "3")).await?;
    register(
        &fleet,
        "name: again\nsteps:\n  - {id: deeper, workflow: again}\n",
    )
    .await?;
    let (status, answer) = fleet
        .post_on(0, "/api/workflows/execute", json!({"workflow": "again"}))
        .await?;
    assert_eq!(status, 202, "{answer}");
    let id: Uuid = answer["workflowId"].as_str().unwrap().parse()?;
    let run = fleet.wait_for_end(id, WAIT).await?;
    assert_eq!(run.status, "failure");
    let error = step(&run, "deeper").error.clone().unwrap_or_default();
    assert!(
        error.contains(
            "sub-workflow `again` not started: it would nest 4 deep; at most 3 levels are allowed (FLOTILLA_MAX_WORKFLOW_DEPTH)"
        ),
        "{error}"
    );
    let db = fleet.db().await?;
    let runs: Vec<(i32, String)> = db
        .query("SELECT depth, status FROM runs ORDER BY depth", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let failed = |depth| (depth, "failure".to_string());
    assert_eq!(runs, [failed(0), failed(1), failed(2), failed(3)]);
    fleet.stop().await
}
