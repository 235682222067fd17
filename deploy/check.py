#!/usr/bin/env python3
"""Checks the deployment files against each other and against the binaries they run.

The schema validators (hadolint, the Compose Specification's schema, the Kubernetes API's
schemas) check each file alone; this checks what they cannot: that every setting a binary reads
is set and nothing it does not read is, that selectors match labels, that probes ask the health
routes on the ports the binaries serve them on, that every referenced ConfigMap, Secret and key
exists, that each worker's KEDA triggers watch exactly the queues it consumes, and that the image
ships every binary of the workspace.

    deploy/check.py [--bin-dir target/debug]

The binaries' settings are read from the binaries themselves (`flotilla-coordinator
--dump-config`, `flotilla-agent-echo --help`), so a setting added to one shows up here.
Exits 1 and lists every fault when one is found.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
HEALTH_PATHS = {"/health/live", "/health/ready"}
# Read by every binary though not among its flags: logging, tracing, and the coordinator's
# webhook URLs of `notify:` handlers (FLOTILLA_NOTIFY_<CHANNEL>_URL).
COMMON_ENV = {"RUST_LOG", "FLOTILLA_LOG_FORMAT", "OTEL_EXPORTER_OTLP_ENDPOINT"}
NOTIFY_ENV = re.compile(r"^FLOTILLA_NOTIFY_[A-Z0-9_]+_URL$")
# Set per process, or needed only by some deployments (JWTs), so a deployment may leave them out.
OPTIONAL_ENV = {
    "FLOTILLA_WORKER_ID",
    # Off unless set: no default limit on waiting for a worker, no labels.
    "FLOTILLA_SCHEDULE_TO_START_MS",
    "FLOTILLA_WORKER_LABELS",
    "FLOTILLA_JWT_HS256_SECRET",
    "FLOTILLA_JWT_RS256_KEYS",
    "FLOTILLA_JWT_ES256_KEYS",
    "FLOTILLA_JWT_ISSUER",
    "FLOTILLA_JWT_AUDIENCE",
    # TLS of the API: off unless set (an ingress may terminate it instead).
    "FLOTILLA_TLS_CERT",
    "FLOTILLA_TLS_KEY",
    # Secrets come from FLOTILLA_SECRET_<NAME> variables or from files in this directory.
    "FLOTILLA_SECRETS_DIR",
}


def coordinator_env(bin_dir: Path) -> set[str]:
    out = subprocess.run(
        [bin_dir / "flotilla-coordinator", "--dump-config"],
        check=True, capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin"},
    ).stdout
    return {line.split("=", 1)[0] for line in out.splitlines() if "=" in line}


def worker_env(bin_dir: Path) -> set[str]:
    out = subprocess.run(
        [bin_dir / "flotilla-agent-echo", "--help"], check=True, capture_output=True, text=True
    ).stdout
    return set(re.findall(r"\[env: ([A-Z0-9_]+)", out))


class Faults:
    def __init__(self):
        self.found: list[str] = []

    def check(self, ok: bool, fault: str) -> None:
        if not ok:
            self.found.append(fault)


def check_env(faults: Faults, where: str, env: set[str], reads: set[str]) -> None:
    unknown = {k for k in env - reads - COMMON_ENV if not NOTIFY_ENV.match(k)}
    faults.check(not unknown, f"{where}: sets {sorted(unknown)}, which the binary does not read")
    missing = reads - env - OPTIONAL_ENV
    faults.check(not missing, f"{where}: leaves {sorted(missing)} unset")


def check_compose(faults: Faults, coordinator: set[str], worker: set[str]) -> None:
    compose = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())
    services = compose["services"]
    for name, reads, port_key in (
        ("coordinator", coordinator, "PORT"),
        ("echo", worker, "FLOTILLA_METRICS_PORT"),
    ):
        service = services.get(name)
        faults.check(service is not None, f"compose: no `{name}` service")
        if service is None:
            continue
        env = service.get("environment", {})
        check_env(faults, f"compose service {name}", set(env), reads)
        probe = " ".join(service.get("healthcheck", {}).get("test", []))
        port = str(env.get(port_key))
        faults.check(
            f"/dev/tcp/127.0.0.1/{port} " in probe and "/health/ready" in probe,
            f"compose service {name}: its healthcheck does not ask /health/ready on {port_key} {port}",
        )
        faults.check(
            all(d in services for d in service.get("depends_on", {})),
            f"compose service {name}: depends on a service that does not exist",
        )
    # Scaled with --scale: a published host port would collide between replicas.
    faults.check(
        "ports" not in services.get("echo", {}),
        "compose service echo publishes a port, which `--scale echo=N` cannot share",
    )
    faults.check(
        services["coordinator"]["environment"].get("FLOTILLA_BIND") == "0.0.0.0",
        "compose service coordinator listens on loopback only",
    )
    faults.check(
        services["coordinator"]["environment"].get("FLOTILLA_INSECURE_NO_AUTH") == "false",
        "compose service coordinator does not keep authentication on",
    )


def load_manifests() -> dict[tuple[str, str], dict]:
    kustomization = yaml.safe_load((ROOT / "deploy/k8s/kustomization.yaml").read_text())
    objects = {}
    for file in kustomization["resources"]:
        for doc in yaml.safe_load_all((ROOT / "deploy/k8s" / file).read_text()):
            if doc:
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_env(
    faults: Faults, objects: dict, where: str, container: dict
) -> dict[str, str | None]:
    """The container's environment by name: the value, or None when it comes from a Secret or
    the pod. Checks that every referenced ConfigMap, Secret and key exists."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        config = objects.get(("ConfigMap", name))
        faults.check(config is not None, f"{where}: ConfigMap {name} does not exist")
        env.update((config or {}).get("data", {}))
    for var in container.get("env", []):
        source = var.get("valueFrom", {})
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = objects.get(("Secret", ref["name"]), {})
            faults.check(
                ref["key"] in secret.get("stringData", {}) | secret.get("data", {}),
                f"{where}: Secret {ref['name']} has no key {ref['key']}",
            )
        env[var["name"]] = var.get("value")
    return env


