#!/usr/bin/env bash
# Instructions sluice executes per request, counted by callgrind: a figure
# that stays put on a shared machine where CPU time moves by 10% between
# runs, for comparing builds and routes. Reports, never asserts.
#
#   bench/instructions.sh [--model-routing] [--usage-off] [--trace] [--stream N] [--chat-bytes N] [--sluice PATH] [--requests N] [--keep FILE]
#
# --trace exports a span per request and per attempt ([telemetry.otlp],
# sample_ratio 1.0) to a local OTLP/HTTP sink, batched every 200 ms; the
# batch thread and the exports are counted with the requests.
# --usage-off turns usage reading off on the route ([routes.usage] observe = false).
# --stream N makes each request an event stream of N chunks (then the usage
# chunk and [DONE]): instructions per stream.
#
# --keep FILE keeps callgrind's profile, for `callgrind_annotate FILE`.
#
# A mock upstream and sluice (under valgrind) on free loopback ports; 200
# requests to warm up (pools, lazily made series), then the counters are
# zeroed and N requests (default 2000) go one after another on one
# connection. Access log lines are on, as in bench/run.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
sluice=target/release/sluice bench=target/release/sluice-bench
routing="" usage_off="" trace="" stream="" chat=600 n=2000 keep=""
while [ $# -gt 0 ]; do
    case $1 in
    --model-routing) routing=--model-routing ;;
    --usage-off) usage_off=1 ;;
    --trace) trace=1 ;;
    --stream) stream=$2; shift ;;
    --chat-bytes) chat=$2; shift ;;
    --sluice) sluice=$2; shift ;;
    --requests) n=$2; shift ;;
    --keep) keep=$2; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
[ -x "$bench" ] || cargo build --release --locked -p sluice -p sluice-bench

dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
mock=127.0.0.1:$(free_port)
listen=127.0.0.1:$(free_port)
"$bench" mock --listen "$mock" >/dev/null &
"$bench" config --listen "$listen" --upstream "$mock" $routing >"$dir/sluice.toml"
[ -z "$usage_off" ] || printf '[routes.usage]\nobserve = false\n' >>"$dir/sluice.toml"
if [ -n "$trace" ]; then
    sink=127.0.0.1:$(free_port)
    python3 - "${sink#*:}" <<'PY' &
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
PY
    printf '\n[telemetry.otlp]\nendpoint = "http://%s"\nsample_ratio = 1.0\n' "$sink" >>"$dir/sluice.toml"
fi
OTEL_BSP_SCHEDULE_DELAY=200 SLUICE_BENCH_KEY=sk-bench-not-a-real-key valgrind --tool=callgrind \
    --callgrind-out-file="$dir/cg.out" "$sluice" --config "$dir/sluice.toml" \
    >"$dir/sluice.log" 2>"$dir/valgrind.log" &
pid=$!
for _ in $(seq 150); do
    (exec 3<>"/dev/tcp/${listen%:*}/${listen#*:}") 2>/dev/null && break
    sleep 0.2
done
streamed=${stream:+--stream-chunks $stream}
"$bench" send --addr "$listen" --count 200 --chat-bytes "$chat" $streamed
# The warm-up's spans go out before the count starts; the run's own
# before it stops.
[ -z "$trace" ] || sleep 3
callgrind_control --zero "$pid" >/dev/null
"$bench" send --addr "$listen" --count "$n" --chat-bytes "$chat" $streamed
[ -z "$trace" ] || sleep 3
callgrind_control --dump "$pid" >/dev/null
kill -TERM "$pid"
wait "$pid" || true
[ -z "$keep" ] || cp "$dir"/cg.out.* "$keep"
ir=$(awk '$1 == "summary:" || $1 == "totals:" { print $2; exit }' "$dir"/cg.out.*)
what=${stream:+"streams of $stream chunks"}
echo "$("$sluice" --version 2>/dev/null | head -1)${routing:+ (model routing)}${usage_off:+ (usage off)}${trace:+ (traced)}, ${chat}-byte body: $((ir / n)) instructions per ${stream:+stream}${stream:+ }${stream:-request} ($ir over $n ${what:-requests})"
