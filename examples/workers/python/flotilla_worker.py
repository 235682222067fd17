"""Serves Flotilla agents from RabbitMQ over the wire protocol of proto/README.md, with pika.

One thread owns the connection (pika's BlockingConnection is not thread-safe): it consumes the
agent queues, publishes results and heartbeats, and acks. The worker registers with the
coordinators' registry when it starts and deregisters once drained. Handlers run on a pool of
`concurrency` threads and hand their outcome back to the connection's thread with
`add_callback_threadsafe`. The prefetch of each agent queue equals the pool's size (quorum
queues have no prefetch shared across consumers), so a worker of several agents may hold more
deliveries than it runs: they wait for a thread, and a shutdown gives them back unstarted.

Losing the connection ends `Worker.run` with the error: the tasks it held unacked are requeued by
RabbitMQ, and the process supervisor (systemd, Compose, Kubernetes) starts the worker again.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import pika
import pika.exceptions

PROTOCOL_VERSION = 1
LOG = logging.getLogger("flotilla.worker")

# The least time between two heartbeats: a busy worker does not turn every task into one.
HEARTBEAT_MIN_GAP = 0.25
# How often the connection's thread looks at the shutdown flag while idle.
POLL_SECONDS = 0.2

TASK_FIELDS = {
    "task_id": str,
    "run_id": str,
    "step_id": str,
    "attempt": int,
    "agent": str,
    "action": str,
    "idempotency_key": str,
    "dispatched_at": str,
}


class TaskFailure(Exception):
    """Raised by a handler: the attempt fails with `message`. `retryable=False` when another
    attempt cannot help, so the step fails at once."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.message = message
        self.retryable = retryable


Handler = Callable[[dict], Any]


@dataclass
class Config:
    agents: list[str]
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2f"
    prefix: str = "flotilla"
    concurrency: int = 4
    worker_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )
    heartbeat_interval: float = 5.0
    shutdown_grace: float = 30.0
    delivery_limit: int = 5
    # Describe the worker in the registry (`flotilla agents list`), e.g. {"region": "eu"}.
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not self.agents:
            raise ValueError("no agent to serve")
        if not 1 <= self.concurrency <= 65535:
            raise ValueError(f"concurrency must be between 1 and 65535, not {self.concurrency}")
        if self.heartbeat_interval <= 0:
            raise ValueError("heartbeat interval must be above zero")


def now() -> str:
    """RFC 3339 in UTC, as the schemas' `date-time`."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def decode_task(body: bytes) -> dict:
    """The task a body carries; ValueError naming the fault when it is not one."""
    try:
        task = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not JSON: {error}") from None
    if not isinstance(task, dict):
        raise ValueError("not a JSON object")
    if task.get("type") != "task" or task.get("v") != PROTOCOL_VERSION:
        raise ValueError(f"not a task of version {PROTOCOL_VERSION}: type {task.get('type')!r}, v {task.get('v')!r}")
    for name, kind in TASK_FIELDS.items():
        value = task.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"field `{name}` missing or not a {kind.__name__}")
    for name in ("params", "run_params", "inputs"):
        value = task.setdefault(name, {})
        if not isinstance(value, dict):
            raise ValueError(f"field `{name}` is not an object")
    return task


def result_message(task: dict, worker_id: str, started_at: str, outcome: Any, failure: TaskFailure | None) -> dict:
    """The result of one attempt (schemas/result.v1.json)."""
    result = {
        "type": "result",
        "v": PROTOCOL_VERSION,
        "task_id": task["task_id"],
        "run_id": task["run_id"],
        "step_id": task["step_id"],
        "attempt": task["attempt"],
        "worker_id": worker_id,
        "started_at": started_at,
        "finished_at": now(),
    }
    if failure is None:
        result["status"] = "success"
        result["output"] = outcome
    else:
        result["status"] = "failure"
        result["error"] = {"message": failure.message, "retryable": failure.retryable}
    return result


def heartbeat_message(config: Config, held: list[dict]) -> dict:
    """A heartbeat (schemas/heartbeat.v1.json) listing the tasks in progress."""
    return {
        "type": "heartbeat",
        "v": PROTOCOL_VERSION,
        "worker_id": config.worker_id,
        "agents": list(config.agents),
        "concurrency": config.concurrency,
        "tasks": held,
        "sent_at": now(),
    }


def registration_message(config: Config, actions: list[str], started_at: str) -> dict:
    """A registration (schemas/registration.v1.json): the worker announcing itself."""
    return {
        "type": "registration",
        "v": PROTOCOL_VERSION,
        "worker_id": config.worker_id,
        "agents": list(config.agents),
        "actions": sorted(actions),
        "sdk": f"python-pika/{pika.__version__}",
        "concurrency": config.concurrency,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "labels": dict(config.labels),
        "started_at": started_at,
        "sent_at": now(),
    }


def deregistration_message(config: Config) -> dict:
    """A deregistration (schemas/deregistration.v1.json): the worker's goodbye."""
    return {
        "type": "deregistration",
        "v": PROTOCOL_VERSION,
        "worker_id": config.worker_id,
        "sent_at": now(),
    }


