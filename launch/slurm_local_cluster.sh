#!/usr/bin/env bash
# Start a real one-node Slurm cluster on this machine (munged, slurmctld, slurmd), for trying
# the slurm/ scripts and for their tests.  Needs root and Debian's slurm-wlm + munge
# (installed here when missing).  Idempotent: a running cluster is left as it is.
#   bash launch/slurm_local_cluster.sh        then   sinfo; sbatch ...
set -euo pipefail
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
if sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mixed|allocated'; then
  exit 0
fi

node=$(hostname -s)
# This machine as slurmd sees it: NodeName=<host> CPUs=... RealMemory=...
node_line=$(slurmd -C | head -n 1 | sed "s/^NodeName=[^ ]*/NodeName=$node/")
state=/var/spool/slurm
mkdir -p /etc/slurm "$state/ctld" "$state/d" /var/log/slurm /run/munge
chown -R slurm:slurm "$state" /var/log/slurm
chown munge:munge /run/munge

[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c "/usr/sbin/munged --force"

cat > /etc/slurm/slurm.conf <<CONF
ClusterName=mythos-local
SlurmctldHost=$node
SlurmUser=slurm
AuthType=auth/munge
# Credential lifetime; also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=15
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MpiDefault=none
KillWait=30
$node_line State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mixed|allocated'; then
    echo "slurm: one-node cluster up ($(sinfo -h -o '%N %c CPUs %T'))"
    exit 0
  fi
  sleep 0.5
done
echo "slurm: the cluster did not come up; see /var/log/slurm/" >&2
exit 1
