#!/usr/bin/env bash
# Checks the deployment files and the Python worker without Docker or Kubernetes: lints the
# Dockerfile (hadolint), validates compose.yaml against the Compose Specification and the
# Kubernetes manifests against the Kubernetes API's schemas (strict: unknown fields are faults),
# checks them against each other and against the binaries (deploy/check.py), and runs the
# Python worker's own tests. Needs deploy/python.sh run first and the binaries built.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.flotilla/venv/bin

"$bin/hadolint" deploy/Dockerfile
"$bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml
# The KEDA resources have no schema there ("Couldn't find schema"): deploy/check.py checks them.
manifests=()
for file in deploy/k8s/*.yaml; do
  [ "$file" = deploy/k8s/kustomization.yaml ] || manifests+=("$file")
done
"$bin/kubernetes-validate" --strict --quiet "${manifests[@]}"
"$bin/python" deploy/check.py
(cd examples/workers/python && "../../../$bin/python" -m unittest discover --quiet -s .)
