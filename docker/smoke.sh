#!/usr/bin/env bash
# Smoke test of the deployment stack, for real (minutes; not part of the default test run):
#   1. a base image: python:3.11-slim when a registry answers, else a Debian bookworm rootfs made
#      with debootstrap and imported (needs root, debootstrap, and a Debian mirror)
#   2. the diffcl image from docker/Dockerfile (size and build time printed)
#   3. `diffcl run` on the demo data inside it
#   4. the compose stack (docker/compose.yaml): PostgreSQL, Prefect server, process worker; then the
#      deployment diffcl/full-pipeline-pool run through the server to Completed, twice (the second
#      run's cache hits counted), and the flow runs read back from PostgreSQL
# Usage: docker/smoke.sh   (from anywhere; run as root for the debootstrap path)
# Environment: ENGINE=podman|docker, BASE_IMAGE=<image> (skip step 1), SMOKE_EPOCHS=5 (train.epochs
# for the smoke runs; empty for the config's own), SMOKE_KEEP=1 (leave the stack up),
# SMOKE_WORK=/tmp/diffcl-smoke (rootfs, env file, logs), DEBIAN_MIRROR=<url>.
# Heavy steps run under `nice -n 19`.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
WORK=${SMOKE_WORK:-/tmp/diffcl-smoke}
mkdir -p "$WORK"
IMAGE=${DIFFCL_IMAGE:-localhost/diffcl:smoke}
EPOCHS=${SMOKE_EPOCHS-5}
NICE="nice -n 19"
T0=$(date +%s)
declare -a TIMINGS=()

step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; STEP_START=$(date +%s); STEP_NAME="$*"; }
done_step() {
  local secs=$(( $(date +%s) - STEP_START ))
  TIMINGS+=("$(printf '%6ss  %s' "$secs" "$STEP_NAME")")
  echo "--- ${STEP_NAME}: ${secs}s"
}
report() {
  echo; echo "=== timings"
  printf '%s\n' "${TIMINGS[@]}"
  echo "total: $(( $(date +%s) - T0 ))s"
}
trap report EXIT

