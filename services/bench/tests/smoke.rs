//! The bench works: `flotilla-bench --quick` runs a few scenarios against the real RabbitMQ and
//! Postgres (a real fleet for the fleet scenarios) and prints one parseable JSON line each,
//! with fields that make sense. No timing is asserted: machines are noisy, and the targets are
//! checked by running the bench itself.
//!
//! The coordinator and echo worker binaries must be built first (`cargo build --bins`).

use std::process::Stdio;

use flotilla_bench::{Latency, Report};
use tokio::process::Command;

async fn bench(args: &[&str]) -> anyhow::Result<(Vec<Report>, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla-bench"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await?;
    let stdout = String::from_utf8(out.stdout)?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "flotilla-bench {args:?} exited with {}: {stderr}",
        out.status
    );
    let reports = stdout
        .lines()
        .map(|line| {
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{e}: not a report: {line}"))
        })
        .collect::<anyhow::Result<Vec<Report>>>()?;
    Ok((reports, stderr))
}

fn assert_ordered(scenario: &str, latency: &Latency) {
    assert!(latency.samples > 0, "{scenario}: no samples");
    assert!(
        latency.p50 >= 0.0
            && latency.p50 <= latency.p90
            && latency.p90 <= latency.p99
            && latency.p99 <= latency.max,
        "{scenario}: percentiles out of order: {latency:?}"
    );
}

fn assert_sane(report: &Report) {
    let scenario = &report.scenario;
    assert!(report.n > 0, "{scenario}: n is 0");
    assert!(
        report.throughput.is_finite() && report.throughput > 0.0,
        "{scenario}: throughput {}",
        report.throughput
    );
    assert!(
        report.elapsed_s > 0.0,
        "{scenario}: elapsed {}",
        report.elapsed_s
    );
    assert!(report.quick, "{scenario}: not marked quick");
    assert!(report.machine.cores > 0, "{scenario}: no cores");
    assert!(report.machine.memory_mb > 0, "{scenario}: no memory");
    assert!(!report.machine.kernel.is_empty(), "{scenario}: no kernel");
    assert!(!report.at.is_empty(), "{scenario}: no date");
}

#[tokio::test]
async fn quick_scenarios_print_one_sane_json_line_each() -> anyhow::Result<()> {
    let (reports, stderr) = bench(&[
        "--quick",
        "--scenario",
        "chain",
        "--scenario",
        "postgres-commit",
    ])
    .await?;
    let names: Vec<&str> = reports.iter().map(|r| r.scenario.as_str()).collect();
    // A fleet scenario brings the broker's ceiling along, first.
    assert_eq!(
        names,
        ["broker-roundtrip", "postgres-commit", "chain"],
        "stderr: {stderr}"
    );
    for report in &reports {
        assert_sane(report);
        let latency = report
            .latency
            .as_ref()
            .unwrap_or_else(|| panic!("{}: no latency", report.scenario));
        assert_ordered(&report.scenario, latency);
    }

    let broker = &reports[0];
    assert_eq!((broker.unit.as_str(), broker.n), ("steps", 200));
    let cpu = &broker.details["cpu"];
    assert!(
        cpu["ms_per_unit"]["rabbitmq"].as_f64() > Some(0.0),
        "RabbitMQ's CPU time per round trip: {cpu}"
    );
    assert!(broker.ratio_to_broker.is_none());

    let commits = &reports[1];
    assert_eq!(commits.unit, "commits");
    assert_eq!(commits.latency.as_ref().map(|l| l.samples), Some(100));

    let chain = &reports[2];
    assert_eq!((chain.unit.as_str(), chain.n), ("hops", 20));
    assert_eq!(chain.latency.as_ref().map(|l| l.samples), Some(20));
    let rss = chain.rss.as_ref().expect("the chain's fleet memory");
    assert!(rss.coordinator_mb.is_some_and(|mb| mb > 0.0), "{rss:?}");
    assert_eq!(rss.workers_mb.len(), 2, "{rss:?}");
    let written = &chain.details["rows_written"];
    assert!(
        written["tables"]["steps"]["updated"].as_i64() > Some(0)
            && written["per_attempt"].as_f64() > Some(0.0),
        "the rows the chain's fleet wrote: {written}"
    );
    // Where the machine's CPU went while the chain ran: the fleet's processes and the servers.
    let cpu = &chain.details["cpu"];
    for who in ["coordinator", "workers", "postgres", "rabbitmq"] {
        assert!(
            cpu["ms_per_unit"][who].as_f64() > Some(0.0),
            "{who}'s CPU time per hop: {cpu}"
        );
    }
    assert!(
        cpu["busy_share"]
            .as_f64()
            .is_some_and(|share| share > 0.0 && share <= 1.01),
        "{cpu}"
    );
    let ratio = chain
        .ratio_to_broker
        .as_ref()
        .expect("a ratio to the broker");
    assert!(
        ratio.latency_p50.is_some_and(|r| r > 0.0),
        "the chain's latency ratio: {ratio:?}"
    );
    Ok(())
}

#[tokio::test]
async fn the_broker_is_measured_with_the_window_asked_for() -> anyhow::Result<()> {
    let (reports, stderr) = bench(&[
        "--quick",
        "--scenario",
        "broker-roundtrip",
        "--in-flight",
        "5",
    ])
    .await?;
    assert_eq!(reports.len(), 1, "stderr: {stderr}");
    let broker = &reports[0];
    assert_sane(broker);
    assert_eq!(broker.details["in_flight"], 5);
    assert!(
        broker.details["cpu"]["ms_per_unit"]["rabbitmq"].as_f64() > Some(0.0),
        "{}",
        broker.details
    );
    Ok(())
}

#[tokio::test]
async fn an_unknown_scenario_is_refused_by_name() -> anyhow::Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla-bench"))
        .args(["--scenario", "fan-out"])
        .stdin(Stdio::null())
        .output()
        .await?;
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("fan-out") && stderr.contains("fanout"),
        "{stderr}"
    );
    Ok(())
}
