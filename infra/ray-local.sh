#!/usr/bin/env bash
# A two-node Ray cluster on this machine, for trying `ray job submit` by hand and for the tests:
# a head node and a second worker node, each its own raylet with its own CPUs and a custom
# resource (head_node / node_b), its own temp dir and ports, and a capped object store and
# memory. `stop` ends exactly the processes `start` started (the sessions it created, and the
# job drivers those started): never `ray stop`, which would also kill every other Ray on the
# machine.
#
#   infra/ray-local.sh start [STATE_DIR]   # prints the exports to use (also in STATE_DIR/env)
#   infra/ray-local.sh add-node STATE_DIR NAME   # one more worker node, with the resource NAME
#   infra/ray-local.sh stop  [STATE_DIR]
#
# Settings (environment): RAY_LOCAL_CPUS (per node, default 1), RAY_LOCAL_OBJECT_STORE_MB
# (per node, default 256), RAY_LOCAL_MEMORY_MB (per node, default 2048), PYTHON (default: the
# repo's .venv). The venv's bin/ is put first on the nodes' PATH because `ray job submit --
# python ...` runs the `python` found on the PATH of the node that runs the job.
set -euo pipefail
export RAY_AUTH_MODE=token  # the cluster's default; every client and joining node needs it set

cmd=${1:?usage: $0 start|add-node|stop [STATE_DIR] [NAME]}
state=${2:-/tmp/resdsn-ray-$(id -u)}  # keep it short: Ray's socket paths must fit in 107 bytes
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
bin=$(dirname "$python")
cpus=${RAY_LOCAL_CPUS:-1}
store=$(( ${RAY_LOCAL_OBJECT_STORE_MB:-256} * 1024 * 1024 ))
memory=$(( ${RAY_LOCAL_MEMORY_MB:-2048} * 1024 * 1024 ))
common=(--num-cpus "$cpus" --object-store-memory "$store" --memory "$memory" --temp-dir "$state/tmp"
        --disable-usage-stats --block)  # the flags of every node