def check_probes(faults: Faults, where: str, container: dict, port: str | None) -> None:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    for kind in ("livenessProbe", "readinessProbe"):
        probe = container.get(kind, {}).get("httpGet")
        faults.check(probe is not None, f"{where}: no HTTP {kind}")
        if probe is None:
            continue
        faults.check(probe["path"] in HEALTH_PATHS, f"{where}: {kind} asks {probe['path']}")
        faults.check(
            str(ports.get(probe["port"], probe["port"])) == port,
            f"{where}: {kind} port {probe['port']} is not the port the binary serves, {port}",
        )
    faults.check(
        container.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/health/ready",
        f"{where}: readiness is not /health/ready",
    )


def check_pod_security(faults: Faults, where: str, pod: dict, container: dict) -> None:
    faults.check(pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{where}: may run as root")
    security = container.get("securityContext", {})
    faults.check(security.get("readOnlyRootFilesystem") is True, f"{where}: root filesystem writable")
    faults.check(security.get("allowPrivilegeEscalation") is False, f"{where}: may escalate privileges")
    faults.check("memory" in container.get("resources", {}).get("limits", {}), f"{where}: no memory limit")
    faults.check("cpu" in container.get("resources", {}).get("requests", {}), f"{where}: no CPU request")


def check_k8s(faults: Faults, coordinator: set[str], worker: set[str]) -> None:
    objects = load_manifests()
    deployments = {name: o for (kind, name), o in objects.items() if kind == "Deployment"}
    config = objects.get(("ConfigMap", "flotilla-config"), {}).get("data", {})
    prefix = config.get("FLOTILLA_QUEUE_PREFIX", "flotilla")

    for name, deployment in deployments.items():
        where = f"Deployment {name}"
        spec = deployment["spec"]
        pod = spec["template"]["spec"]
        labels = spec["template"]["metadata"]["labels"]
        faults.check(matches(spec["selector"]["matchLabels"], labels), f"{where}: selector does not match its pods")
        faults.check(len(pod["containers"]) == 1, f"{where}: expected one container")
        container = pod["containers"][0]
        env = container_env(faults, objects, where, container)
        binary = container["command"][0]
        reads, port = {
            "flotilla-coordinator": (coordinator, env.get("PORT")),
            "flotilla-agent-echo": (worker, env.get("FLOTILLA_METRICS_PORT")),
        }[binary]
        check_env(faults, where, set(env), reads)
        check_probes(faults, where, container, port)
        check_pod_security(faults, where, pod, container)
        if binary == "flotilla-coordinator":
            faults.check(spec["replicas"] >= 2, f"{where}: fewer than 2 replicas")
            faults.check(env.get("FLOTILLA_BIND") == "0.0.0.0", f"{where}: listens on loopback only")
            faults.check(env.get("FLOTILLA_INSECURE_NO_AUTH") == "false", f"{where}: authentication is not on")
            grace = int(env.get("FLOTILLA_SHUTDOWN_GRACE_SECS") or 30)
            faults.check(
                pod.get("terminationGracePeriodSeconds", 30) > grace,
                f"{where}: killed before its {grace} s drain ends",
            )
        else:
            faults.check(env.get("FLOTILLA_METRICS_BIND") == "0.0.0.0", f"{where}: probes cannot reach loopback")
            check_scaled_object(faults, objects, name, env.get("FLOTILLA_AGENTS") or "", prefix)

    for kind in ("Service", "PodDisruptionBudget"):
        for (k, name), o in objects.items():
            if k != kind:
                continue
            selector = o["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            targets = [d for d in deployments.values() if matches(selector, d["spec"]["template"]["metadata"]["labels"])]
            faults.check(bool(targets), f"{kind} {name}: selects no pod")
            if kind == "Service":
                for port in o["spec"]["ports"]:
                    names = {p["name"] for d in targets for p in d["spec"]["template"]["spec"]["containers"][0]["ports"]}
                    faults.check(port["targetPort"] in names, f"Service {name}: no container port {port['targetPort']}")
    faults.check(
        any(kind == "PodDisruptionBudget" for kind, _ in objects),
        "no PodDisruptionBudget",
    )


def check_scaled_object(faults: Faults, objects: dict, deployment: str, agents: str, prefix: str) -> None:
    scaled = [o for (k, _), o in objects.items() if k == "ScaledObject" and o["spec"]["scaleTargetRef"]["name"] == deployment]
    where = f"ScaledObject of {deployment}"
    faults.check(len(scaled) == 1, f"{where}: expected exactly one")
    if len(scaled) != 1:
        return
    triggers = scaled[0]["spec"]["triggers"]
    queues = {t["metadata"]["queueName"] for t in triggers if t["type"] == "rabbitmq"}
    # Each agent's queue and its high-priority twin (the worker has no labels).
    wanted = {f"{prefix}.agent.{a.strip()}{high}" for a in agents.split(",") if a.strip() for high in ("", ":high")}
    faults.check(queues == wanted, f"{where}: watches {sorted(queues)}, the worker consumes {sorted(wanted)}")
    for trigger in triggers:
        auth = objects.get(("TriggerAuthentication", trigger.get("authenticationRef", {}).get("name")))
        faults.check(auth is not None, f"{where}: its trigger's TriggerAuthentication does not exist")
        for ref in (auth or {}).get("spec", {}).get("secretTargetRef", []):
            secret = objects.get(("Secret", ref["name"]), {})
            faults.check(ref["key"] in secret.get("stringData", {}), f"TriggerAuthentication: Secret {ref['name']} has no key {ref['key']}")


def check_image(faults: Faults) -> None:
    """The Dockerfile copies every binary target of the workspace but the bench into the image."""
    metadata = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--no-deps", "--format-version", "1", "--offline"],
            cwd=ROOT, check=True, capture_output=True, text=True,
        ).stdout
    )
    binaries = {t["name"] for p in metadata["packages"] for t in p["targets"] if "bin" in t["kind"]}
    # The benchmark harness starts fleets from a build tree; it is a development tool.
    binaries -= {"flotilla-bench"}
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    copied = set(re.findall(r"target/release/([\w-]+)", dockerfile))
    faults.check(copied == binaries, f"Dockerfile: copies {sorted(copied)}, the workspace builds {sorted(binaries)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bin-dir", type=Path, default=ROOT / "target/debug")
    args = parser.parse_args()
    coordinator, worker = coordinator_env(args.bin_dir), worker_env(args.bin_dir)
    faults = Faults()
    check_compose(faults, coordinator, worker)
    check_k8s(faults, coordinator, worker)
    check_image(faults)
    for fault in faults.found:
        print(f"deploy/check.py: {fault}", file=sys.stderr)
    if faults.found:
        return 1
    print("deploy/check.py: Dockerfile, compose.yaml and k8s/ agree with each other and with the binaries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