# ---------------------------------------------------------------- engine
ENGINE=${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
command -v "$ENGINE" >/dev/null || { echo "no podman or docker on PATH" >&2; exit 1; }
if [ "$ENGINE" = podman ] && [ -z "${CONTAINERS_CONF:-}" ]; then
  # Sandboxed hosts: no setrlimit, no systemd, cgroups crun cannot use. Harmless elsewhere.
  cat > "$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = []
netns = "host"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
  export CONTAINERS_CONF="$WORK/containers.conf"
fi
echo "engine: $($ENGINE --version)"

# ---------------------------------------------------------------- 1. base image
declare -a BUILD_ARGS=()
if [ -z "${BASE_IMAGE:-}" ]; then
  step "base image"
  if timeout 60 $ENGINE pull -q docker.io/library/python:3.11-slim >/dev/null 2>&1; then
    BASE_IMAGE=docker.io/library/python:3.11-slim
    POSTGRES_IMAGE=${POSTGRES_IMAGE:-docker.io/library/postgres:16-alpine}
  else
    BASE_IMAGE=localhost/diffcl-base:bookworm
    echo "no registry reachable: base from debootstrap"
    if ! $ENGINE image exists "$BASE_IMAGE" 2>/dev/null && ! $ENGINE image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
      MIRROR=${DEBIAN_MIRROR:-$(grep -hoE '^(URIs:|deb) +https?://[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
                                 | grep -v security | head -1 | awk '{print $2}' || true)}
      MIRROR=${MIRROR:-http://deb.debian.org/debian}
      rootfs="$WORK/rootfs"
      if [ ! -x "$rootfs/usr/bin/python3" ]; then
        rm -rf "$rootfs"
        $NICE debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$MIRROR" \
          > "$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; exit 1; }
      fi
      # The host's CA bundle, so that pip verifies PyPI behind the same proxy as the host.
      cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
      echo "deb $MIRROR bookworm main" > "$rootfs/etc/apt/sources.list"
      tar -C "$rootfs" -c . | $NICE $ENGINE import - "$BASE_IMAGE" >/dev/null
      echo "rootfs $(du -sh "$rootfs" | cut -f1)"
    fi
    POSTGRES_IMAGE=${POSTGRES_IMAGE:-localhost/diffcl-postgres:bookworm}
  fi
  echo "base: $BASE_IMAGE"
  done_step
fi
# A locally made base (BASE_IMAGE=localhost/...) means no registry: PostgreSQL from Debian's package too.
if [[ "$BASE_IMAGE" == localhost/* ]]; then
  POSTGRES_IMAGE=${POSTGRES_IMAGE:-localhost/diffcl-postgres:bookworm}
fi
POSTGRES_IMAGE=${POSTGRES_IMAGE:-docker.io/library/postgres:16-alpine}

# ---------------------------------------------------------------- 2. the image
# The host's local wheels (pip's find-links and file:// indexes), when there are any: podman mounts
# them into the build. A CPU torch needs its CPU torchvision from PyTorch's own index: where that
# index is unreachable, the PyPI (CUDA) torch and torchvision of the local index are used instead,
# as the host's own venv does (a much larger image).
if [ "$ENGINE" = podman ] && [ -z "${SMOKE_NO_LOCAL_WHEELS:-}" ]; then
  FIND_LINKS=$(pip config list 2>/dev/null | sed -nE "s/^global\.find-links='([^' ]+).*/\1/p" | head -1 || true)
  INDEXES=$(pip config list 2>/dev/null | sed -nE "s/^global\.extra-index-url='([^']+)'/\1/p" | head -1 || true)
  [ -d "${FIND_LINKS:-/nonexistent}" ] && BUILD_ARGS+=(--volume "$FIND_LINKS:$FIND_LINKS:ro")
  for dir in ${INDEXES//file:\/\//}; do   # an index's pages link to ../../files: mount its parent
    [ -d "$dir" ] && BUILD_ARGS+=(--volume "$(dirname "$dir"):$(dirname "$dir"):ro")
  done
  [ -d "${FIND_LINKS:-/nonexistent}" ] && BUILD_ARGS+=(--build-arg "PIP_FIND_LINKS=$FIND_LINKS")
  torch_index=""
  for url in $INDEXES; do [ -d "${url#file://}/torchvision" ] && torch_index=$url; done
  if [ -n "$torch_index" ] && ! timeout 20 python3 -c "import urllib.request; urllib.request.urlopen('https://download.pytorch.org/whl/cpu/torch/', timeout=15)" 2>/dev/null; then
    version=$(grep -oE 'torch-[0-9.]+-cp311' "${torch_index#file://}/torch/index.html" | sort -V | tail -1 | cut -d- -f2)
    others=$(for u in $INDEXES; do if [ "$u" != "$torch_index" ]; then printf "%s " "$u"; fi; done)
    BUILD_ARGS+=(--build-arg "TORCH_INDEX_URL=$torch_index" --build-arg "TORCH_SPEC=torch==$version"
                 --build-arg "TORCH_VARIANT=pypi-cuda" --build-arg "PIP_EXTRA_INDEX_URL=${others}https://pypi.org/simple")
    echo "PyTorch's CPU index unreachable: torch $version (PyPI's CUDA build) and torchvision from $torch_index"
  fi
fi
step "build $IMAGE"
$NICE $ENGINE build -f docker/Dockerfile -t "$IMAGE" --build-arg "BASE_IMAGE=$BASE_IMAGE" "${BUILD_ARGS[@]}" . \
  > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
done_step
echo "image size: $($ENGINE image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.0f MB\n", $1/1e6}')"
$ENGINE run --rm "$IMAGE" --help > /dev/null
echo "user in image: $($ENGINE run --rm --entrypoint id "$IMAGE")"

# ---------------------------------------------------------------- 3. diffcl run in the image
declare -a SET=()
[ -n "$EPOCHS" ] && SET=(--set "train.epochs=$EPOCHS")
$ENGINE volume rm -f diffcl-smoke-ws >/dev/null 2>&1 || true
step "diffcl run (demo) in the image"
$ENGINE run --rm -v diffcl-smoke-ws:/app/workspace "$IMAGE" run "${SET[@]}" 2>&1 | tee "$WORK/run.log" | tail -25
[ "${PIPESTATUS[0]}" = 0 ] || exit 1
done_step
step "diffcl run again (cached stages)"
$ENGINE run --rm -v diffcl-smoke-ws:/app/workspace "$IMAGE" run "${SET[@]}" > "$WORK/run2.log" 2>&1 || { tail -30 "$WORK/run2.log"; exit 1; }
echo "cached task runs: $(grep -c "Finished in state Cached" "$WORK/run2.log" || true)"
done_step
$ENGINE volume rm -f diffcl-smoke-ws >/dev/null

# ---------------------------------------------------------------- 4. compose stack
if [[ "$POSTGRES_IMAGE" == localhost/diffcl-postgres:* ]]; then
  step "build PostgreSQL image from Debian's package"
  $NICE $ENGINE build -f docker/postgres/Dockerfile -t "$POSTGRES_IMAGE" --build-arg "BASE_IMAGE=$BASE_IMAGE" . \
    > "$WORK/postgres-build.log" 2>&1 || { tail -30 "$WORK/postgres-build.log"; exit 1; }
  done_step
fi

if [ "$ENGINE" = podman ]; then
  COMPOSE=${COMPOSE:-$(command -v podman-compose || true)}
  if [ -z "$COMPOSE" ]; then
    python3 -m venv "$WORK/compose-venv" && $NICE "$WORK/compose-venv/bin/pip" install -q podman-compose
    COMPOSE="$WORK/compose-venv/bin/podman-compose"
  fi
  # Host networking: the sandboxes this runs in have no container networks.
  FILES=(-f docker/compose.yaml -f docker/compose.hostnet.yaml)
  HOSTNET=1
else
  COMPOSE="docker compose"
  FILES=(-f docker/compose.yaml)
  HOSTNET=0
fi
ENV_FILE="$WORK/smoke.env"
secret() { python3 -c 'import secrets; print(secrets.token_urlsafe(18))'; }
AUTH="smoke:$(secret)"
{
  echo "POSTGRES_PASSWORD=$(secret)"
  echo "PREFECT_SERVER_API_AUTH_STRING=$AUTH"
  echo "DIFFCL_IMAGE=$IMAGE"
  echo "POSTGRES_IMAGE=$POSTGRES_IMAGE"
  if [ "$HOSTNET" = 1 ]; then
    echo "POSTGRES_HOST=127.0.0.1"; echo "POSTGRES_PORT=${SMOKE_PG_PORT:-55432}"
    echo "PREFECT_SERVER_HOST=127.0.0.1"; echo "PREFECT_SERVER_BIND=127.0.0.1"
    echo "PREFECT_SERVER_PORT=${SMOKE_PREFECT_PORT:-54200}"; echo "PREFECT_PORT=${SMOKE_PREFECT_PORT:-54200}"
  fi
} > "$ENV_FILE"
chmod 600 "$ENV_FILE"
set -a; . "$ENV_FILE"; set +a   # for the compose file's interpolation, whatever the tool
compose() { $COMPOSE --env-file "$ENV_FILE" -p diffcl-smoke "${FILES[@]}" "$@"; }
container() { $ENGINE ps -q --filter "label=com.docker.compose.project=diffcl-smoke" --filter "label=com.docker.compose.service=$1" | head -1; }
wait_healthy() {  # service, seconds
  local id; id=$(container "$1")
  for _ in $(seq "$2"); do
    if [ "$ENGINE" = podman ]; then
      $ENGINE healthcheck run "$id" >/dev/null 2>&1 && return 0   # no systemd timers here: probe by hand
    else
      [ "$($ENGINE inspect -f '{{.State.Health.Status}}' "$id")" = healthy ] && return 0
    fi
    sleep 1
  done
  echo "$1 not healthy"; $ENGINE logs --tail 40 "$id"; return 1
}
cleanup_stack() { [ "${SMOKE_KEEP:-0}" = 1 ] || compose down -v > /dev/null 2>&1 || true; }
compose down -v > /dev/null 2>&1 || true

step "compose cold start: postgres, server, worker, deployment registered"
# One service at a time, each once the one before is healthy (podman's health checks need systemd
# timers to run on their own; here they are probed by the script).
compose up -d --no-build postgres > "$WORK/compose.log" 2>&1 || { cat "$WORK/compose.log"; exit 1; }
trap 'cleanup_stack; report' EXIT
wait_healthy postgres 120
echo "  postgres healthy at +$(( $(date +%s) - STEP_START ))s"
compose up -d --no-build --no-deps server >> "$WORK/compose.log" 2>&1
wait_healthy server 240
echo "  server healthy at +$(( $(date +%s) - STEP_START ))s"
compose up -d --no-build --no-deps worker >> "$WORK/compose.log" 2>&1
WORKER=$(container worker)
for _ in $(seq 240); do
  $ENGINE exec "$WORKER" prefect deployment inspect diffcl/full-pipeline-pool > /dev/null 2>&1 && break
  sleep 1
done
$ENGINE exec "$WORKER" prefect deployment inspect diffcl/full-pipeline-pool > /dev/null
for _ in $(seq 120); do $ENGINE logs "$WORKER" 2>&1 | grep -q "started!" && break; sleep 1; done
echo "  deployment registered, worker polling at +$(( $(date +%s) - STEP_START ))s"
done_step

# Unauthenticated clients are refused.
code=$(python3 -c "import urllib.request,urllib.error,sys
try: urllib.request.urlopen('http://127.0.0.1:${PREFECT_PORT:-4200}/api/flows/filter', data=b'{}'); print(200)
except urllib.error.HTTPError as e: print(e.code)
except Exception as e: print('unreachable', e)")
echo "API without the auth string: HTTP $code"

PARAMS='{}'
[ -n "$EPOCHS" ] && PARAMS="{\"overrides\": [\"train.epochs=$EPOCHS\"]}"
run_deployment() {
  $ENGINE exec "$WORKER" prefect deployment run diffcl/full-pipeline-pool --params "$PARAMS" --watch \
    --watch-timeout 1500 > "$WORK/deployment-$1.log" 2>&1 || { tail -30 "$WORK/deployment-$1.log"; $ENGINE logs --tail 60 "$WORKER"; exit 1; }
  grep -E "Flow run finished" "$WORK/deployment-$1.log" | tail -1
  count_states "$(grep -oE 'UUID: [0-9a-f-]+' "$WORK/deployment-$1.log" | head -1 | cut -d' ' -f2)"
}
count_states() {  # a flow run's task states, read back from the server
  $ENGINE exec -i -e "FLOW_RUN_ID=$1" "$WORKER" python - <<'EOF'
import asyncio, collections, os
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
async def main():
    async with get_client() as client:
        run = await client.read_flow_run(os.environ["FLOW_RUN_ID"])
        tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        states = collections.Counter(t.state.name for t in tasks)
        print(f"flow run {run.name}: {run.state.name} in {run.total_run_time}; task runs: {dict(states)}")
asyncio.run(main())
EOF
}

step "deployment run 1 through the server (cold)"
run_deployment 1
done_step
step "deployment run 2 (cache hits expected)"
run_deployment 2
done_step

echo; echo "=== the server's database (PostgreSQL):"
$ENGINE exec "$(container postgres)" psql -p "${POSTGRES_PORT:-5432}" -U prefect -d prefect -At \
  -c "select 'server_version: ' || current_setting('server_version')" \
  -c "select 'flow runs: ' || string_agg(state_name || '=' || n, ', ') from (select state_name, count(*) n from flow_run group by 1) s" \
  -c "select 'deployment schedules: ' || count(*) from deployment_schedule" 2>&1 || true
echo "stack: $($ENGINE ps --filter label=com.docker.compose.project=diffcl-smoke --format '{{.Names}} {{.Status}}' | tr '\n' ';')"
