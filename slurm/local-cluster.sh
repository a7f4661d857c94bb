#!/usr/bin/env bash
# A real SLURM cluster (slurmctld + one or more slurmd [+ slurmdbd + MariaDB]) for
# tests and CI on a single Debian bookworm machine without systemd or cgroups.
#
#   bash slurm/local-cluster.sh start [--nodes N]   # install if needed, configure, start, wait until idle
#   bash slurm/local-cluster.sh stop                # cancel jobs, stop every daemon (no-op if none runs)
#   bash slurm/local-cluster.sh status [--nodes N]  # exit 0 iff every node is usable (and sacct answers)
#   bash slurm/local-cluster.sh purge               # stop + delete state, database, logs and our config
#
# One node (default): node `hostname -s` at 127.0.0.1, slurmd on port 6818.
# N >= 2 nodes: node1..nodeN at 127.0.0.2..127.0.0.(N+1), one slurmd each (`slurmd -N nodeI`,
# port 6820+I, own spool/pid/log via %n); their names go into /etc/hosts (tagged lines,
# removed on stop) so a job's first host resolves to its node's address.
#
# Knobs (environment):
#   SLURM_LOCAL_NODES       number of nodes (--nodes wins)  (default 1)
#   SLURM_LOCAL_DIR         state/log/db folder            (default /var/tmp/clipit-slurm)
#   SLURM_LOCAL_ACCOUNTING  1: slurmdbd + MariaDB, 0: none  (default 1; submitit needs sacct)
#   SLURM_LOCAL_CPUS        CPUs advertised by each node    (default 8)
#   SLURM_LOCAL_TIMEOUT     seconds to wait for the nodes   (default 120)
#   SLURM_LOCAL_DB_PORT     MariaDB TCP port on 127.0.0.1   (default 33061)
#
# See docs/slurm.md for what is configured and why.
set -Eeuo pipefail

MARKER="# managed by clipit slurm/local-cluster.sh -- do not edit, regenerated on start"
DIR=${SLURM_LOCAL_DIR:-/var/tmp/clipit-slurm}
ACCOUNTING=${SLURM_LOCAL_ACCOUNTING:-1}
CPUS=${SLURM_LOCAL_CPUS:-8}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-120}
DB_PORT=${SLURM_LOCAL_DB_PORT:-33061}
NODES=${SLURM_LOCAL_NODES:-1}
NODES_GIVEN=0
if [[ -n ${SLURM_LOCAL_NODES:-} ]]; then NODES_GIVEN=1; fi
CONF_DIR=/etc/slurm
SLURM_CONF_FILE=$CONF_DIR/slurm.conf
DBD_CONF_FILE=$CONF_DIR/slurmdbd.conf
DIR_STAMP=$DIR/.clipit-local-cluster
DB_USER=slurm
DB_PASS=clipit-local
CLUSTER=clipit
CTLD_PORT=6817
SLURMD_PORT=6818
DBD_PORT=6819
NODE_PORT_BASE=6820   # node I of a multi-node cluster listens on 6820+I
HOSTS_FILE=/etc/hosts
HOSTS_TAG="# clipit-local-cluster"

LOG=$DIR/log
RUN=$DIR/run
MUNGE_PID=/run/munge/munged.pid
MUNGE_LOG=/var/log/munge/munged.log

# Clients (sinfo, sacct, sbatch ...) must read the config this script writes.
export SLURM_CONF=$SLURM_CONF_FILE
export DEBIAN_FRONTEND=noninteractive

