#!/usr/bin/env bash
# Where sluice's cost per request grows with the number of connections:
# instructions and simulated cache misses per request at several
# connection counts, under callgrind's cache simulator with this machine's
# L1d (48 KiB) and its 2 MiB L2 as the last level. Reports, never asserts.
#
#   bench/cache.sh [--conns "32 256"] [--seconds 6] [--sluice PATH] [--nginx]
#
# --nginx measures nginx instead (one process, access log off, the same
# proxy settings as bench/run.sh's), counting requests with stub_status.
#
# A mock upstream and sluice (under valgrind, so some 800 requests/s) on
# free loopback ports, closed-loop load from `sluice-bench load`; the
# requests counted are sluice_requests_total's (admin endpoint) between the
# counters' zero and their dump. Needs target/profiling/sluice (`cargo
# build --profile profiling`): release with line tables, for
# `callgrind_annotate --show=DLmr,DLmw` on the kept profiles (--keep DIR).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
sluice=target/profiling/sluice bench=target/release/sluice-bench
conns="32 256" seconds=6 keep="" nginx=""
while [ $# -gt 0 ]; do
    case $1 in
    --conns) conns=$2; shift ;;
    --seconds) seconds=$2; shift ;;
    --sluice) sluice=$2; shift ;;
    --keep) keep=$2; shift ;;
    --nginx) nginx=1 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
[ -x "$sluice" ] || cargo build --profile profiling --locked -p sluice
[ -x "$bench" ] || cargo build --release --locked -p sluice-bench

dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
mock=127.0.0.1:$(free_port) listen=127.0.0.1:$(free_port) admin=127.0.0.1:$(free_port)
"$bench" mock --listen "$mock" >/dev/null &
if [ -z "$nginx" ]; then
    "$bench" config --listen "$listen" --upstream "$mock" |
        sed "s/^admin_listen = \"\"/admin_listen = \"$admin\"/" >"$dir/sluice.toml"
    SLUICE_BENCH_KEY=sk-bench-not-a-real-key valgrind --tool=callgrind --cache-sim=yes \
        --D1=49152,12,64 --LL=2097152,16,64 --callgrind-out-file="$dir/cg.out" \
        "$sluice" --config "$dir/sluice.toml" >"$dir/sluice.log" 2>"$dir/valgrind.log" &
else
    mkdir -p "$dir/nginx"
    cat >"$dir/nginx/nginx.conf" <<CONF
worker_processes 1;
master_process off;
daemon off;
worker_rlimit_nofile 20000;
pid $dir/nginx/nginx.pid;
error_log $dir/nginx/error.log warn;
events { worker_connections 20000; }
http {
    access_log off;
    client_body_temp_path $dir/nginx/body;
    proxy_temp_path $dir/nginx/proxy;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    upstream mock { server $mock; keepalive 1024; keepalive_requests 1000000; keepalive_timeout 300s; }
    server {
        listen $listen backlog=4096;
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer sk-bench-not-a-real-key";
            proxy_buffering off;
        }
    }
    server { listen $admin; location / { stub_status; } }
}
CONF
    valgrind --tool=callgrind --cache-sim=yes \
        --D1=49152,12,64 --LL=2097152,16,64 --callgrind-out-file="$dir/cg.out" \
        "$(command -v nginx || echo /usr/sbin/nginx)" -p "$dir/nginx" -c "$dir/nginx/nginx.conf" \
        >"$dir/nginx.log" 2>"$dir/valgrind.log" &
fi
pid=$!
for _ in $(seq 150); do
    (exec 3<>"/dev/tcp/${listen%:*}/${listen#*:}") 2>/dev/null && break
    sleep 0.2
done
answered() {
    python3 - "$admin" "$nginx" <<'PY'
import sys, urllib.request
if sys.argv[2]:
    # stub_status: "server accepts handled requests" then "A H R".
    text = urllib.request.urlopen(f"http://{sys.argv[1]}/").read().decode()
    print(int(text.splitlines()[2].split()[2]))
else:
    text = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics").read().decode()
    print(sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith("sluice_requests_total{")))
PY
}
# Warm-up: pools, lazily made series.
"$bench" load --addr "$listen" --conns 32 --seconds 2 >/dev/null
printf '%-6s %10s %12s %14s %14s\n' conns requests "Ir/request" "D1 miss/req" "LL miss/req"
i=0
for c in $conns; do
    i=$((i + 1))
    before=$(answered)
    callgrind_control --zero "$pid" >/dev/null 2>&1
    "$bench" load --addr "$listen" --conns "$c" --seconds "$seconds" >/dev/null
    callgrind_control --dump="conns-$c" "$pid" >/dev/null 2>&1
    after=$(answered)
    out=$(ls -t "$dir"/cg.out.* | head -1)
    [ -z "$keep" ] || { mkdir -p "$keep"; cp "$out" "$keep/cg.out.conns-$c"; }
    # summary: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw
    awk -v c="$c" -v n="$(python3 -c "print(int($after - $before))")" '$1 == "summary:" {
        printf "%-6s %10d %12.0f %14.1f %14.1f\n", c, n, $2 / n, ($6 + $7) / n, ($9 + $10) / n }' "$out"
done
kill -TERM "$pid"
wait "$pid" || true
