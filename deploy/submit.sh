#!/usr/bin/env bash
# Submit a dfolora run to a Ray cluster as a Ray job; the driver runs on the head node.
#
#   RAY_ADDRESS=http://127.0.0.1:8265 deploy/submit.sh [--no-wait] CLI-ARGS...
#   e.g. deploy/submit.sh --preset roberta-large-sst2 --set cluster.num_actors=4 \
#            --set cluster.gpus_per_actor=1 --out /shared/runs/roberta-sst2
#
# CLI-ARGS go to `python -m orchestrator.cli run`, which runs in an uploaded copy of this checkout:
# --config paths are relative to the repository root; --out must be an absolute path on the head
# node (ideally shared storage). Resume a stopped run with the same --out plus --resume.
# Auth: RAY_AUTH_MODE=token (the default here) with the cluster's token in RAY_AUTH_TOKEN,
# the file RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token. RAY_AUTH_MODE=disabled is accepted only
# for a loopback address (a local test cluster). SUBMISSION_ID overrides the generated job id.
set -euo pipefail

die() { echo "submit.sh: $*" >&2; exit 2; }

cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repository root: the job's working_dir
command -v ray >/dev/null || die "'ray' not found: install ray[default] (same version as the cluster)"
[[ -n ${RAY_ADDRESS:-} ]] || die "set RAY_ADDRESS to the job server, e.g. http://127.0.0.1:8265
  (via 'ray dashboard deploy/cluster.yaml' or 'kubectl port-forward svc/HEAD-SVC 8265:8265')"

hostport=${RAY_ADDRESS#*://}
hostport=${hostport%%/*}
host=${hostport%:*}
case ${RAY_AUTH_MODE:-token} in
  disabled)
    case $host in
      127.0.0.1 | localhost | "[::1]") ;;
      *) die "RAY_AUTH_MODE=disabled is only for loopback test clusters, not $host" ;;
    esac ;;
  token)
    export RAY_AUTH_MODE=token
    token_file=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
    [[ -n ${RAY_AUTH_TOKEN:-} || -s $token_file ]] \
      || die "no auth token: set RAY_AUTH_TOKEN or put the cluster's token in $token_file" ;;
  *) die "RAY_AUTH_MODE must be 'token' or 'disabled', got '$RAY_AUTH_MODE'" ;;
esac

submit_opts=()
cli_args=()
prev=
for arg in "$@"; do
  if [[ $arg == --no-wait ]]; then submit_opts+=(--no-wait); else cli_args+=("$arg"); fi
  out=
  [[ $prev == --out ]] && out=$arg
  [[ $arg == --out=* ]] && out=${arg#--out=}
  [[ -z $out || $out == /* ]] \
    || die "--out must be absolute (the job's working dir is temporary), got '$out'"
  prev=$arg
done
id=${SUBMISSION_ID:-dfolora-$(date +%Y%m%d-%H%M%S)-$RANDOM}

cat >&2 <<EOF
job $id on $RAY_ADDRESS
  follow: ray job logs --address "$RAY_ADDRESS" -f $id
  status: ray job status --address "$RAY_ADDRESS" $id
  stop:   ray job stop --address "$RAY_ADDRESS" $id
EOF
# ${a[@]+"${a[@]}"}: empty arrays are safe under `set -u` in bash 3.2 (macOS) too
exec ray job submit --address "$RAY_ADDRESS" --submission-id "$id" \
  --runtime-env deploy/runtime_env.yaml --working-dir . \
  ${submit_opts[@]+"${submit_opts[@]}"} \
  -- python -m orchestrator.cli run ${cli_args[@]+"${cli_args[@]}"}
