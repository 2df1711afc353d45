"""Kubernetes JobSet manifests for multi-host runs (`fdjax launch k8s`).

`fdjax launch k8s --dry-run --name run1 --image IMG --nodes 2 --gpus-per-node 8 --workdir-claim
runs -- fdjax train --config C --workdir /workdir/run1` prints a JobSet
(`jobset.x-k8s.io/v1alpha2`) with one replicated job of `nodes` pods in an indexed Job, one
process per pod. Pods find each other through the JobSet's headless service: process 0 is pod
`<name>-workers-0-0.<name>`, which hosts JAX's coordinator; each pod's process id is its
completion index. These reach `fdjax.distributed.initialize` as `FDJAX_COORDINATOR`,
`FDJAX_NUM_PROCESSES` and `FDJAX_PROCESS_ID`. The TPU variant (`--tpu-type v5p --tpu-topology
2x2x2`) selects a GKE TPU slice node pool instead and lets JAX detect the slice itself
(`FDJAX_DISTRIBUTED=auto`). A persistent volume claim holds the workdir, shared by all pods so
checkpoints and logs outlive them. Without `--dry-run` the manifest is applied with `kubectl`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from fdjax.distributed import ENV_COORDINATOR, ENV_DISTRIBUTED, ENV_NUM_PROCESSES, ENV_PROCESS_ID
from launch.local import require_command, split_command

API_VERSION = "jobset.x-k8s.io/v1alpha2"
REPLICATED_JOB = "workers"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
TPU_CHIPS_PER_HOST = {"v4": 4, "v5p": 4, "v5e": 4, "v5litepod": 4, "v6e": 4}
TPU_ACCELERATOR = {
  "v4": "tpu-v4-podslice",
  "v5p": "tpu-v5p-slice",
  "v5e": "tpu-v5-lite-podslice",
  "v5litepod": "tpu-v5-lite-podslice",
  "v6e": "tpu-v6e-slice",
}


def jobset_manifest(
  command: Sequence[str],
  *,
  name: str,
  image: str,
  nodes: int,
  gpus_per_node: int = 0,
  tpu_type: str | None = None,
  tpu_topology: str | None = None,
  namespace: str | None = None,
  workdir_claim: str | None = None,
  workdir_mount: str = "/workdir",
  coordinator_port: int = 8476,
  cpu: str | None = None,
  memory: str | None = None,
  env: dict[str, str] | None = None,
  max_restarts: int = 0,
  service_account: str | None = None,
) -> dict[str, Any]:
  """A JobSet running `command` as one JAX process per node on `nodes` nodes.

  Args:
    command: the container's command, e.g. `["fdjax", "train", ...]`.
    name: JobSet name (DNS label); also the headless service's name.
    image: container image with fdjax installed.
    nodes: pods (= processes = nodes, one pod per node).
    gpus_per_node: `nvidia.com/gpu` per pod (GPU variant).
    tpu_type, tpu_topology: TPU generation (v4, v5p, v5e, v6e) and slice topology such as
      `2x2x2` (TPU variant; mutually exclusive with GPUs).
    namespace: Kubernetes namespace.
    workdir_claim: name of a PersistentVolumeClaim mounted at `workdir_mount` in every pod.
    coordinator_port: port of JAX's coordinator on pod 0.
    cpu, memory: resource requests per pod, e.g. "32", "256Gi".
    env: extra environment variables.
    max_restarts: how often the whole JobSet is recreated after a pod fails (resume from the
      latest checkpoint).
    service_account: service account of the pods.

  Returns:
    The manifest as a dict (dump it with `yaml.safe_dump`).
  """
  if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 40:
    raise ValueError(
      f"JobSet name {name!r} must be a DNS label of at most 40 characters "
      "(lower-case letters, digits, '-'), as pod host names derive from it"
    )
  if nodes < 1:
    raise ValueError(f"--nodes must be at least 1, got {nodes}")
  if tpu_type and gpus_per_node:
    raise ValueError("a JobSet asks for either GPUs or a TPU slice, not both")
  if bool(tpu_type) != bool(tpu_topology):
    raise ValueError("the TPU variant needs both --tpu-type and --tpu-topology")
  if tpu_type and tpu_type not in TPU_ACCELERATOR:
    raise ValueError(f"unknown --tpu-type {tpu_type!r}; known: {sorted(TPU_ACCELERATOR)}")
  if not command:
    raise ValueError("no command for the container: put it after `--`")

  container_env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
  if tpu_type:
    container_env.append({"name": ENV_DISTRIBUTED, "value": "auto"})
  elif nodes > 1:
    coordinator = f"{name}-{REPLICATED_JOB}-0-0.{name}:{coordinator_port}"
    container_env += [
      {"name": ENV_COORDINATOR, "value": coordinator},
      {"name": ENV_NUM_PROCESSES, "value": str(nodes)},
      {
        "name": ENV_PROCESS_ID,
        "valueFrom": {
          "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}
        },
      },
    ]
  container_env += [{"name": k, "value": v} for k, v in (env or {}).items()]

  limits: dict[str, Any] = {}
  requests: dict[str, Any] = {}
  if gpus_per_node:
    limits["nvidia.com/gpu"] = gpus_per_node
  if tpu_type:
    limits["google.com/tpu"] = TPU_CHIPS_PER_HOST[tpu_type]
  if cpu:
    requests["cpu"] = cpu
  if memory:
    requests["memory"] = memory
    limits["memory"] = memory

  mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
  volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
  if workdir_claim:
    mounts.append({"name": "workdir", "mountPath": workdir_mount})
    volumes.append({"name": "workdir", "persistentVolumeClaim": {"claimName": workdir_claim}})

  container: dict[str, Any] = {
    "name": "fdjax",
    "image": image,
    "command": list(command),
    "env": container_env,
    "ports": [{"containerPort": coordinator_port, "name": "coordinator"}],
    "resources": {"limits": limits, **({"requests": requests} if requests else {})},
    "volumeMounts": mounts,
  }
  pod_spec: dict[str, Any] = {
    "restartPolicy": "Never",
    "containers": [container],
    "volumes": volumes,
  }
  if service_account:
    pod_spec["serviceAccountName"] = service_account
  annotations: dict[str, str] = {}
  if tpu_type:
    pod_spec["nodeSelector"] = {
      "cloud.google.com/gke-tpu-accelerator": TPU_ACCELERATOR[tpu_type],
      "cloud.google.com/gke-tpu-topology": tpu_topology,
    }
    # All pods of the slice on one node pool (one physical slice).
    annotations["alpha.jobset.sigs.k8s.io/exclusive-topology"] = "cloud.google.com/gke-nodepool"
  else:
    # One pod per node.
    annotations["alpha.jobset.sigs.k8s.io/exclusive-topology"] = "kubernetes.io/hostname"
    if gpus_per_node:
      pod_spec["tolerations"] = [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
      ]

  metadata: dict[str, Any] = {"name": name, "annotations": annotations}
  if namespace:
    metadata["namespace"] = namespace
  return {
    "apiVersion": API_VERSION,
    "kind": "JobSet",
    "metadata": metadata,
    "spec": {
      "failurePolicy": {"maxRestarts": max_restarts},
      "network": {"enableDNSHostnames": True, "subdomain": name},
      "replicatedJobs": [
        {
          "name": REPLICATED_JOB,
          "replicas": 1,
          "template": {
            "spec": {
              "parallelism": nodes,
              "completions": nodes,
              "completionMode": "Indexed",
              "backoffLimit": 0,
              "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec},
            }
          },
        }
      ],
    },
  }


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="fdjax launch k8s",
    description="Write (and apply) a Kubernetes JobSet that runs `-- command ...`.",
  )
  parser.add_argument("--name", required=True, help="JobSet name (DNS label)")
  parser.add_argument("--image", required=True, help="container image with fdjax")
  parser.add_argument("--nodes", type=int, default=1, help="nodes (one process each)")
  parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node")
  parser.add_argument("--tpu-type", help="TPU generation: v4, v5p, v5e, v6e")
  parser.add_argument("--tpu-topology", help="TPU slice topology, e.g. 2x2x2")
  parser.add_argument("--namespace", help="Kubernetes namespace")
  parser.add_argument("--workdir-claim", help="PersistentVolumeClaim for the shared workdir")
  parser.add_argument("--workdir-mount", default="/workdir", help="where the claim is mounted")
  parser.add_argument("--coordinator-port", type=int, default=8476, help="JAX coordinator port")
  parser.add_argument("--cpu", help="CPU request per pod")
  parser.add_argument("--memory", help="memory request and limit per pod, e.g. 256Gi")
  parser.add_argument("--env", action="append", default=[], metavar="K=V", help="repeatable")
  parser.add_argument("--max-restarts", type=int, default=0, help="JobSet restarts on failure")
  parser.add_argument("--service-account", help="pods' service account")
  parser.add_argument("--output", "-o", help="write the manifest here (default: stdout)")
  parser.add_argument("--dry-run", action="store_true", help="only write; do not kubectl apply")
  return parser


def main(argv: Sequence[str]) -> int:
  """`fdjax launch k8s [options] -- command ...`: writes the manifest, applies it unless dry."""
  options, command = split_command(argv)
  parser = build_parser()
  args = parser.parse_args(options)
  require_command(parser, command)
  env = {}
  for item in args.env:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise SystemExit(f"--env {item!r} is not of the form KEY=VALUE")
    env[key] = value
  manifest = jobset_manifest(
    command,
    name=args.name,
    image=args.image,
    nodes=args.nodes,
    gpus_per_node=args.gpus_per_node,
    tpu_type=args.tpu_type,
    tpu_topology=args.tpu_topology,
    namespace=args.namespace,
    workdir_claim=args.workdir_claim,
    workdir_mount=args.workdir_mount,
    coordinator_port=args.coordinator_port,
    cpu=args.cpu,
    memory=args.memory,
    env=env,
    max_restarts=args.max_restarts,
    service_account=args.service_account,
  )
  text = yaml.safe_dump(manifest, sort_keys=False)
  if args.output:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
      f.write(text)
  if args.dry_run:
    if not args.output:
      print(text, end="")
    return 0
  kubectl = shutil.which("kubectl")
  if kubectl is None:
    print("fdjax launch k8s: kubectl is not installed; use --dry-run", file=sys.stderr)
    return 1
  return subprocess.run([kubectl, "apply", "-f", "-"], input=text, text=True).returncode


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
