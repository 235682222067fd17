#!/usr/bin/env python3
"""A Flotilla agent in Python: serves the queues of the agents it is given with these actions.

- `describe`: count, sum and mean of the numbers in the step's `numbers` param, or else of the
  `numbers` of every step it depends on (its inputs).
- `sleep`: waits `ms` milliseconds (a param), then answers `{"slept_ms": ms}`.

Any other action fails at once (`retryable: false`). Settings come from flags or the same
environment variables as the Rust workers (`python worker.py --help`).

Exit codes: 0 after a graceful shutdown (SIGTERM or Ctrl-C), 130 when a second signal cuts it
short, 2 when it cannot start (invalid settings, RabbitMQ unreachable or refusing its queues),
1 when RabbitMQ is lost while running (the supervisor starts it again).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import pika.exceptions

from flotilla_worker import Config, TaskFailure, Worker


def describe(task: dict) -> dict:
    numbers = task["params"].get("numbers")
    if numbers is None:
        numbers = [
            n
            for output in task["inputs"].values()
            if isinstance(output, dict)
            for n in output.get("numbers", [])
        ]
    if not isinstance(numbers, list) or not all(
        isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers
    ):
        raise TaskFailure("describe: `numbers` must be a list of numbers", retryable=False)
    total = sum(numbers)
    return {
        "count": len(numbers),
        "sum": total,
        "mean": total / len(numbers) if numbers else None,
    }


def sleep(task: dict) -> dict:
    ms = task["params"].get("ms", 0)
    if not isinstance(ms, int) or isinstance(ms, bool) or ms < 0:
        raise TaskFailure("sleep: `ms` must be a non-negative integer", retryable=False)
    time.sleep(ms / 1000)
    return {"slept_ms": ms}


HANDLERS = {"describe": describe, "sleep": sleep}


def parse_args(argv: list[str]) -> Config:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--agent",
        dest="agents",
        action="append",
        help="an agent whose queue to serve; repeat for several [env FLOTILLA_AGENTS, comma-separated]",
    )
    parser.add_argument("--concurrency", type=int, default=int(env("FLOTILLA_CONCURRENCY", "4")),
                        help="tasks run at once at most, and the prefetch [env FLOTILLA_CONCURRENCY, default 4]")
    parser.add_argument("--amqp-url", default=env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
                        help="the RabbitMQ URL [env AMQP_URL]")
    parser.add_argument("--queue-prefix", default=env("FLOTILLA_QUEUE_PREFIX", "flotilla"),
                        help="prefix of the queue names; must match the coordinator's [env FLOTILLA_QUEUE_PREFIX]")
    parser.add_argument("--worker-id", default=env("FLOTILLA_WORKER_ID"),
                        help="names this worker in results and heartbeats [env FLOTILLA_WORKER_ID, default host-pid-random]")
    parser.add_argument("--heartbeat-interval-ms", type=int,
                        default=int(env("FLOTILLA_HEARTBEAT_INTERVAL_MS", "5000")),
                        help="milliseconds between heartbeats [env FLOTILLA_HEARTBEAT_INTERVAL_MS]")
    parser.add_argument("--shutdown-grace-secs", type=float,
                        default=float(env("FLOTILLA_SHUTDOWN_GRACE_SECS", "30")),
                        help="seconds a shutdown waits for tasks in progress [env FLOTILLA_SHUTDOWN_GRACE_SECS]")
    parser.add_argument("--label", dest="labels", action="append",
                        help="a KEY=VALUE label describing this worker in the registry; repeat for several "
                             "[env FLOTILLA_WORKER_LABELS, comma-separated]")
    parser.add_argument("--delivery-limit", type=int, default=int(env("FLOTILLA_DELIVERY_LIMIT", "5")),
                        help="x-delivery-limit of the agent queues; must match the coordinator's [env FLOTILLA_DELIVERY_LIMIT]")
    args = parser.parse_args(argv)
    agents = args.agents or [a for a in env("FLOTILLA_AGENTS", "").split(",")]
    labels = {}
    for label in args.labels or [l for l in env("FLOTILLA_WORKER_LABELS", "").split(",") if l.strip()]:
        key, sep, value = label.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"label: expected KEY=VALUE, not `{label}`")
        labels[key.strip()] = value.strip()
    config = Config(
        agents=[a.strip() for a in agents if a.strip()],
        labels=labels,
        amqp_url=args.amqp_url,
        prefix=args.queue_prefix,
        concurrency=args.concurrency,
        heartbeat_interval=args.heartbeat_interval_ms / 1000,
        shutdown_grace=args.shutdown_grace_secs,
        delivery_limit=args.delivery_limit,
    )
    if args.worker_id:
        config.worker_id = args.worker_id
    return config


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pika logs every connection step at INFO.
    logging.getLogger("pika").setLevel(logging.WARNING)
    try:
        config = parse_args(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    worker = Worker(config, HANDLERS)
    worker.install_signal_handlers()
    try:
        worker.run()
    except pika.exceptions.AMQPConnectionError as error:
        # Raised by the first connect as well as by a loss later on.
        logging.error("rabbitmq: %r", error)
        return 1 if worker.started else 2
    except pika.exceptions.ChannelClosedByBroker as error:
        logging.error("rabbitmq refused: %s", error)
        return 1 if worker.started else 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
