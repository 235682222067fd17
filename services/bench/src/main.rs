//! `flotilla-bench`: runs the benchmark scenarios against the configured RabbitMQ
//! (`FLOTILLA_TEST_AMQP`) and Postgres (`FLOTILLA_TEST_POSTGRES`) and prints one JSON line per
//! scenario on stdout. See BENCHMARKS.md.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use flotilla_bench::machine::{Load, Machine};
use flotilla_bench::{Report, SCENARIOS, Sizes, broker, fleet, is_fleet_scenario, postgres};

#[derive(Debug, Parser)]
#[command(
    name = "flotilla-bench",
    about = "Benchmarks of Flotilla against the bare broker"
)]
struct Args {
    /// A scenario to run (repeatable; default: all). A fleet scenario also runs
    /// broker-roundtrip, the ceiling it is compared with.
    #[arg(long = "scenario", value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(SCENARIOS))]
    scenarios: Vec<String>,
    /// Steps of fanout (and of the fan-out after history); round trips of broker-roundtrip.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    steps: Option<u64>,
    /// Echo worker processes.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    workers: Option<u64>,
    /// Round trips broker-roundtrip keeps in flight for its throughput (default 500): fewer
    /// measure the broker's cost per step at a lower rate, as a fleet loads it.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    in_flight: Option<u64>,
    /// Small sizes that only prove each scenario works (for CI).
    #[arg(long)]
    quick: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mut sizes = if args.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    if let Some(steps) = args.steps {
        sizes.steps = usize::try_from(steps).unwrap_or(usize::MAX);
    }
    if let Some(workers) = args.workers {
        sizes.workers = usize::try_from(workers).unwrap_or(1);
    }
    if let Some(in_flight) = args.in_flight {
        sizes.in_flight = usize::try_from(in_flight).unwrap_or(1);
    }
    let wanted: Vec<&str> = SCENARIOS
        .iter()
        .copied()
        .filter(|s| {
            args.scenarios.is_empty()
                || args.scenarios.iter().any(|w| w == s)
                || (*s == "broker-roundtrip" && args.scenarios.iter().any(|w| is_fleet_scenario(w)))
        })
        .collect();

    let machine = Machine::read();
    let mut broker_report: Option<Report> = None;
    let mut failed = false;
    for scenario in wanted {
        let load = Load::read();
        match run(scenario, &sizes).await {
            Ok(reports) => {
                for mut report in reports {
                    report.machine = machine.clone();
                    report.load = load.clone();
                    report.quick = args.quick;
                    report.at =
                        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                    if let Some(broker) = &broker_report
                        && is_fleet_scenario(scenario)
                    {
                        report.compare_with(broker);
                    }
                    print_line(&report);
                    if scenario == "broker-roundtrip" {
                        broker_report = Some(report);
                    }
                }
            }
            Err(error) => {
                eprintln!("error: scenario {scenario} failed: {error:#}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

async fn run(scenario: &str, sizes: &Sizes) -> anyhow::Result<Vec<Report>> {
    let one = |report: Report| vec![report];
    match scenario {
        "broker-roundtrip" => broker::roundtrip(sizes).await.map(one),
        "postgres-commit" => postgres::commit(sizes).await.map(one),
        "fanout" => {
            fleet::with_bench(scenario, sizes, async |b| {
                fleet::fanout(b, "fanout", sizes.steps).await.map(one)
            })
            .await
        }
        "chain" => {
            fleet::with_bench(scenario, sizes, async |b| {
                fleet::chain(b, "chain", sizes.chain).await.map(one)
            })
            .await
        }
        "many-runs" => {
            fleet::with_bench(scenario, sizes, async |b| {
                fleet::many_runs(b, sizes.runs).await.map(one)
            })
            .await
        }
        "submit-latency" => {
            fleet::with_bench(scenario, sizes, async |b| {
                fleet::submit_latency(b, sizes).await.map(one)
            })
            .await
        }
        "memory" => {
            fleet::with_bench(scenario, sizes, async |b| {
                fleet::memory(b, sizes.memory_runs).await.map(one)
            })
            .await
        }
        "history" => {
            fleet::with_bench(scenario, sizes, async |b| fleet::history(b, sizes).await).await
        }
        "scaling" => {
            // One worker to start with; the scenario adds the others.
            let first = Sizes {
                workers: 1,
                concurrency: sizes.scaling_concurrency,
                ..*sizes
            };
            fleet::with_bench(scenario, &first, async |b| {
                fleet::scaling(b, sizes.scaling_steps, sizes.scaling_concurrency).await
            })
            .await
        }
        other => anyhow::bail!("unknown scenario {other}"),
    }
}

fn print_line(report: &Report) {
    let line = serde_json::to_string(report).expect("a report serialises");
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}
