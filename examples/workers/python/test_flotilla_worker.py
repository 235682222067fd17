"""The Python worker's messages checked against the protocol's JSON Schemas (proto/schemas).

    python -m unittest discover -s examples/workers/python

Needs pika and jsonschema (deploy/python.sh installs both in .flotilla/venv).
"""

import json
import unittest
import uuid
from pathlib import Path

import jsonschema

from flotilla_worker import (
    Config,
    TaskFailure,
    decode_task,
    deregistration_message,
    heartbeat_message,
    now,
    registration_message,
    result_message,
)
from worker import describe

SCHEMAS = Path(__file__).resolve().parents[3] / "proto" / "schemas"


def validator(name: str) -> jsonschema.Validator:
    schema = json.loads((SCHEMAS / f"{name}.v1.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def a_task(**fields) -> dict:
    task = {
        "type": "task",
        "v": 1,
        "task_id": str(uuid.uuid4()),
        "run_id": str(uuid.uuid4()),
        "step_id": "stats",
        "attempt": 2,
        "agent": "stats",
        "action": "describe",
        "idempotency_key": "run/stats",
        "params": {"numbers": [1, 2]},
        "dispatched_at": "2025-01-02T03:04:05.123456Z",
    }
    task.update(fields)
    return task


class Messages(unittest.TestCase):
    def test_a_task_from_the_schema_decodes_with_its_defaults(self):
        task = a_task()
        validator("task").validate(task)
        decoded = decode_task(json.dumps(task).encode())
        self.assertEqual(decoded["inputs"], {})
        self.assertEqual(decoded["run_params"], {})
        self.assertEqual(decoded["attempt"], 2)

    def test_bodies_that_are_not_tasks_are_refused_with_the_fault_named(self):
        cases = {
            b"\xff": "not JSON",
            b"[1]": "not a JSON object",
            json.dumps(a_task(type="result")).encode(): "not a task",
            json.dumps(a_task(v=2)).encode(): "not a task of version 1",
            json.dumps(a_task(attempt="1")).encode(): "`attempt`",
            json.dumps(a_task(params=[1])).encode(): "`params`",
        }
        for body, fault in cases.items():
            with self.subTest(body=body):
                with self.assertRaisesRegex(ValueError, fault):
                    decode_task(body)

    def test_results_match_the_result_schema(self):
        task = decode_task(json.dumps(a_task()).encode())
        success = result_message(task, "py-1", "2025-01-02T03:04:06Z", describe(task), None)
        failure = result_message(
            task, "py-1", "2025-01-02T03:04:06Z", None, TaskFailure("no such template", retryable=False)
        )
        for result in (success, failure):
            validator("result").validate(result)
            self.assertEqual(result["task_id"], task["task_id"])
            self.assertEqual(result["attempt"], 2)
        self.assertEqual(success["output"], {"count": 2, "sum": 3, "mean": 1.5})
        self.assertEqual(failure["error"], {"message": "no such template", "retryable": False})

    def test_heartbeats_match_the_heartbeat_schema(self):
        config = Config(agents=["stats", "other"], concurrency=8, worker_id="py-1")
        held = [{"task_id": str(uuid.uuid4()), "run_id": str(uuid.uuid4()), "step_id": "s", "attempt": 1}]
        for tasks in ([], held):
            heartbeat = heartbeat_message(config, tasks)
            validator("heartbeat").validate(heartbeat)
            self.assertEqual(heartbeat["tasks"], tasks)

    def test_registrations_match_their_schemas(self):
        config = Config(agents=["stats"], concurrency=8, worker_id="py-1", labels={"region": "eu"})
        registration = registration_message(config, ["sleep", "describe"], now())
        validator("registration").validate(registration)
        self.assertEqual(registration["actions"], ["describe", "sleep"])
        self.assertTrue(registration["sdk"].startswith("python-pika/"))
        validator("deregistration").validate(deregistration_message(config))

    def test_invalid_settings_are_refused(self):
        for bad in ({"agents": []}, {"agents": ["a"], "concurrency": 0}, {"agents": ["a"], "heartbeat_interval": 0}):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                Config(**bad)


if __name__ == "__main__":
    unittest.main()
