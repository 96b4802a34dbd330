#!/bin/bash
# Print a rendezvous port for Slurm job $1, chosen on the master node (where the batch script runs).
#
# The port is derived from the job id, so a requeued job gets the same one, and kept below the
# kernel's ephemeral range (/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by default): a
# port in that range can be taken at any moment by an outgoing connection, and a busy port makes
# every rank fail at start (EADDRINUSE, exit 2, no requeue).  When something already listens on
# the first choice, the next one is taken (one retry).
#
#   export MASTER_PORT=${MASTER_PORT:-$(bash slurm/master_port.sh "$SLURM_JOB_ID")}
set -euo pipefail
job_id=${1:?usage: master_port.sh JOB_ID}
range_file=${MYTHOS_PORT_RANGE_FILE:-/proc/sys/net/ipv4/ip_local_port_range}
first=15000  # above the well-known and most registered service ports
ephemeral_low=32768
if [ -r "$range_file" ]; then
  read -r ephemeral_low _ < "$range_file" || true  # (a file without a final newline)
fi
if [ "$ephemeral_low" -le $((first + 100)) ]; then
  echo "master_port.sh: the ephemeral range starts at $ephemeral_low ($range_file): no room below it" \
       "for a fixed port; set MASTER_PORT yourself" >&2
  exit 2
fi
span=$((ephemeral_low - first))
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for try in 0 1; do
  port=$((first + (job_id + try) % span))
  if ! listening "$port"; then
    echo "$port"
    exit 0
  fi
  echo "master_port.sh: port $port is in use on $(hostname)" >&2
done
echo "master_port.sh: ports $((first + job_id % span)) and $port are both in use; set MASTER_PORT" >&2
exit 2
