"""`launch/k8s.py`: the JobSet manifests have what a JobSet and a JAX multi-host run need."""

import os
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT

from launch import k8s

COMMAND = ["fdjax", "train", "--config", "c.py", "--workdir", "/workdir/run1"]


def _pod_template(manifest):
  (replicated_job,) = manifest["spec"]["replicatedJobs"]
  return (
    replicated_job,
    replicated_job["template"]["spec"],
    replicated_job["template"]["spec"]["template"],
  )


def test_gpu_jobset_for_2_nodes_x_8_gpus():
  manifest = k8s.jobset_manifest(
    COMMAND,
    name="run1",
    image="registry.example/fdjax:1",
    nodes=2,
    gpus_per_node=8,
    workdir_claim="runs",
    cpu="32",
    memory="256Gi",
    namespace="research",
  )
  # Round trip through YAML: what kubectl would read.
  manifest = yaml.safe_load(yaml.safe_dump(manifest))
  assert manifest["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
  assert manifest["kind"] == "JobSet"
  assert manifest["metadata"]["name"] == "run1"
  assert manifest["metadata"]["namespace"] == "research"
  assert manifest["spec"]["network"] == {"enableDNSHostnames": True, "subdomain": "run1"}
  assert manifest["spec"]["failurePolicy"] == {"maxRestarts": 0}

  replicated_job, job_spec, pod = _pod_template(manifest)
  assert replicated_job["name"] == "workers" and replicated_job["replicas"] == 1
  assert job_spec["parallelism"] == job_spec["completions"] == 2
  assert job_spec["completionMode"] == "Indexed"
  assert job_spec["backoffLimit"] == 0
  assert pod["spec"]["restartPolicy"] == "Never"

  (container,) = pod["spec"]["containers"]
  assert container["image"] == "registry.example/fdjax:1"
  assert container["command"] == COMMAND
  assert container["resources"]["limits"] == {"nvidia.com/gpu": 8, "memory": "256Gi"}
  assert container["resources"]["requests"] == {"cpu": "32", "memory": "256Gi"}
  assert {"containerPort": 8476, "name": "coordinator"} in container["ports"]

  env = {e["name"]: e for e in container["env"]}
  # Process 0 is pod 0 of job 0, reachable through the JobSet's headless service.
  assert env["FDJAX_COORDINATOR"]["value"] == "run1-workers-0-0.run1:8476"
  assert env["FDJAX_NUM_PROCESSES"]["value"] == "2"
  assert env["FDJAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == (
    "metadata.annotations['batch.kubernetes.io/job-completion-index']"
  )

  mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
  volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
  assert mounts == {"dshm": "/dev/shm", "workdir": "/workdir"}
  assert volumes["workdir"]["persistentVolumeClaim"] == {"claimName": "runs"}
  assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"}
  assert manifest["metadata"]["annotations"] == {
    "alpha.jobset.sigs.k8s.io/exclusive-topology": "kubernetes.io/hostname"
  }


def test_tpu_jobset_selects_a_slice_and_lets_jax_detect_it():
  manifest = k8s.jobset_manifest(
    COMMAND, name="tpu-run", image="img", nodes=2, tpu_type="v5p", tpu_topology="2x2x2"
  )
  _, job_spec, pod = _pod_template(manifest)
  assert job_spec["parallelism"] == 2
  assert pod["spec"]["nodeSelector"] == {
    "cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
    "cloud.google.com/gke-tpu-topology": "2x2x2",
  }
  (container,) = pod["spec"]["containers"]
  assert container["resources"]["limits"] == {"google.com/tpu": 4}
  env = {e["name"]: e.get("value") for e in container["env"]}
  assert env["FDJAX_DISTRIBUTED"] == "auto" and "FDJAX_COORDINATOR" not in env


@pytest.mark.parametrize(
  "options, message",
  [
    ({"name": "Run_1"}, "must be a DNS label"),
    ({"tpu_type": "v5p"}, "needs both --tpu-type and --tpu-topology"),
    ({"tpu_type": "v5p", "tpu_topology": "2x2", "gpus_per_node": 8}, "not both"),
    ({"tpu_type": "v9", "tpu_topology": "2x2"}, "unknown --tpu-type 'v9'"),
  ],
)
def test_bad_options_are_named(options, message):
  with pytest.raises(ValueError, match=message):
    k8s.jobset_manifest(COMMAND, **{"name": "run1", "image": "img", "nodes": 2, **options})


def test_dry_run_cli_writes_the_manifest(tmp_path):
  output = tmp_path / "jobset.yaml"
  command = [
    sys.executable, "-m", "fdjax.cli", "launch", "k8s", "--dry-run", "--name", "run1",
    "--image", "img", "--nodes", "2", "--gpus-per-node", "8", "--env", "WANDB_MODE=offline",
    "--output", str(output), "--", *COMMAND,
  ]  # fmt: skip
  result = subprocess.run(command, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  manifest = yaml.safe_load(output.read_text())
  _, _, pod = _pod_template(manifest)
  env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
  assert env["WANDB_MODE"] == "offline" and env["FDJAX_NUM_PROCESSES"] == "2"