free_ports() {  # N free TCP ports on 127.0.0.1
  "$python" - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

node_ports() {  # the per-node port flags; workers get their own range of 64 ports
  local p; read -r -a p <<<"$(free_ports 6)"
  local base=$(( 10000 + RANDOM % 300 * 64 ))  # below the ephemeral range the other ports come from
  echo "--node-manager-port ${p[0]} --object-manager-port ${p[1]} --dashboard-agent-listen-port ${p[2]}" \
       "--dashboard-agent-grpc-port ${p[3]} --runtime-env-agent-port ${p[4]} --metrics-export-port ${p[5]}" \
       "--min-worker-port $base --max-worker-port $(( base + 63 ))"
}

wait_started() {  # `ray start --block` logs this line once its node has joined the cluster
  for _ in $(seq 720); do  # 180 s: a loaded 2-core machine starts a node slowly
    grep -qs "Ray runtime started" "$1" && return 0
    kill -0 "$2" 2>/dev/null || break
    sleep 0.25
  done
  echo "Ray node did not start; see $1 and $state/tmp/session_latest/logs" >&2
  tail -n 20 "$1" >&2
  return 1
}

start() {
  if [[ -f $state/env ]]; then echo "already started (see $state/env); stop it first" >&2; exit 1; fi
  mkdir -p "$state"
  # Token auth needs a token before the head starts: a fresh machine has none, so make the local
  # one (~/.ray/auth_token, as Ray's docs say for local development; an existing one is kept).
  if [[ -z ${RAY_AUTH_TOKEN:-} && -z ${RAY_AUTH_TOKEN_PATH:-} ]]; then
    "$bin/ray" get-auth-token --generate >/dev/null
  fi
  local gcs dash client
  read -r gcs dash client <<<"$(free_ports 3)"
  # setsid: each node's processes (whatever their process group) share a session, which `stop` ends.
  PATH="$bin:$PATH" setsid "$bin/ray" start --head --node-ip-address 127.0.0.1 --port "$gcs" \
      --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$dash" --ray-client-server-port "$client" \
      --resources '{"head_node": 1}' $(node_ports) "${common[@]}" >"$state/head.log" 2>&1 </dev/null &
  echo $! >"$state/head.pid"
  wait_started "$state/head.log" "$(cat "$state/head.pid")" || { stop; exit 1; }
  local address=127.0.0.1:$gcs
  join "$address" worker node_b || { stop; exit 1; }
  cat >"$state/env" <<ENV
export RAY_ADDRESS=http://127.0.0.1:$dash
export RAY_GCS_ADDRESS=$address
export RAY_AUTH_MODE=token
ENV
  cat "$state/env"
}

join() {  # join ADDRESS ROLE RESOURCE: a worker node, its session's leader in $state/ROLE.pid
  local try
  for try in 1 2; do  # a raylet that registers after Ray's fixed 30 s aborts (a loaded machine): once more
    PATH="$bin:$PATH" setsid "$bin/ray" start --address "$1" --node-ip-address 127.0.0.1 \
        --resources "{\"$3\": 1}" $(node_ports) "${common[@]}" >"$state/$2.log" 2>&1 </dev/null &
    echo $! >"$state/$2.pid"
    wait_started "$state/$2.log" "$(cat "$state/$2.pid")" && return 0
    end_sessions "$(cat "$state/$2.pid")"
  done
  return 1
}

add_node() {
  local name=${1:?usage: $0 add-node STATE_DIR NAME}
  [[ -f $state/env ]] || { echo "no cluster in $state; start one first" >&2; exit 1; }
  [[ -f $state/$name.pid ]] && { echo "node $name already added" >&2; exit 1; }
  join "$(sed -n 's/^export RAY_GCS_ADDRESS=//p' "$state/env")" "$name" "$name" && return 0
  rm -f "$state/$name.pid"  # only the node that failed: the cluster lives on
  exit 1
}

ours() {  # live PIDs of the given sessions and of the sessions their processes started (job drivers)
  ps -eo pid=,ppid=,sid=,stat= | awk -v sessions="$*" '
    BEGIN { n = split(sessions, s, " "); for (i = 1; i <= n; i++) S[s[i]] = 1 }
    { pid[NR] = $1; ppid[NR] = $2; sid[NR] = $3; stat[NR] = $4; if ($3 in S) P[$1] = 1 }
    END {
      for (i = 1; i <= NR; i++) if ((ppid[i] in P) && !(sid[i] in S)) D[sid[i]] = 1
      for (i = 1; i <= NR; i++) if (((sid[i] in S) || (sid[i] in D)) && stat[i] !~ /^Z/) print pid[i]
    }'
}

end_sessions() {  # SIGTERM the given sessions' processes, then SIGKILL what is left after 3 s
  local pids
  pids=$(ours "$@")
  [[ -n $pids ]] && kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 12); do
    [[ -z $(ours "$@") ]] && break
    sleep 0.25
  done
  pids=$(ours "$@")
  [[ -n $pids ]] && kill -KILL $pids 2>/dev/null || true
}

stop() {
  # Each `ray start` above ran under setsid, so every process of its node (raylet, GCS, workers,
  # each in its own process group) is in the session it leads; job drivers start their own
  # sessions from a worker. Only those are signalled: other Ray clusters on the machine live on.
  local file sessions=()
  for file in "$state"/*.pid; do
    [[ -f $file ]] && sessions+=("$(cat "$file")")
  done
  [[ ${#sessions[@]} -gt 0 ]] && end_sessions "${sessions[@]}"
  rm -f "$state"/*.pid "$state/env"
}

case $cmd in
  start) start ;;
  add-node) add_node "${3:-}" ;;
  stop) stop ;;
  *) echo "usage: $0 start|add-node|stop [STATE_DIR] [NAME]" >&2; exit 2 ;;
esac
