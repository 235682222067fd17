"""Deletes the queues earlier test runs left behind: named `test-…` and with no consumer.

A test that fails, or that kills its fleet on purpose, leaves its quorum queues; on a long-lived
RabbitMQ node hundreds of them pile up until the node stops answering handshakes. Run before the
suite. Needs `rabbitmqctl` to list the queues (skipped without it, e.g. when RabbitMQ runs in a
container) and pika to delete them.
"""

import os
import shutil
import subprocess
import sys

import pika

AMQP_URL = os.environ.get("FLOTILLA_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2f")


def log(message: str) -> None:
    print(f"\033[1m[queues]\033[0m {message}", file=sys.stderr)


def main() -> int:
    if shutil.which("rabbitmqctl") is None:
        log("no rabbitmqctl here; queues left by earlier test runs are not swept")
        return 0
    listed = subprocess.run(
        ["rabbitmqctl", "list_queues", "name", "consumers", "--no-table-headers", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    stale = []
    for line in listed.splitlines():
        name, _, consumers = line.rpartition("\t")
        if name.startswith("test-") and consumers.strip() == "0":
            stale.append(name)
    if not stale:
        return 0
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    for name in stale:
        channel.queue_delete(queue=name)
    connection.close()
    log(f"deleted {len(stale)} queues that earlier test runs left behind")
    return 0


if __name__ == "__main__":
    sys.exit(main())
