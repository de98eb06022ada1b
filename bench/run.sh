#!/usr/bin/env bash
# balancer beside nginx and HAProxy, one command, ratios from the same run (../shared/bench).
#
#   bench/run.sh                 # full: static + python backends, all workloads, rr and least_loaded
#   bench/run.sh --quick         # 3 s runs, 1 repeat (any extra flags go to the harness)
#
# Targets: balancer-rr (round_robin), balancer-obs (round_robin with access log and admin/metrics on,
# what users actually run), and the same two compiled (balancer-c, balancer-obs-c: make
# run-compiled); then a second pass with --balance least_loaded (balancer-ll and balancer-ll-c beside
# HAProxy leastconn). 127.0.0.1 only; the harness stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
HARNESS="${BENCH_HARNESS:-../shared/bench/bench.sh}"
[ -x .venv/bin/balancer ] || make .venv/.installed
# nginx static backends run as an unprivileged user and must be able to read the harness's files
# under $HOME/.cache (1 MiB responses are 403 otherwise, for every proxy alike).
if [ "$(id -u)" = 0 ] && ! sudo -u nobody test -x "$HOME" 2>/dev/null && [ -z "${BENCH_NO_CHMOD:-}" ]; then
  echo "note: making $HOME/.cache/balancer-bench traversable for nginx's worker user (BENCH_NO_CHMOD=1 to skip)" >&2
  mkdir -p "$HOME/.cache/balancer-bench/run/www"
  chmod o+x "$HOME" "$HOME/.cache" "$HOME/.cache/balancer-bench" "$HOME/.cache/balancer-bench/run"
  chmod o+rx "$HOME/.cache/balancer-bench/run/www"
fi
extra="$(mktemp --suffix=.yaml)"
trap 'rm -f "$extra"' EXIT
printf 'log: {access_log: true, access_log_path: /dev/null}\nadmin: {host: 127.0.0.1, port: 0}\n' > "$extra"
obs_cmd=".venv/bin/python bench/with_extra.py $extra {config}"

# The compiled build (make run-compiled) beside the interpreted one, where a C compiler is found.
compiled=() compiled_ll=()
if [ -z "${BENCH_NO_COMPILED:-}" ] && make -s .venv-native/.installed >/dev/null 2>&1; then
  compiled=(--target '.venv-native/bin/balancer run -c {config}' --port 18093 --name balancer-c
            --target ".venv-native/bin/python bench/with_extra.py $extra {config}" --port 18094
            --name balancer-obs-c)
  compiled_ll=(--target '.venv-native/bin/balancer run -c {config}' --port 18095 --name balancer-ll-c)
else
  echo "note: no compiled build (make .venv-native/.installed failed or BENCH_NO_COMPILED set)" >&2
fi

"$HARNESS" --target '.venv/bin/balancer run -c {config}' --port 18090 --name balancer-rr \
           --target "$obs_cmd" --port 18091 --name balancer-obs "${compiled[@]}" "$@"
"$HARNESS" --balance least_loaded --anchors nginx-ka,haproxy-lc \
           --target '.venv/bin/balancer run -c {config}' --port 18092 --name balancer-ll \
           "${compiled_ll[@]}" --workloads small-c64,small-c256 "$@"