say() { printf '[local-cluster] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; dump_logs; exit 1; }

dump_logs() {
  local f d
  for d in munged mariadb slurmdbd slurmctld slurmd; do
    for f in "$LOG/$d.log" "$LOG/$d.out" "$LOG/$d"-*.log "$LOG/$d"-*.out; do
      if [[ $d == munged && $f == "$LOG/munged.log" ]]; then f=$MUNGE_LOG; fi
      [[ -s $f ]] || continue
      printf '\n===== tail -n 25 %s =====\n' "$f" >&2
      tail -n 25 "$f" >&2 || true
    done
  done
  return 0
}

# shellcheck disable=SC2317  # invoked through the ERR trap
on_err() {
  local rc=$? line=$1
  trap - ERR
  say "ERROR: command failed (exit $rc) at line $line: $BASH_COMMAND"
  dump_logs
  exit "$rc"
}
trap 'on_err $LINENO' ERR

# ---------------------------------------------------------------- processes
# A pid is "alive" if /proc/PID/stat exists, its state is not zombie/dead and
# its command name matches.  kill -0 is not enough: zombies answer it until
# PID 1 reaps them (slurm.md gotcha 12).
pid_alive() { # pid [comm]
  local pid=$1 comm=${2:-} stat rest state
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  read -r stat 2>/dev/null <"/proc/$pid/stat" || return 1
  rest=${stat##*) }          # fields after "(comm) "
  state=${rest%% *}
  if [[ $state == Z || $state == X || $state == x ]]; then return 1; fi
  if [[ -n $comm ]]; then
    local c
    read -r c 2>/dev/null <"/proc/$pid/comm" || return 1
    [[ $c == "$comm" ]] || return 1
  fi
  return 0
}

pidfile_pid() { # pidfile -> prints pid (may be empty)
  local p=""
  if [[ -r $1 ]]; then p=$(tr -dc '0-9' <"$1" 2>/dev/null || true); fi
  printf '%s' "$p"
}

daemon_alive() { # pidfile comm
  local pid
  pid=$(pidfile_pid "$1")
  [[ -n $pid ]] || return 1
  pid_alive "$pid" "$2"
}

# Send SIGTERM to each (pidfile comm) pair, wait up to $wait s, then SIGKILL.
stop_daemons() { # wait_s pidfile comm [pidfile comm ...]
  local wait_s=$1; shift
  local -a pids=() comms=()
  local pidfile comm pid i
  while (($#)); do
    pidfile=$1 comm=$2; shift 2
    pid=$(pidfile_pid "$pidfile")
    if [[ -n $pid ]] && pid_alive "$pid" "$comm"; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid"); comms+=("$comm")
    fi
    rm -f "$pidfile"
  done
  ((${#pids[@]})) || return 0
  local deadline=$((SECONDS + wait_s)) any
  while :; do
    any=0
    for i in "${!pids[@]}"; do
      if pid_alive "${pids[$i]}" "${comms[$i]}"; then any=1; fi
    done
    ((any)) || break
    if ((SECONDS >= deadline)); then
      for i in "${!pids[@]}"; do
        if pid_alive "${pids[$i]}" "${comms[$i]}"; then
          say "${comms[$i]} (pid ${pids[$i]}) ignored SIGTERM, sending SIGKILL"
          kill -KILL "${pids[$i]}" 2>/dev/null || true
        fi
      done
      break
    fi
    sleep 0.1
  done
  return 0
}

# slurmstepd processes left behind by a dead or stopped slurmd keep their job
# processes running (a SIGKILLed cluster leaves them behind, gotcha 11).  Only
# called while our slurmd is not running: every slurmstepd is then an orphan
# whose job is cancelled anyway.  Kills each one with all its descendants.
kill_orphan_stepds() {
  local -A kids=()
  local -a stepds=() queue=() victims=()
  local d pid stat rest ppid comm
  for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    stat=""
    read -r stat 2>/dev/null <"$d/stat" || continue
    rest=${stat##*) }      # "S PPID ..."
    ppid=${rest#* }
    ppid=${ppid%% *}
    kids[$ppid]+="$pid "
    comm=${stat#*(}
    comm=${comm%)*}
    if [[ $comm == slurmstepd && ${rest%% *} != Z ]]; then stepds+=("$pid"); fi
  done
  ((${#stepds[@]})) || return 0
  queue=("${stepds[@]}")
  while ((${#queue[@]})); do
    pid=${queue[0]}
    queue=("${queue[@]:1}")
    victims+=("$pid")
    # shellcheck disable=SC2206
    queue+=(${kids[$pid]:-})
  done
  say "killing ${#stepds[@]} leftover slurmstepd process(es) and their jobs: ${victims[*]}"
  kill -KILL "${victims[@]}" 2>/dev/null || true
  return 0
}

# ---------------------------------------------------------------- packages
pkg_installed() { # pkg
  local s
  s=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) || return 1
  [[ $s == "install ok installed" ]]
}

ensure_packages() {
  local -a want=(munge slurmctld slurmd slurm-client) missing=()
  if [[ $ACCOUNTING == 1 ]]; then want+=(slurmdbd mariadb-server); fi
  local p
  for p in "${want[@]}"; do
    if ! pkg_installed "$p"; then missing+=("$p"); fi
  done
  ((${#missing[@]})) || return 0
  say "installing ${missing[*]} (apt)"
  apt-get update -qq >"$LOG/apt.log" 2>&1 || die "apt-get update failed (see $LOG/apt.log)"
  # policy-rc.d (exit 101) keeps the postinst scripts from starting daemons;
  # without it they might try, which is harmless without systemd.
  apt-get install -y -qq --no-install-recommends "${want[@]}" >>"$LOG/apt.log" 2>&1 \
    || { tail -n 30 "$LOG/apt.log" >&2; die "apt-get install failed"; }
  return 0
}

# ---------------------------------------------------------------- config
host_short() { hostname -s 2>/dev/null || hostname; }

# The nodes this invocation works on, in NODE_LIST (name) and NODE_ADDR (address).
# start: from --nodes / SLURM_LOCAL_NODES.  stop/status: from the written slurm.conf,
# so they act on the cluster that runs, whatever it was started with.
NODE_LIST=()
NODE_ADDR=()
plan_nodes() { # count
  local i
  NODE_LIST=() NODE_ADDR=()
  if (($1 == 1)); then
    NODE_LIST=("$(host_short)") NODE_ADDR=(127.0.0.1)
    return 0
  fi
  for ((i = 1; i <= $1; i++)); do
    NODE_LIST+=("node$i") NODE_ADDR+=("127.0.0.$((i + 1))")
  done
  return 0
}

configured_nodes() {
  local line name addr
  NODE_LIST=() NODE_ADDR=()
  if has_marker "$SLURM_CONF_FILE"; then
    while read -r line; do
      name=${line#NodeName=}; name=${name%% *}
      addr=${line#* NodeAddr=}; addr=${addr%% *}
      NODE_LIST+=("$name") NODE_ADDR+=("$addr")
    done < <(grep '^NodeName=' "$SLURM_CONF_FILE" || true)
  fi
  if ((${#NODE_LIST[@]} == 0)); then plan_nodes 1; fi
  return 0
}

multi_node() { ((${#NODE_LIST[@]} > 1)); }

# One node keeps the historical single-node layout (slurmd.pid, slurmd.log).
slurmd_pidfile() { # node
  if multi_node; then printf '%s' "$RUN/slurmd-$1.pid"; else printf '%s' "$RUN/slurmd.pid"; fi
}

# Node line from `slurmd -C`, with 90% of RealMemory (a node declared with
# more than it has gets drained, gotcha 9) and SLURM_LOCAL_CPUS CPUs.
node_line() { # name addr [port]
  local host=$1 addr=$2 port=${3:+ Port=$3} line kv key val
  local cpus="" boards=1 sockets=1 cores="" threads=1 mem=""
  line=$(slurmd -C 2>/dev/null | head -n 1) || true
  for kv in $line; do
    key=${kv%%=*} val=${kv#*=}
    case $key in
      CPUs) cpus=$val ;;
      Boards) boards=$val ;;
      SocketsPerBoard) sockets=$val ;;
      CoresPerSocket) cores=$val ;;
      ThreadsPerCore) threads=$val ;;
      RealMemory) mem=$val ;;
    esac
  done
  if [[ -z $cpus ]]; then cpus=$(nproc); fi
  if [[ -z $cores ]]; then cores=$cpus; fi
  if [[ -z $mem ]]; then mem=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo); fi
  mem=$((mem * 9 / 10))
  if [[ -n $CPUS && $CPUS != "$cpus" ]]; then
    # Advertise CPUS cores (config_overrides makes slurmd report the
    # configured topology instead of the real one).
    printf 'NodeName=%s NodeAddr=%s%s CPUs=%s Boards=1 SocketsPerBoard=1 CoresPerSocket=%s ThreadsPerCore=1 RealMemory=%s State=UNKNOWN\n' \
      "$host" "$addr" "$port" "$CPUS" "$CPUS" "$mem"
  else
    printf 'NodeName=%s NodeAddr=%s%s CPUs=%s Boards=%s SocketsPerBoard=%s CoresPerSocket=%s ThreadsPerCore=%s RealMemory=%s State=UNKNOWN\n' \
      "$host" "$addr" "$port" "$cpus" "$boards" "$sockets" "$cores" "$threads" "$mem"
  fi
}

render_slurm_conf() {
  local host=$1 spool=$DIR/spool pidf=$RUN/slurmd.pid logf=$LOG/slurmd.log title="One-node" i
  if multi_node; then
    # Several slurmd on one machine: %n (the node name) keeps their files apart.
    spool=$DIR/spool/%n pidf=$RUN/slurmd-%n.pid logf=$LOG/slurmd-%n.log title="${#NODE_LIST[@]}-node"
  fi
  cat <<EOF
$MARKER
# $title cluster for clipit tests/CI. See docs/slurm.md.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs wait cred_expire before restarting (default 120 s), gotcha 4.
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$pidf
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$logf
SlurmctldDebug=info
SlurmdDebug=info
# No systemd/cgroups here: track processes via /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
# Memory is not consumable (gotcha 10): jobs are limited by CPUs only.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Start jobs immediately (batch_sched_delay defaults to 3 s) and re-scan for
# pending/requeued jobs every 1-2 s instead of every 60 s (gotcha 4).
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=1
# submitit's job process ignores SIGTERM: do not hold the CPUs for 30 s (gotcha 3).
KillWait=5
# submitit requeues checkpointed jobs with scontrol requeue.
JobRequeue=1
MaxArraySize=1001
ReturnToService=2
SlurmdParameters=config_overrides
# If a preemption policy is ever added, deliver the job's --signal (submitit
# uses USR2@90 to checkpoint and requeue) at preemption time too.
SlurmctldParameters=preempt_send_user_signal
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
EOF
  if [[ $ACCOUNTING == 1 ]]; then
    cat <<EOF
# sacct (needed by submitit to see failed/cancelled jobs, gotcha 1) via slurmdbd.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
JobCompType=jobcomp/none
EOF
  else
    cat <<EOF
# Accounting disabled (SLURM_LOCAL_ACCOUNTING=0): sacct fails, and submitit
# cannot detect jobs that die without a result (gotcha 1).
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
EOF
  fi
  if multi_node; then
    # slurmd binds 0.0.0.0 whatever NodeAddr says: one port per node.
    for i in "${!NODE_LIST[@]}"; do
      node_line "${NODE_LIST[$i]}" "${NODE_ADDR[$i]}" $((NODE_PORT_BASE + i + 1))
    done
  else
    node_line "$host" 127.0.0.1
  fi
  printf 'PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n'
}

render_dbd_conf() {
  cat <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
}

has_marker() { [[ -f $1 ]] && grep -qxF "$MARKER" "$1"; }

# install_file content_file dest mode -> returns 0 if changed, 1 if unchanged
install_file() {
  local src=$1 dest=$2 mode=$3
  if [[ -f $dest ]] && cmp -s "$src" "$dest"; then
    rm -f "$src"
    return 1
  fi
  if [[ -f $dest ]] && ! has_marker "$dest"; then
    cp -p "$dest" "$dest.clipit-backup.$(date +%s)"
    say "backed up foreign $dest"
  fi
  install -m "$mode" -o root -g root "$src" "$dest"
  rm -f "$src"
  return 0
}

CONFIG_CHANGED=0
DBD_CONFIG_CHANGED=0
write_configs() {
  local host tmp
  host=$(host_short)
  mkdir -p "$CONF_DIR"
  tmp=$(mktemp)
  render_slurm_conf "$host" >"$tmp"
  if install_file "$tmp" "$SLURM_CONF_FILE" 644; then
    CONFIG_CHANGED=1
    say "wrote $SLURM_CONF_FILE"
  fi
  if [[ $ACCOUNTING == 1 ]]; then
    tmp=$(mktemp)
    render_dbd_conf >"$tmp"
    if install_file "$tmp" "$DBD_CONF_FILE" 600; then
      DBD_CONFIG_CHANGED=1
      say "wrote $DBD_CONF_FILE"
    fi
    chmod 600 "$DBD_CONF_FILE"
  fi
  return 0
}

# ---------------------------------------------------------------- /etc/hosts
# Jobs find their first host by name (MASTER_ADDR, multinode.sbatch's MAIN_ADDR):
# nodeI must resolve to its 127.0.0.x.  Our lines carry HOSTS_TAG; the file is
# rewritten in place (it may be a bind mount) and only when it changes.
set_host_entries() { # [name addr ...]
  local tmp line
  tmp=$(mktemp)
  if [[ -f $HOSTS_FILE ]]; then
    while IFS= read -r line || [[ -n $line ]]; do
      if [[ $line != *"$HOSTS_TAG" ]]; then printf '%s\n' "$line"; fi
    done <"$HOSTS_FILE" >"$tmp"
  fi
  while (($#)); do
    printf '%s %s %s\n' "$2" "$1" "$HOSTS_TAG" >>"$tmp"
    shift 2
  done
  if [[ -f $HOSTS_FILE ]] && cmp -s "$tmp" "$HOSTS_FILE"; then rm -f "$tmp"; return 0; fi
  cat "$tmp" >"$HOSTS_FILE"
  rm -f "$tmp"
  return 0
}

write_host_entries() {
  local -a pairs=()
  local i got
  if multi_node; then
    for i in "${!NODE_LIST[@]}"; do pairs+=("${NODE_LIST[$i]}" "${NODE_ADDR[$i]}"); done
  fi
  set_host_entries "${pairs[@]}"
  if multi_node; then
    for i in "${!NODE_LIST[@]}"; do
      got=$(getent ahostsv4 "${NODE_LIST[$i]}" 2>/dev/null | awk 'NR == 1 {print $1}' || true)
      [[ $got == "${NODE_ADDR[$i]}" ]] \
        || die "${NODE_LIST[$i]} resolves to '${got}', not ${NODE_ADDR[$i]}: remove the other entry for it from $HOSTS_FILE"
    done
  fi
  return 0
}

# ---------------------------------------------------------------- munge
start_munge() {
  if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile=/etc/munge/munge.key --force
    else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 755 /run/munge
  if daemon_alive "$MUNGE_PID" munged; then return 0; fi
  rm -f "$MUNGE_PID" /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  runuser -u munge -- /usr/sbin/munged </dev/null >>"$LOG/munged.out" 2>&1 \
    || die "munged failed to start"
  local i
  for i in $(seq 50); do
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  die "munge does not answer"
}

# ---------------------------------------------------------------- mariadb
DB_SOCK=$RUN/mariadb.sock
DB_PIDFILE=$RUN/mariadb.pid

db_cli() { mariadb --no-defaults --socket="$DB_SOCK" -uroot "$@"; }

start_mariadb() {
  local datadir=$DIR/mysql
  if daemon_alive "$DB_PIDFILE" mariadbd; then return 0; fi
  if [[ ! -d $datadir/mysql ]]; then
    say "initialising MariaDB datadir $datadir"
    rm -rf "$datadir"
    mkdir -p "$datadir"
    mariadb-install-db --no-defaults --datadir="$datadir" --user=root \
      --auth-root-authentication-method=socket --skip-test-db \
      >>"$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $LOG/mariadb-install.log)"
  fi
  rm -f "$DB_SOCK" "$DB_PIDFILE"
  setsid -f /usr/sbin/mariadbd --no-defaults --user=root \
    --datadir="$datadir" --socket="$DB_SOCK" --pid-file="$DB_PIDFILE" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
    --log-error="$LOG/mariadb.log" --innodb-use-native-aio=0 \
    --innodb-buffer-pool-size=256M --innodb-log-file-size=64M \
    --innodb-lock-wait-timeout=900 --max-connections=200 \
    </dev/null >>"$LOG/mariadb.out" 2>&1
  local i
  for i in $(seq 300); do
    if db_cli -e 'SELECT 1' >/dev/null 2>&1; then break; fi
    sleep 0.1
  done
  db_cli -e 'SELECT 1' >/dev/null 2>&1 || die "MariaDB did not come up"
  if [[ ! -f $datadir/.clipit-grants ]]; then
    db_cli <<EOF
CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO '$DB_USER'@'127.0.0.1';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
EOF
    touch "$datadir/.clipit-grants"
  fi
  return 0
}

# ---------------------------------------------------------------- slurm
start_slurmdbd() {
  if daemon_alive "$RUN/slurmdbd.pid" slurmdbd; then return 0; fi
  rm -f "$RUN/slurmdbd.pid"
  slurmdbd </dev/null >>"$LOG/slurmdbd.out" 2>&1 || die "slurmdbd failed to start"
  local i
  for i in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$DBD_PORT") 2>/dev/null; then return 0; fi
    if ! daemon_alive "$RUN/slurmdbd.pid" slurmdbd && ((i > 10)); then break; fi
    sleep 0.1
  done
  die "slurmdbd is not listening on port $DBD_PORT"
}

CTLD_STARTED=0
start_slurmctld() {
  if daemon_alive "$RUN/slurmctld.pid" slurmctld; then return 0; fi
  rm -f "$RUN/slurmctld.pid"
  slurmctld </dev/null >>"$LOG/slurmctld.out" 2>&1 || die "slurmctld failed to start"
  CTLD_STARTED=1
  return 0
}

any_slurmd_alive() {
  local f
  for f in "$RUN"/slurmd.pid "$RUN"/slurmd-*.pid; do
    if daemon_alive "$f" slurmd; then return 0; fi
  done
  return 1
}

start_slurmds() {
  local node pidf
  # After a full restart every recovered job is cancelled anyway: kill the job
  # processes of the previous incarnation.  If only slurmd died, its steps
  # survive and the new slurmd re-attaches to them.
  if ((CTLD_STARTED)) && ! any_slurmd_alive; then kill_orphan_stepds; fi
  for node in "${NODE_LIST[@]}"; do
    pidf=$(slurmd_pidfile "$node")
    if daemon_alive "$pidf" slurmd; then continue; fi
    rm -f "$pidf"
    if multi_node; then
      mkdir -p "$DIR/spool/$node"
      slurmd -N "$node" </dev/null >>"$LOG/slurmd-$node.out" 2>&1 || die "slurmd for $node failed to start"
    else
      slurmd </dev/null >>"$LOG/slurmd.out" 2>&1 || die "slurmd failed to start"
    fi
  done
  return 0
}

# State of one node, e.g. "idle", "mixed", "down*", or "" if unknown.
node_state() { # [node]
  sinfo -h -N -n "${1:-${NODE_LIST[0]}}" -o '%T' 2>/dev/null | head -n 1 || true
}

# "node1 idle, node2 mixed"
node_states() {
  local node out=""
  for node in "${NODE_LIST[@]}"; do out+="${out:+, }$node $(node_state "$node")"; done
  printf '%s' "$out"
}

ctld_answers() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

sacct_answers() {
  [[ $ACCOUNTING == 1 ]] || return 0
  sacct -n -X -S now-1minutes -o JobID >/dev/null 2>&1
}

node_usable() { # strict: require idle; every node must be usable
  local st node
  for node in "${NODE_LIST[@]}"; do
    st=$(node_state "$node")
    if [[ ${1:-} == strict ]]; then
      [[ $st == idle ]] || return 1
    else
      case $st in
        idle|mixed|allocated|completing) ;;
        *) return 1 ;;
      esac
    fi
  done
  return 0
}

# After slurmctld restarts following an unclean stop (SIGKILL), it recovers
# "ghost" running jobs that keep the node busy for ~60 s (gotcha 11).
# Cancel every recovered job and bounce the node DOWN -> RESUME.
clean_recovered_state() {
  local node jobs st i
  for i in $(seq 100); do
    if ctld_answers; then break; fi
    sleep 0.1
  done
  jobs=$(squeue -h -o '%A' 2>/dev/null | tr '\n' ' ' || true)
  if [[ -n ${jobs// /} ]]; then
    say "cancelling jobs recovered from a previous run: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs >/dev/null 2>&1 || true
  fi
  if [[ $ACCOUNTING == 1 ]]; then
    # Jobs lost with the killed slurmctld stay RUNNING in the database
    # ("runaway jobs"); close them so sacct does not report stale states.
    sacctmgr -i show runawayjobs >/dev/null 2>&1 || true
  fi
  for node in "${NODE_LIST[@]}"; do
    st=$(node_state "$node")
    case $st in
      ''|idle|unknown*|idle\**) ;;   # fresh node or still registering: nothing to fix
      *)
        say "node $node state '$st' after restart: setting DOWN then RESUME"
        scontrol update NodeName="$node" State=DOWN Reason="clipit local-cluster restart" >/dev/null 2>&1 || true
        scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
        ;;
    esac
  done
  return 0
}

wait_ready() { # deadline strict
  local deadline=$1 strict=$2 last_fix=$((SECONDS - 10)) st node
  while :; do
    if ctld_answers && node_usable "$strict" && sacct_answers; then return 0; fi
    if ((SECONDS >= deadline)); then break; fi
    # A node left DOWN/DRAINED (e.g. by a previous kill) is resumed, retried every 10 s.
    if ((SECONDS - last_fix >= 10)); then
      for node in "${NODE_LIST[@]}"; do
        st=$(node_state "$node")
        if [[ $st == down* || $st == drain* ]]; then
          say "node $node is '$st': RESUME"
          scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
          last_fix=$SECONDS
        fi
      done
    fi
    sleep 0.2
  done
  say "cluster not ready after ${TIMEOUT}s: $(node_states)"
  sinfo -N -l >&2 2>&1 || true
  squeue >&2 2>&1 || true
  if [[ $ACCOUNTING == 1 ]]; then sacct -n -X -S now-1minutes >&2 2>&1 || true; fi
  dump_logs
  return 1
}

# ---------------------------------------------------------------- commands
all_running() {
  daemon_alive "$MUNGE_PID" munged || return 1
  if [[ $ACCOUNTING == 1 ]]; then
    daemon_alive "$DB_PIDFILE" mariadbd || return 1
    daemon_alive "$RUN/slurmdbd.pid" slurmdbd || return 1
  fi
  daemon_alive "$RUN/slurmctld.pid" slurmctld || return 1
  local node
  for node in "${NODE_LIST[@]}"; do
    daemon_alive "$(slurmd_pidfile "$node")" slurmd || return 1
  done
  return 0
}

cmd_start() {
  local t0=$SECONDS
  plan_nodes "$NODES"
  mkdir -p "$DIR" "$LOG" "$RUN" "$DIR/state" "$DIR/spool"
  touch "$DIR_STAMP"
  ensure_packages
  write_configs
  write_host_entries
  if ((CONFIG_CHANGED || DBD_CONFIG_CHANGED)); then
    # A slurm.conf that differs between running daemons and the file logs
    # errors (gotcha 8): restart whatever runs with an old config (also when
    # the node count changed: the old slurmd are stopped by their pid files).
    if daemon_alive "$RUN/slurmctld.pid" slurmctld || any_slurmd_alive \
       || daemon_alive "$RUN/slurmdbd.pid" slurmdbd; then
      say "configuration changed: restarting slurm daemons"
      stop_slurm_daemons
    fi
  elif all_running && ctld_answers && node_usable && sacct_answers; then
    say "already running ($(node_states))"
    return 0
  fi
  start_munge
  if [[ $ACCOUNTING == 1 ]]; then
    start_mariadb
    start_slurmdbd
  else
    stop_daemons 15 "$RUN/slurmdbd.pid" slurmdbd
    stop_daemons 30 "$DB_PIDFILE" mariadbd
  fi
  start_slurmctld
  start_slurmds
  if ((CTLD_STARTED)); then clean_recovered_state; fi
  # A freshly started slurmctld has no jobs left (see clean_recovered_state):
  # wait for "idle".  Otherwise jobs may legitimately be running.
  local strict=""
  if ((CTLD_STARTED)); then strict=strict; fi
  wait_ready $((SECONDS + TIMEOUT)) "$strict" || exit 1
  say "ready in $((SECONDS - t0)) s: ${#NODE_LIST[@]} node(s) ($(node_states)), partition debug, SLURM_CONF=$SLURM_CONF_FILE"
  return 0
}

cancel_all_jobs() {
  local jobs i
  ctld_answers || return 0
  jobs=$(squeue -h -o '%A' 2>/dev/null | tr '\n' ' ' || true)
  [[ -n ${jobs// /} ]] || return 0
  say "cancelling jobs: $jobs"
  # shellcheck disable=SC2086
  scancel $jobs >/dev/null 2>&1 || true
  # Give slurmstepd a moment to kill the job processes (KillWait=5).
  for i in $(seq 80); do
    if [[ -z $(squeue -h -t running,completing -o '%A' 2>/dev/null || true) ]]; then break; fi
    sleep 0.1
  done
  return 0
}

stop_slurm_daemons() {
  local -a slurmds=()
  local f
  for f in "$RUN"/slurmd.pid "$RUN"/slurmd-*.pid; do
    if [[ -e $f ]]; then slurmds+=("$f" slurmd); fi
  done
  stop_daemons 15 "${slurmds[@]}" "$RUN/slurmctld.pid" slurmctld
  kill_orphan_stepds
  stop_daemons 15 "$RUN/slurmdbd.pid" slurmdbd
  return 0
}

cmd_stop() {
  configured_nodes
  cancel_all_jobs
  stop_slurm_daemons
  stop_daemons 30 "$DB_PIDFILE" mariadbd
  stop_daemons 10 "$MUNGE_PID" munged
  set_host_entries   # drop our node names from /etc/hosts
  say "stopped"
  return 0
}

cmd_status() {
  if ! command -v sinfo >/dev/null; then say "slurm is not installed"; return 1; fi
  if [[ ! -f $SLURM_CONF_FILE ]]; then say "no $SLURM_CONF_FILE"; return 1; fi
  configured_nodes
  if ((NODES_GIVEN)) && ((${#NODE_LIST[@]} != NODES)); then
    say "configured with ${#NODE_LIST[@]} node(s), not $NODES (bash $0 start --nodes $NODES)"
    return 1
  fi
  if ! all_running; then say "not running"; return 1; fi
  if ! ctld_answers; then say "slurmctld does not answer"; return 1; fi
  if ! node_usable; then say "not every node is usable: $(node_states)"; return 1; fi
  if ! sacct_answers; then say "sacct does not answer"; return 1; fi
  say "running: ${#NODE_LIST[@]} node(s) ($(node_states))"
  return 0
}

cmd_purge() {
  cmd_stop
  if [[ -d $DIR ]]; then
    if [[ -f $DIR_STAMP ]]; then
      rm -rf "$DIR"
      say "removed $DIR"
    else
      say "not removing $DIR: it lacks $DIR_STAMP (not ours)"
    fi
  fi
  local f
  for f in "$SLURM_CONF_FILE" "$DBD_CONF_FILE"; do
    if has_marker "$f"; then rm -f "$f"; say "removed $f"; fi
  done
  return 0
}

if ((EUID != 0)); then
  if command -v sudo >/dev/null; then
    exec sudo -E bash "$0" "$@"
  fi
  die "must run as root"
fi

check_knobs() {
  [[ $ACCOUNTING == 0 || $ACCOUNTING == 1 ]] || { say "SLURM_LOCAL_ACCOUNTING must be 0 or 1"; exit 2; }
  [[ -z $CPUS || $CPUS =~ ^[1-9][0-9]*$ ]] || { say "SLURM_LOCAL_CPUS must be a positive integer"; exit 2; }
  [[ $TIMEOUT =~ ^[0-9]+$ ]] || { say "SLURM_LOCAL_TIMEOUT must be a number of seconds"; exit 2; }
  [[ $DB_PORT =~ ^[0-9]+$ ]] || { say "SLURM_LOCAL_DB_PORT must be a port number"; exit 2; }
  [[ $DIR == /* && $DIR != / ]] || { say "SLURM_LOCAL_DIR must be an absolute path other than /"; exit 2; }
  [[ $NODES =~ ^[1-9][0-9]*$ ]] && ((NODES <= 64)) \
    || { say "the node count (--nodes / SLURM_LOCAL_NODES) must be 1..64, got '$NODES'"; exit 2; }
  return 0
}

USAGE="usage: $0 start [--nodes N] | stop | status [--nodes N] | purge"
COMMAND=${1:-}
if (($#)); then shift; fi
while (($#)); do
  case $1 in
    --nodes) [[ $# -ge 2 ]] || { echo "$USAGE" >&2; exit 2; }; NODES=$2; NODES_GIVEN=1; shift 2 ;;
    --nodes=*) NODES=${1#--nodes=}; NODES_GIVEN=1; shift ;;
    *) echo "$USAGE" >&2; exit 2 ;;
  esac
done
check_knobs

case $COMMAND in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) if cmd_status; then exit 0; else exit 1; fi ;;
  purge) cmd_purge ;;
  *) echo "$USAGE" >&2; exit 2 ;;
esac
exit 0
