//! The fault tests' audit must see what it is there to see: a step completed twice, a step
//! lost, a run that did not end, a message left in the outbox or on a queue. Here each is made
//! by hand in a fleet's database and queues after a clean run.

use std::time::Duration;

use flotilla_tests::audit::{self, Expected, Figures};
use flotilla_tests::workload::Workflow;
use flotilla_tests::{Fleet, amqp_url};
use serde_json::json;
use uuid::Uuid;

#[tokio::test]
async fn the_audit_sees_lost_and_double_completed_steps_and_leftovers() -> anyhow::Result<()> {
    let mut fleet = Fleet::new();
    fleet.start_coordinator().await?;
    fleet.start_echo("echo-a", &["audited"], 2)?;
    let workflow = Workflow::fan_out("audited", "audited", 3, |_| 5);
    let run = fleet.execute_yaml(&workflow.yaml(), json!({})).await?;
    fleet.wait_for_end(run, Duration::from_secs(60)).await?;

    let mut expected = Expected {
        runs: vec![run],
        steps: workflow.len(),
        ..Expected::default()
    };
    let clean = audit::audit(&mut fleet, &expected, Duration::from_secs(30)).await?;
    assert!(clean.problems().is_empty(), "{:?}", clean.problems());
    assert_eq!(
        (clean.steps, clean.lost(), clean.double_completed()),
        (3, 0, 0)
    );

    // s0 completed twice, s1 never; a run that never was; a message committed and never sent;
    // a task nobody took.
    let db = fleet.db().await?;
    db.execute(
        "INSERT INTO attempts (run_id, idx, attempt, task_id, status, dispatched_at)
         SELECT run_id, idx, attempt + 1, $2, 'success', dispatched_at
         FROM attempts WHERE run_id = $1 AND idx = 0",
        &[&run, &Uuid::new_v4()],
    )
    .await?;
    db.execute(
        "UPDATE attempts SET status = 'failure' WHERE run_id = $1 AND idx = 1",
        &[&run],
    )
    .await?;
    db.execute(
        "INSERT INTO outbox (id, routing_key, kind, body, created_at)
         VALUES ($1, 'nowhere', 'task', '\\x7b7d', now())",
        &[&Uuid::new_v4()],
    )
    .await?;
    let phantom = Uuid::new_v4();
    expected.runs.push(phantom);
    let connection = flotilla_broker::connect(
        &flotilla_broker::BrokerConfig::new(amqp_url()),
        "flotilla-tests",
    )
    .await?;
    let publisher = flotilla_broker::Publisher::new(&connection).await?;
    let queue = fleet.queue_names().agent("audited");
    publisher
        .publish_one(&flotilla_broker::OutgoingMessage::new(
            queue.clone(),
            "task",
            b"{}".to_vec(),
        ))
        .await?;
    connection.close().await?;

    let found = audit::audit(&mut fleet, &expected, Duration::ZERO).await?;
    assert_eq!(found.double_completed(), 1, "{:?}", found.double_completed);
    assert_eq!(found.double_completed[0].step_id, "s0");
    assert_eq!(found.lost.len(), 1, "{:?}", found.lost);
    assert_eq!(found.lost[0].step_id, "s1");
    assert_eq!(found.stuck_runs, [phantom]);
    assert_eq!(found.lost(), 2, "one step and one run");
    assert_eq!(found.outbox, 1);
    assert_eq!(found.queues, [(queue, 1)]);
    assert_eq!(found.problems().len(), 6, "{:#?}", found.problems());

    let figures = Figures::new("audit-self-test", &found, 2, Duration::from_millis(1_234));
    assert_eq!(
        figures.to_string(),
        "audit-self-test: 3 steps, 2 faults, lost 2, double-completed 1, seconds 1.2"
    );
    fleet.cleanup().await
}
