#!/usr/bin/env bash
# A local S3 endpoint (moto's server) on 127.0.0.1 with one bucket, for trying the archive job
# against s3:// by hand, as the tests do. Credentials are dummies; nothing reaches AWS.
#
#   eval "$(infra/s3-local.sh start [STATE_DIR])"   # exports AWS_ENDPOINT_URL & co, makes the bucket
#   infra/s3-local.sh stop [STATE_DIR]
#
# Settings (environment): S3_LOCAL_PORT (default: a free port), S3_LOCAL_BUCKET (default resdsn;
# moto refuses names under 3 characters), PYTHON (default: the repo's .venv).
# Credentials reach Ray workers only through the environment `ray start` ran in: start this first,
# then the Ray cluster in the same shell (infra/ray-local.sh). A job's runtime env is not private (its
# values show in the State API, the dashboard and Ray's logs), so `runtime-env` prints only the
# non-secret settings (resdsn_ray.cluster.WORKER_ENV: endpoint, region, ...) and the upload excludes:
#   ray job submit --working-dir . --runtime-env-json "$(infra/s3-local.sh runtime-env)" -- python jobs/segment_archive.py ...
set -euo pipefail

cmd=${1:?usage: $0 start|stop|runtime-env [STATE_DIR]}
state=${2:-/tmp/resdsn-s3-$(id -u)}
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
bucket=${S3_LOCAL_BUCKET:-resdsn}

case $cmd in
  start)
    if [[ -f $state/pid ]] && kill -0 "$(cat "$state/pid")" 2>/dev/null; then cat "$state/env"; exit 0; fi
    mkdir -p "$state"
    port=${S3_LOCAL_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
    "$python" -m moto.server -H 127.0.0.1 -p "$port" >"$state/server.log" 2>&1 &
    echo $! >"$state/pid"
    cat >"$state/env" <<ENV
export AWS_ENDPOINT_URL=http://127.0.0.1:$port
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1
ENV
    for _ in $(seq 100); do
      (set -a; source "$state/env"; "$python" -c "import boto3; boto3.client('s3').list_buckets()") 2>/dev/null && break
      sleep 0.2
    done
    (set -a; source "$state/env"; "$python" -c "import boto3; boto3.client('s3').create_bucket(Bucket='$bucket')")
    cat "$state/env"
    echo "# bucket: s3://$bucket"
    ;;
  stop)
    if [[ -f $state/pid ]]; then kill "$(cat "$state/pid")" 2>/dev/null || true; fi
    rm -f "$state/pid" "$state/env"
    ;;
  runtime-env)  # the non-secret S3 settings as a Ray runtime_env JSON (for ray job submit)
    (set -a; source "$state/env"; "$python" -c \
      'import json; from resdsn_ray.cluster import worker_env; print(json.dumps({"env_vars": worker_env(), "excludes": [".venv", ".git", "demo-output"]}))')
    ;;
  *) echo "usage: $0 start|stop|runtime-env [STATE_DIR]" >&2; exit 2 ;;
esac
