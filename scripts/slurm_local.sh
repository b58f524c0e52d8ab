#!/usr/bin/env bash
# A single-node Slurm on this machine, from Debian's packages (slurmctld, slurmd, slurm-client, munge), for
# medcomp's sweep tests and for trying `medcomp sweep --executor slurm` without a cluster.
#   bash scripts/slurm_local.sh install   # apt-get the packages if missing (root)
#   bash scripts/slurm_local.sh start     # write the config, make a munge key, start munged, slurmctld, slurmd
#   bash scripts/slurm_local.sh stop      # stop the three daemons by their PIDs
# Accounting: none (no slurmdbd). `sacct` then fails and submitit warns and falls back to `squeue`, which is
# enough for one node; a cluster has its own accounting. The state lives in $SLURM_LOCAL_DIR (/tmp/medcomp-slurm).
set -euo pipefail
dir="${SLURM_LOCAL_DIR:-/tmp/medcomp-slurm}"
conf=/etc/slurm/slurm.conf
host=$(hostname -s)
case "${1:-}" in
  install)
    command -v slurmctld > /dev/null && command -v slurmd > /dev/null && command -v sbatch > /dev/null && command -v munged > /dev/null && exit 0
    apt-get update -qq > /dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge > /dev/null
    ;;
  start)
    if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2> /dev/null && [ -f "$dir/slurmd.pid" ] \
       && kill -0 "$(cat "$dir/slurmd.pid")" 2> /dev/null; then
      echo "[slurm_local] already up (slurmctld $(cat "$dir/slurmctld.pid"), slurmd $(cat "$dir/slurmd.pid"))"
      exit 0
    fi
    mkdir -p "$dir"/{state,spool,log} /etc/slurm /run/munge /var/log/munge /var/lib/munge
    cpus=$(nproc); memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    cat > "$conf" <<CONF
ClusterName=medcomp
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chmod 400 /etc/munge/munge.key; }
    chown -R root /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    pgrep -x munged > /dev/null || munged --force --pid-file="$dir/munged.pid"
    slurmctld -f "$conf"
    slurmd -f "$conf"
    for _ in $(seq 1 60); do
      if sinfo -h -o %T 2>/dev/null | grep -qE "^idle"; then echo "[slurm_local] up: node $host, partition debug, $cpus CPUs"; exit 0; fi
      sleep 0.5
    done
    echo "[slurm_local] the node did not come up idle in 30 s; logs in $dir/log" >&2
    sinfo >&2 || true
    exit 1
    ;;
  stop)
    for daemon in slurmd slurmctld munged; do
      pid_file="$dir/$daemon.pid"
      if [ -f "$pid_file" ] && kill "$(cat "$pid_file")" 2> /dev/null; then echo "[slurm_local] stopped $daemon"; fi
    done
    ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
