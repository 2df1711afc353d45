#!/usr/bin/env bash
# Installs SLURM (controller, node daemon, client) and munge from the distribution's packages,
# so the real SLURM test in tests/launch/test_slurm_cluster.py runs instead of skipping.
# Non-interactive and idempotent: a second run finds everything installed and does nothing.
# Runs as root on Debian 12 (CI); elsewhere it uses sudo when it is not root.
set -euo pipefail

packages=(slurm-wlm slurmctld slurmd slurm-client munge)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "${package}" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("${package}")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install_slurm: already installed: ${packages[*]}"
  exit 0
fi

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  sudo_cmd=(sudo)
fi

export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -q
"${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"

# The packages' postinst scripts may try to start services; the test starts its own daemons with
# its own config and state directories, so the system services are neither needed nor wanted.
echo "install_slurm: installed ${missing[*]}"
for binary in slurmctld slurmd sbatch srun munged; do
  command -v "${binary}" >/dev/null || { echo "install_slurm: ${binary} missing" >&2; exit 1; }
done
