#!/usr/bin/env bash
# A one-node SLURM cluster in DIR, for the test suite: munged, MariaDB + slurmdbd (so sacct works, as submitit
# needs it to see a cancelled or timed-out job), slurmctld and slurmd on localhost, all state, sockets, logs and
# pid files under DIR, on free ports. Installs slurm-wlm, slurmdbd, munge and mariadb-server with apt-get when
# they are missing (as root). Prints `export SLURM_CONF=...` and writes it to DIR/env.sh.
#
#   tests/slurm/start.sh DIR          start (or exit 3 with one line saying why SLURM cannot run here)
#   tests/slurm/start.sh --stop DIR   cancel every job, stop the daemons (DIR itself is left to its owner)
#   tests/slurm/start.sh --install    only install the packages when missing (.ci/run, before the timed suite)
set -euo pipefail

cannot() { echo "cannot start SLURM: $*" >&2; exit 3; }

stop() {
  local d=$1
  if [ -f "$d/env.sh" ]; then  # end the jobs while slurmd is there to kill their steps
    export SLURM_CONF="$d/etc/slurm.conf"
    scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 100); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  local pids=()
  for name in slurmd slurmctld slurmdbd mariadbd munged; do
    [ -f "$d/run/$name.pid" ] && pids+=("$(cat "$d/run/$name.pid" 2>/dev/null)")
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  kill "${pids[@]}" 2>/dev/null || true
  alive() { for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
  for _ in $(seq 100); do alive || break; sleep 0.1; done
  kill -9 "${pids[@]}" 2>/dev/null || true
}

if [ "${1:-}" = "--stop" ]; then stop "$(realpath "$2")"; exit 0; fi
install() {
  missing=()
  for pair in slurmctld:slurm-wlm slurmdbd:slurmdbd munged:munge mariadbd:mariadb-server; do
    command -v "${pair%%:*}" >/dev/null || [ -x "/usr/sbin/${pair%%:*}" ] || missing+=("${pair#*:}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || cannot "${missing[*]} not installed and not root (apt-get install ${missing[*]})"
    command -v apt-get >/dev/null || cannot "${missing[*]} not installed and no apt-get"
    # daemons are started below, in DIR, never by the packages' init scripts
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; }; } \
      || cannot "apt-get install ${missing[*]} failed"
  fi
}

if [ "${1:-}" = "--install" ]; then install; exit 0; fi
[ $# -eq 1 ] || { echo "usage: $0 DIR | --stop DIR | --install" >&2; exit 2; }
install
[ "$(id -u)" = 0 ] || cannot "the daemons run as root here (SlurmUser=root, slurmd starts jobs as their user)"
export PATH="$PATH:/usr/sbin"

D=$(realpath -m "$1"); mkdir -p "$D"/{etc,run,log,spool,state,db,munge}; chmod 700 "$D/munge"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
read -r P_CTLD P_SLURMD P_DBD P_DB <<<"$(free_port) $(free_port) $(free_port) $(free_port)"
NODE=$(hostname -s); MUNGE="$D/munge/munge.socket"; NAME="ldmscale$$"
trap 'echo "SLURM did not start; logs in $D/log" >&2; stop "$D"' ERR

mungekey --create --keyfile="$D/munge/munge.key" >/dev/null 2>&1
munged --force --key-file="$D/munge/munge.key" --socket="$MUNGE" --pid-file="$D/run/munged.pid" \
  --log-file="$D/log/munged.log" --seed-file="$D/munge/munged.seed" 2>>"$D/log/munged.log"

# accounting: MariaDB on a private socket and port, no grant tables (it listens on 127.0.0.1 only)
mariadb-install-db --no-defaults --datadir="$D/db" --user=root --auth-root-authentication-method=normal \
  --skip-test-db >"$D/log/mariadb-install.log" 2>&1
mariadbd --no-defaults --datadir="$D/db" --socket="$D/run/db.sock" --port="$P_DB" --bind-address=127.0.0.1 \
  --user=root --pid-file="$D/run/mariadbd.pid" --log-error="$D/log/mariadb.log" --skip-grant-tables \
  --innodb-buffer-pool-size=32M --skip-log-bin >/dev/null 2>&1 &
for _ in $(seq 100); do [ -S "$D/run/db.sock" ] && break; sleep 0.1; done

MEM=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
cat >"$D/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$MUNGE
DbdHost=localhost
DbdPort=$P_DBD
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$P_DB
StorageUser=root
StorageLoc=slurm_acct_db
PidFile=$D/run/slurmdbd.pid
LogFile=$D/log/slurmdbd.log
CONF
chmod 600 "$D/etc/slurmdbd.conf"

cat >"$D/etc/slurm.conf" <<CONF
# one node, 2 CPUs, the machine's memory; no cgroups (linuxproc, task/none), so it runs in a container as root
ClusterName=$NAME
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$P_CTLD
SlurmdPort=$P_SLURMD
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE
CredType=cred/munge
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$((MEM / 4))
SlurmdParameters=config_overrides
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$P_DBD
AccountingStoragePass=$MUNGE
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MinJobAge=60
KillWait=5
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=2 RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$D/etc/slurm.conf"

slurmdbd
listening() { python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" "$1" 2>/dev/null; }
for _ in $(seq 100); do listening "$P_DBD" && break; sleep 0.1; done
sacctmgr -n -i add cluster "$NAME" >/dev/null
sacctmgr -n -p list cluster format=cluster | grep -q "^$NAME|" || { echo "slurmdbd did not answer" >&2; false; }
slurmctld
slurmd -N "$NODE"
for _ in $(seq 150); do
  [ "$(sinfo -h -n "$NODE" -o %t 2>/dev/null)" = idle ] && break; sleep 0.2
done
[ "$(sinfo -h -n "$NODE" -o %t)" = idle ] || { echo "node not idle: $(sinfo -h -o '%t %E')" >&2; false; }
trap - ERR
echo "export SLURM_CONF=$SLURM_CONF" | tee "$D/env.sh"