def agent_queue_arguments(prefix: str, delivery_limit: int) -> dict:
    """The arguments every process declares an agent queue with; they must match exactly."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": f"{prefix}.dead",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


class Worker:
    """Serves `handlers` (action name -> function of the task returning its output) for the
    agents of `config`. An action without a handler fails with `retryable: false`."""

    def __init__(self, config: Config, handlers: dict[str, Handler]):
        self.config = config
        self.handlers = handlers
        self._stopping = False
        # Set once consuming: an error after that is a loss of RabbitMQ, not a failed start.
        self.started = False
        # The tasks in progress by delivery tag; touched by the connection's thread only.
        self._held: dict[int, dict] = {}
        self._last_beat = 0.0
        # Tasks of high-priority queues first (rank 0), then in arrival order (the counter).
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._arrivals = itertools.count()

    # Signals -------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT start a graceful shutdown; a second one exits at once."""

        def on_signal(signum, _frame):
            if self._stopping:
                LOG.warning("second signal: exiting without draining")
                os._exit(130)
            LOG.info("signal %s: shutting down", signal.Signals(signum).name)
            self._stopping = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    # Running -------------------------------------------------------------------------------

    def run(self) -> None:
        """Serves until a shutdown request, then drains. Raises when RabbitMQ cannot be reached
        or is lost."""
        params = pika.URLParameters(self.config.amqp_url)
        params.client_properties = {"connection_name": f"flotilla-worker {self.config.worker_id}"}
        self._connection = pika.BlockingConnection(params)
        try:
            self._serve()
        finally:
            if self._connection.is_open:
                self._connection.close()

    def _serve(self) -> None:
        connection = self._connection
        self._publisher = connection.channel()
        self._publisher.confirm_delivery()
        self._declare(self._publisher)
        self._consumer = connection.channel()
        self._consumer.basic_qos(prefetch_count=self.config.concurrency)
        for _ in range(self.config.concurrency):
            threading.Thread(target=self._run_jobs, daemon=True).start()
        tags = [
            self._consumer.basic_consume(
                queue_name,
                self._on_delivery,
                auto_ack=False,
                consumer_tag=f"{self.config.worker_id}.{queue_name}",
            )
            for agent in self.config.agents
            for queue_name in self._queues(agent)
        ]
        LOG.info(
            "worker started: worker_id=%s agents=%s concurrency=%d prefix=%s",
            self.config.worker_id,
            ",".join(self.config.agents),
            self.config.concurrency,
            self.config.prefix,
        )
        self.started = True
        self._to_registry(registration_message(self.config, list(self.handlers), now()))
        self._beat()
        while not self._stopping:
            connection.process_data_events(time_limit=POLL_SECONDS)

        # Drain: no new task; pika requeues what arrives before the cancel is confirmed, and the
        # deliveries still waiting for a thread go back to their queues unstarted.
        for tag in tags:
            self._consumer.basic_cancel(tag)
        while True:
            try:
                _, _, tag, *_ = self._jobs.get_nowait()
            except queue.Empty:
                break
            self._consumer.basic_nack(tag, requeue=True)
            del self._held[tag]
        LOG.info("draining %d tasks in progress", len(self._held))
        deadline = time.monotonic() + self.config.shutdown_grace
        while self._held and time.monotonic() < deadline:
            connection.process_data_events(time_limit=POLL_SECONDS)
        if self._held:
            # Closing the connection hands them back to RabbitMQ, which redelivers them.
            LOG.warning("shutdown grace expired; abandoning %d tasks in progress", len(self._held))
        self._to_registry(deregistration_message(self.config))
        LOG.info("worker stopped: worker_id=%s", self.config.worker_id)

    def _queues(self, agent: str) -> list[str]:
        """The agent's queue and its twin of high-priority tasks (this worker routes by no
        label, so it consumes no label set's queue)."""
        own = f"{self.config.prefix}.agent.{agent}"
        return [own, f"{own}:high"]

    def _declare(self, channel) -> None:
        prefix = self.config.prefix
        quorum = {"x-queue-type": "quorum"}
        channel.queue_declare(f"{prefix}.results", durable=True, arguments=quorum)
        channel.queue_declare(f"{prefix}.dead", durable=True, arguments=quorum)
        channel.queue_declare(
            f"{prefix}.heartbeats", durable=True, arguments={**quorum, "x-message-ttl": 60000}
        )
        for agent in self.config.agents:
            for queue_name in self._queues(agent):
                channel.queue_declare(
                    queue_name,
                    durable=True,
                    arguments=agent_queue_arguments(prefix, self.config.delivery_limit),
                )

    def _publish(self, routing_key: str, kind: str, body: dict, correlation_id: str | None = None) -> None:
        """Publishes and waits for the broker's confirm; raises NackError or UnroutableError
        when it was refused or returned."""
        self._publisher.basic_publish(
            exchange="",
            routing_key=routing_key,
            body=json.dumps(body).encode(),
            properties=pika.BasicProperties(
                content_type="application/json",
                delivery_mode=pika.DeliveryMode.Persistent,
                type=kind,
                correlation_id=correlation_id,
                message_id=str(uuid.uuid4()),
            ),
            mandatory=True,
        )

    # Tasks ---------------------------------------------------------------------------------

    def _on_delivery(self, channel, method, properties, body) -> None:
        try:
            task = decode_task(body)
        except ValueError as error:
            LOG.error("undecodable task on %s; dead-lettering it: %s", method.routing_key, error)
            channel.basic_nack(method.delivery_tag, requeue=False)
            return
        started_at = now()
        tag = method.delivery_tag
        reply_to = properties.reply_to or f"{self.config.prefix}.results"
        self._held[tag] = {k: task[k] for k in ("task_id", "run_id", "step_id", "attempt")}
        # The lease starts at once rather than at the next regular heartbeat.
        if time.monotonic() - self._last_beat >= HEARTBEAT_MIN_GAP:
            self._send_heartbeat()
        rank = 0 if method.routing_key.endswith(":high") else 1
        self._jobs.put((rank, next(self._arrivals), tag, task, reply_to, started_at))

    def _run_jobs(self) -> None:
        while True:
            _, _, tag, task, reply_to, started_at = self._jobs.get()
            output, failure = None, None
            handler = self.handlers.get(task["action"])
            if handler is None:
                failure = TaskFailure(
                    f"no handler for action `{task['action']}` of agent `{task['agent']}` "
                    f"on worker {self.config.worker_id}",
                    retryable=False,
                )
            else:
                try:
                    output = handler(task)
                except TaskFailure as error:
                    failure = error
                except Exception as error:  # a bug in a handler is a retryable failure
                    LOG.exception("handler of %s raised", task["action"])
                    failure = TaskFailure(f"handler raised {type(error).__name__}: {error}")
            result = result_message(task, self.config.worker_id, started_at, output, failure)
            self._connection.add_callback_threadsafe(
                lambda: self._report(tag, reply_to, result)
            )

    def _report(self, tag: int, reply_to: str, result: dict) -> None:
        """Publishes the result with a confirm, then acks the task; requeues it when the result
        was refused, so that it runs again."""
        try:
            self._publish(reply_to, "result", result, correlation_id=result["task_id"])
        except (pika.exceptions.NackError, pika.exceptions.UnroutableError) as error:
            LOG.error("could not publish a result to %s; requeueing the task: %r", reply_to, error)
            self._consumer.basic_nack(tag, requeue=True)
        else:
            self._consumer.basic_ack(tag)
        del self._held[tag]
        LOG.info(
            "task %s: step_id=%s attempt=%d task_id=%s",
            "succeeded" if result["status"] == "success" else "failed",
            result["step_id"],
            result["attempt"],
            result["task_id"],
        )

    # Heartbeats and the registry ------------------------------------------------------------

    def _to_registry(self, message: dict) -> None:
        """Publishes a registration or deregistration; the registry copes without one (it
        learns of the worker from its heartbeats, and forgets it after a silence)."""
        try:
            self._publish(f"{self.config.prefix}.heartbeats", message["type"], message)
        except (pika.exceptions.NackError, pika.exceptions.UnroutableError) as error:
            LOG.warning("could not publish a %s: %r", message["type"], error)

    def _beat(self) -> None:
        self._send_heartbeat()
        self._connection.call_later(self.config.heartbeat_interval, self._beat)

    def _send_heartbeat(self) -> None:
        self._last_beat = time.monotonic()
        message = heartbeat_message(self.config, list(self._held.values()))
        try:
            self._publish(f"{self.config.prefix}.heartbeats", "heartbeat", message)
        except (pika.exceptions.NackError, pika.exceptions.UnroutableError) as error:
            LOG.warning("could not publish a heartbeat: %r", error)
