#!/usr/bin/env python3
"""Plots the JSON lines of flotilla-bench.

    flotilla-bench --scenario fanout --steps 1000 >> results.jsonl
    flotilla-bench --scenario fanout --steps 10000 >> results.jsonl
    python3 services/bench/plot.py results.jsonl --out target/bench-plots

Writes two PNGs:
  throughput-vs-n.png      steps (or runs, commits) per second against the scenario's size N,
                           one line per scenario, from every line read;
  latency-percentiles.png  p50, p90, p99 and max of each scenario, from its last line read.

A figure taken with --quick sizes, or while the machine's load average exceeded half its
cores, is marked provisional in the plot's title.

Needs matplotlib (pip install matplotlib).
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_reports(paths):
    reports = []
    for path in paths:
        handle = sys.stdin if path == "-" else open(path, encoding="utf-8")
        with handle:
            for number, line in enumerate(handle, 1):
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    report = json.loads(line)
                except json.JSONDecodeError as error:
                    sys.exit(f"{path}:{number}: not a JSON line: {error}")
                if "scenario" not in report or "throughput" not in report:
                    sys.exit(f"{path}:{number}: not a flotilla-bench report")
                reports.append(report)
    return reports


def provisional(report):
    cores = report.get("machine", {}).get("cores") or 1
    load = report.get("load", {}).get("avg_1m", 0.0)
    return report.get("quick", False) or load > cores / 2


def subtitle(reports):
    machine = reports[-1].get("machine", {})
    dates = sorted(r.get("at", "") for r in reports)
    text = (
        f"{machine.get('cores', '?')} cores, {machine.get('model', '?')}, "
        f"{machine.get('memory_mb', 0) // 1024} GiB, kernel {machine.get('kernel', '?')}; "
        f"{dates[0][:10]}"
    )
    if any(provisional(r) for r in reports):
        loads = [r.get("load", {}).get("avg_1m", 0.0) for r in reports]
        text += f"\nPROVISIONAL: quick sizes or a loaded machine (load average up to {max(loads):.1f})"
    return text


def rate(report):
    """Steps per second where the scenario counts steps, else its own throughput."""
    return report.get("step_rate") or report["throughput"]


def plot_throughput(reports, out):
    series = defaultdict(dict)
    for report in reports:
        unit = "steps" if report.get("step_rate") else report["unit"]
        # A later line of the same size replaces an earlier one.
        series[(report["scenario"], unit)][report["n"]] = rate(report)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for (scenario, unit), points in sorted(series.items()):
        sizes = sorted(points)
        ax.plot(sizes, [points[n] for n in sizes], marker="o", label=f"{scenario} ({unit}/s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N (the scenario's size: steps, hops, runs, commits or requests)")
    ax.set_ylabel("per second")
    ax.set_title("Throughput against N\n" + subtitle(reports), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "throughput-vs-n.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_latency(reports, out):
    last = {}
    for report in reports:
        if report.get("latency"):
            last[report["scenario"]] = report
    if not last:
        return None
    names = list(last)
    percentiles = ["p50", "p90", "p99", "max"]
    width = 0.8 / len(percentiles)
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(names)), 5.5))
    for i, key in enumerate(percentiles):
        xs = [j + (i - 1.5) * width for j in range(len(names))]
        ax.bar(xs, [last[n]["latency"][key] for n in names], width, label=key)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("milliseconds")
    ax.set_title("Latency percentiles (what each times: the report's latency.of)\n" + subtitle(list(last.values())), fontsize=9)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "latency-percentiles.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="files of flotilla-bench JSON lines ('-': stdin)")
    parser.add_argument("--out", default="target/bench-plots", help="directory of the PNGs")
    args = parser.parse_args()
    reports = read_reports(args.files)
    if not reports:
        sys.exit("no flotilla-bench report in the input")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in (plot_throughput(reports, out), plot_latency(reports, out)):
        if path:
            print(path)


if __name__ == "__main__":
    main()
