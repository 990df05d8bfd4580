#!/usr/bin/env bash
# Checks the observability files against a running sluice:
#   scripts/check-observability.sh [SLUICE_BINARY]   (default target/debug/sluice,
#                                                    built with cargo if absent)
#   a. promtool check rules / test rules on deploy/prometheus/;
#   b. a mock upstream (scripts/mock_upstream.py) and sluice on a temp config,
#      with requests through it (JSON, streamed, retried, unmatched) and two
#      reloads (one refused), so counters and histograms have series; the
#      mock is also sluice's OTLP collector ([telemetry.otlp]), so trace
#      exports are counted (skipped for a sluice built without the `otel`
#      feature, which refuses an endpoint);
#   c. its /metrics through `promtool check metrics`;
#   d. Debian's prometheus scraping it every second with the rules loaded:
#      sluice_requests_total and a request-duration quantile come back with
#      the route, the rule groups are healthy, every PromQL query of the
#      Grafana dashboard evaluates, its template variables find values, and
#      its "Trace exports" panel shows result="ok";
#   e. every sluice_* name in deploy/ is a series sluice exports
#      (scripts/check-metric-names.sh).
# Ports are the kernel's free loopback ports; every wait is bounded, and the
# whole run (after any build; about 15 s) is stopped after $OBS_TIMEOUT
# seconds (default 180). Processes started here are stopped on exit, on a
# failure, on SIGINT/SIGTERM and at the timeout. Prints one line per step and
# ends with "observability: N passed, M failed"; exits non-zero on a failure.
# Needs python3, curl, promtool and prometheus (scripts/install-sdks.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo="$(pwd)"

bin="${1:-target/debug/sluice}"
OBS_TIMEOUT="${OBS_TIMEOUT:-180}"
passed=0
failed=0
skipped=0
pids=()
tmp="$(mktemp -d)"
started=$SECONDS

stop_all() {
    local pid i
    # Newest first: sluice before its upstream, prometheus before sluice.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        pid="${pids[i]}"
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    pids=()
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_all
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
# To the script's own stdout (fd 3): the signal may come while a function's
# output goes to /dev/null or a log.
exec 3>&1
trap 'echo "FAIL interrupted (or over OBS_TIMEOUT=${OBS_TIMEOUT}s)" >&3; echo "observability: $passed passed, $((failed + 1)) failed" >&3; exit 1' INT TERM

pass() {
    passed=$((passed + 1))
    echo "ok   $1"
}
# Fails the run: the later steps need the earlier ones.
fail() {
    failed=$((failed + 1))
    echo "FAIL $1"
    if [[ -s "$tmp/out" ]]; then
        sed 's/^/     | /' "$tmp/out" | head -n 60
    fi
    echo "observability: $passed passed, $failed failed"
    exit 1
}
# run NAME CMD...: the step passes when CMD exits 0.
run() {
    local name="$1"
    shift
    if "$@" >"$tmp/out" 2>&1; then
        pass "$name"
    else
        fail "$name"
    fi
}
# wait_for SECONDS CMD...: retries CMD every 0.2 s until it succeeds.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}
get() { curl -sS --max-time 5 "$@"; }
status_of() { curl -s -o /dev/null --max-time 10 -w '%{http_code}' "$@"; }
# A port free on 127.0.0.1 now (for prometheus, which cannot report one it picked).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

for tool in python3 curl promtool prometheus; do
    : >"$tmp/out"
    command -v "$tool" >/dev/null 2>&1 || fail "$tool not found (scripts/install-sdks.sh installs it)"
done

# --- the binary ------------------------------------------------------------------
if [[ ! -x "$bin" ]]; then
    if [[ $# -eq 0 ]]; then
        echo "building target/debug/sluice (cargo build --locked --bin sluice)"
        run "cargo build --locked --bin sluice" cargo build --locked --bin sluice
    else
        : >"$tmp/out"
        fail "sluice binary $bin: not found or not executable"
    fi
fi
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"

# The watchdog (from here on: a build above may take longer): a hung step
# cannot keep the script, or CI, waiting. Its sleep goes with it.
(
    trap 'kill "$nap" 2>/dev/null; exit 0' TERM
    sleep "$OBS_TIMEOUT" &
    nap=$!
    wait "$nap"
    kill -TERM $$ 2>/dev/null
) </dev/null >/dev/null 2>&1 3>&- &
pids+=($!)

# --- a. rules ---------------------------------------------------------------------
run "promtool check rules deploy/prometheus/sluice-rules.yaml" \
    timeout 60 promtool check rules deploy/prometheus/sluice-rules.yaml
run "promtool test rules deploy/prometheus/sluice-rules.test.yaml" \
    timeout 120 promtool test rules deploy/prometheus/sluice-rules.test.yaml
run "promtool check config deploy/prometheus/prometheus.yml" \
    timeout 60 promtool check config deploy/prometheus/prometheus.yml
run "deploy/grafana/sluice-dashboard.json is valid JSON with unique panel ids" python3 - <<'PY'
import json
d = json.load(open("deploy/grafana/sluice-dashboard.json", encoding="utf-8"))
ids = [p["id"] for p in d["panels"]]
assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
assert all("gridPos" in p for p in d["panels"]), "a panel without gridPos"
names = {v["name"] for v in d["templating"]["list"]}
assert {"datasource", "route"} <= names, names
print(len(ids), "panels")
PY

# --- b. mock upstream, sluice, traffic ----------------------------------------------
python3 scripts/mock_upstream.py --lifetime "$OBS_TIMEOUT" >"$tmp/mock.port" 2>"$tmp/mock.log" 3>&- &
pids+=($!)
: >"$tmp/out"
wait_for 10 test -s "$tmp/mock.port" || { cp "$tmp/mock.log" "$tmp/out"; fail "mock upstream started"; }
mock_port="$(head -n1 "$tmp/mock.port")"
pass "mock upstream on 127.0.0.1:$mock_port"

cat >"$tmp/sluice.toml" <<EOF
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "2s"

[log]
level = "info"
format = "text"

[upstreams.mock]
url = "http://127.0.0.1:$mock_port"
auth = "none"

[models.mock-model]
deployments = [{ upstream = "mock", model = "mock-1" }]

[[routes]]
name = "llm"
path_prefix = "/v1"
model_routing = true

[[routes]]
name = "plain"
path_prefix = "/plain"
upstream = "mock"

[routes.retry]
attempts = 2
backoff_base = "10ms"
backoff_max = "20ms"
retry_on = [500]
EOF
# The mock is the collector too (POST /v1/traces); with the batch delay
# sluice is started with (OTEL_BSP_SCHEDULE_DELAY), spans go out every half
# second. A sluice built without the `otel` feature refuses an endpoint:
# then it runs without, and the trace checks are skipped.
cat >"$tmp/traces.toml" <<EOF

[telemetry.otlp]
endpoint = "http://127.0.0.1:$mock_port"
timeout = "2s"
EOF
cat "$tmp/sluice.toml" "$tmp/traces.toml" >"$tmp/sluice.traces.toml"
if timeout 30 "$bin" check --config "$tmp/sluice.traces.toml" >"$tmp/out" 2>&1; then
    traces=true
    cp "$tmp/sluice.traces.toml" "$tmp/sluice.toml"
elif grep -q 'built without traces' "$tmp/out"; then
    traces=false
    skipped=$((skipped + 1))
    echo "skip trace exports: $bin was built without the otel feature"
else
    fail "sluice check --config (the test config, with [telemetry.otlp])"
fi
cp "$tmp/sluice.toml" "$tmp/sluice.good.toml"

env -u RUST_LOG OTEL_BSP_SCHEDULE_DELAY=500 "$bin" --config "$tmp/sluice.toml" >"$tmp/sluice.out" 2>"$tmp/sluice.log" 3>&- &
sluice_pid=$!
pids+=("$sluice_pid")
# "listening on http://ADDR" and "admin listening on http://ADDR", colours stripped.
addr_of() {
    sed 's/\x1b\[[0-9;]*m//g' "$tmp/sluice.log" | grep -o "$1 on http://[0-9.:]*" | head -n1 | sed 's#.*http://##'
}
have_addrs() { [[ -n "$(addr_of 'admin listening')" && -n "$(addr_of '[^n] listening')" ]]; }
up_or_gone() { have_addrs || ! kill -0 "$sluice_pid" 2>/dev/null; }
if ! wait_for 15 up_or_gone || ! have_addrs; then
    cat "$tmp/sluice.log" "$tmp/sluice.out" >"$tmp/out"
    fail "sluice started ($bin)"
fi
data="$(addr_of '[^n] listening')"
admin="$(addr_of 'admin listening')"
pass "sluice on $data, admin on $admin"

check_probes() {
    [[ "$(status_of "http://$admin/healthz")" == 200 ]] && [[ "$(status_of "http://$admin/readyz")" == 200 ]]
}
run "admin /healthz and /readyz answer 200" check_probes

chat() { printf '{"model":"mock-model","stream":%s,"messages":[{"role":"user","content":"hi"}]}' "$1"; }
# expect STATUS COUNT CURL-ARGS...: COUNT requests, each answered STATUS.
expect() {
    local want="$1" n="$2" got
    shift 2
    for _ in $(seq "$n"); do
        got="$(status_of "$@")"
        if [[ "$got" != "$want" ]]; then
            echo "got $got, want $want: curl $*"
            return 1
        fi
    done
}
traffic() {
    expect 200 10 -X POST -H 'content-type: application/json' --data "$(chat false)" "http://$data/v1/chat/completions" &&
        expect 200 3 -X POST -H 'content-type: application/json' --data "$(chat true)" "http://$data/v1/chat/completions" &&
        expect 200 5 "http://$data/plain/ok" &&
        expect 500 2 "http://$data/plain/fail" &&
        expect 404 1 "http://$data/nowhere"
}
run "traffic through sluice: 13 model-routed (3 streamed), 5 ok, 2 retried 500s, 1 unmatched" traffic

metric() { get "http://$admin/metrics" | grep -F "$1"; }
reloads() {
    # A valid reload, then a refused one (an unknown key in the file's last
    # table), then the valid file back.
    kill -HUP "$sluice_pid" &&
        wait_for 10 metric 'sluice_config_reloads_total{result="ok"} 1' &&
        printf 'no_such_key = 1\n' >>"$tmp/sluice.toml" &&
        kill -HUP "$sluice_pid" &&
        wait_for 10 metric 'sluice_config_reloads_total{result="error"} 1' &&
        cp "$tmp/sluice.good.toml" "$tmp/sluice.toml" &&
        kill -HUP "$sluice_pid" &&
        wait_for 10 metric 'sluice_config_reloads_total{result="ok"} 2'
}
if reloads >"$tmp/out" 2>&1; then
    pass "SIGHUP reloads counted: ok, error (refused), ok"
else
    { get "http://$admin/metrics" | grep reloads; tail -n 20 "$tmp/sluice.log"; } >>"$tmp/out" 2>&1 || true
    fail "SIGHUP reloads counted: ok, error (refused), ok"
fi

: >"$tmp/out"
if ! $traces; then
    : # skipped above
elif wait_for 15 metric 'sluice_trace_exports_total{result="ok"}'; then
    pass "trace exports counted: $(metric 'sluice_trace_exports_total{' | paste -sd ' ' -)"
else
    { get "http://$admin/metrics" | grep trace_exports; grep -i telemetry "$tmp/sluice.log" | tail -n 10; } >"$tmp/out" 2>&1 || true
    fail "trace exports counted: sluice_trace_exports_total{result=\"ok\"} within 15 s"
fi

# --- c. the exposition through promtool --------------------------------------------------
: >"$tmp/out"
get -o "$tmp/metrics.txt" -D "$tmp/metrics.headers" "http://$admin/metrics" >"$tmp/out" 2>&1 ||
    fail "GET http://$admin/metrics"
grep -q '^sluice_requests_total{' "$tmp/metrics.txt" || {
    head -n 40 "$tmp/metrics.txt" >"$tmp/out"
    fail "GET /metrics has sluice_requests_total series"
}
pass "GET /metrics: $(grep -c '^# TYPE ' "$tmp/metrics.txt") families, $(grep -vc '^#' "$tmp/metrics.txt") samples ($(tr -d '\r' <"$tmp/metrics.headers" | sed -n 's/^[Cc]ontent-[Tt]ype: //p'))"

# promtool lints the classic text format (0.0.4), where a counter's HELP and
# TYPE name its sample, NAME_total; sluice serves OpenMetrics, where they name
# the family, NAME. So the raw exposition gets one "NAME_total no help text"
# per counter family: that, and only that, is tolerated on the raw text; the
# same exposition in classic form must lint clean.
timeout 60 promtool check metrics <"$tmp/metrics.txt" >"$tmp/lint.raw" 2>&1 || true
python3 - "$tmp/metrics.txt" "$tmp/lint.raw" "$tmp/metrics.classic" >"$tmp/out" 2>&1 <<'PY' ||
import re, sys
text = open(sys.argv[1]).read()
counters = set(re.findall(r"^# TYPE (\S+) counter$", text, re.M))
other = [l for l in open(sys.argv[2]).read().splitlines()
         if l.strip() and not (l.endswith(" no help text") and l.split()[0].removesuffix("_total") in counters
                               and l.split()[0].endswith("_total"))]
# Classic form: counters' HELP/TYPE renamed to NAME_total, no # EOF/# UNIT.
out = []
for l in text.splitlines():
    m = re.match(r"^# (HELP|TYPE) (\S+)( .*)?$", l)
    if m and m.group(2) in counters:
        l = f"# {m.group(1)} {m.group(2)}_total{m.group(3) or ''}"
    if l == "# EOF" or l.startswith("# UNIT "):
        continue
    out.append(l)
open(sys.argv[3], "w").write("\n".join(out) + "\n")
if other:
    print("\n".join(other))
    sys.exit(1)
PY
    fail "promtool check metrics: problems besides the OpenMetrics counter naming"
artifacts="$(grep -c ' no help text$' "$tmp/lint.raw" || true)"
pass "promtool check metrics (raw OpenMetrics): only the $artifacts known 'NAME_total no help text' lines (counters' HELP names the family)"
if timeout 60 promtool check metrics <"$tmp/metrics.classic" >"$tmp/out" 2>&1 && [[ ! -s "$tmp/out" ]]; then
    pass "promtool check metrics (the same in classic text form): clean"
else
    fail "promtool check metrics (the same in classic text form)"
fi

# --- e. metric names in deploy/ ----------------------------------------------------------
if scripts/check-metric-names.sh --exposition "$tmp/metrics.txt" >"$tmp/out" 2>&1; then
    pass "scripts/check-metric-names.sh: $(grep -c '^ok' "$tmp/out") checks (families from src/metrics.rs and the scrape; names in deploy/)"
else
    fail "scripts/check-metric-names.sh"
fi

# --- d. prometheus scraping sluice, with the rules --------------------------------------
mkdir -p "$tmp/tsdb"
cat >"$tmp/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $repo/deploy/prometheus/sluice-rules.yaml
scrape_configs:
  - job_name: sluice
    static_configs:
      - targets: ["$admin"]
EOF
prom=""
for _ in 1 2 3; do
    port="$(free_port)"
    prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/tsdb" \
        --web.listen-address="127.0.0.1:$port" --log.level=warn >"$tmp/prometheus.log" 2>&1 3>&- &
    pid=$!
    pids+=("$pid")
    ready() { curl -sf --max-time 2 "http://127.0.0.1:$port/-/ready"; }
    ready_or_gone() { ready || ! kill -0 "$pid" 2>/dev/null; }
    if wait_for 30 ready_or_gone && ready >/dev/null 2>&1; then
        prom="http://127.0.0.1:$port"
        break
    fi
    # Lost the port to someone else between the check and the bind: try another.
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
done
if [[ -z "$prom" ]]; then
    cp "$tmp/prometheus.log" "$tmp/out"
    fail "prometheus ready"
fi
pass "prometheus ready on ${prom#http://} (scraping $admin every 1s)"

# query EXPR: prints "labels-json<TAB>value" per result, or fails on an API error.
query() {
    curl -sS --max-time 5 -G "$prom/api/v1/query" --data-urlencode "query=$1" | python3 -c '
import json, sys
r = json.load(sys.stdin)
if r.get("status") != "success":
    sys.exit("query failed: %s" % r.get("error"))
for s in r["data"]["result"]:
    print(json.dumps(s["metric"], sort_keys=True), s["value"][1], sep="\t")
'
}
# has_positive EXPR LABEL VALUE: a result labelled LABEL=VALUE with a value > 0.
has_positive() {
    local out
    # New samples each time: rate() over the last seconds needs increase.
    curl -s -o /dev/null --max-time 5 "http://$data/plain/ok" || true
    out="$(query "$1")" || return 1
    printf '%s\n' "$out" | python3 -c '
import json, math, sys
label, want = sys.argv[1:3]
for line in sys.stdin:
    if not line.strip():
        continue
    labels, value = line.rstrip("\n").split("\t")
    v = float(value)
    if json.loads(labels).get(label) == want and v > 0 and not math.isnan(v):
        print(want, v)
        sys.exit(0)
sys.exit(1)
' "$2" "$3"
}
q_requests='sum by (route) (sluice_requests_total{job="sluice"})'
q_duration='histogram_quantile(0.9, sum by (route, le) (rate(sluice_request_duration_seconds_bucket{job="sluice"}[10s])))'
# The dashboard's "Trace exports" panel, its variables filled in as below.
q_traces="$(python3 - deploy/grafana/sluice-dashboard.json <<'PY'
import json, sys
d = json.load(open(sys.argv[1], encoding="utf-8"))
[expr] = [t["expr"] for p in d["panels"] if p["title"] == "Trace exports" for t in p["targets"]]
print(expr.replace("$__rate_interval", "1m").replace("$instance", ".*"))
PY
)" || { : >"$tmp/out"; fail "the dashboard has one \"Trace exports\" query"; }
# Each query, and the label and value one of its results must have (> 0).
checks=("$q_requests" route plain "$q_duration" route plain)
if $traces; then
    checks+=("$q_traces" result ok)
fi
for ((i = 0; i < ${#checks[@]}; i += 3)); do
    q="${checks[i]}" label="${checks[i + 1]}" want="${checks[i + 2]}"
    : >"$tmp/out"
    if wait_for 30 has_positive "$q" "$label" "$want"; then
        pass "prometheus: $q -> $label=\"$want\" $(has_positive "$q" "$label" "$want" | cut -d' ' -f2)"
    else
        { echo "last answer:"; query "$q"; tail -n 20 "$tmp/prometheus.log"; } >"$tmp/out" 2>&1 || true
        fail "prometheus: $q -> $label=\"$want\" > 0 within 30 s"
    fi
done

# Every group of the rules file loaded, every rule evaluated without error.
groups_in_file="$(sed -n 's/^  - name: *//p' deploy/prometheus/sluice-rules.yaml | sort | tr '\n' ' ')"
rules_healthy() {
    curl -sS --max-time 5 "$prom/api/v1/rules" | python3 -c '
import json, sys
want = sorted(sys.argv[1].split())
groups = json.load(sys.stdin)["data"]["groups"]
have = sorted(g["name"] for g in groups)
rules = [r for g in groups for r in g["rules"]]
bad = [(r["name"], r.get("health"), r.get("lastError", "")) for r in rules if r.get("health") != "ok"]
print("groups %s, %d rules, not ok: %s" % (have, len(rules), bad))
sys.exit(0 if have == want and rules and not bad else 1)
' "$groups_in_file"
}
if wait_for 30 rules_healthy; then
    pass "prometheus /api/v1/rules: $(rules_healthy | sed 's/, not ok: \[\]//')"
else
    rules_healthy >"$tmp/out" 2>&1 || true
    fail "prometheus /api/v1/rules: groups $groups_in_file loaded, health ok"
fi

# The dashboard's queries, with Grafana's variables filled in, all evaluate;
# its label_values() variables find values.
dashboard_queries() {
    python3 - deploy/grafana/sluice-dashboard.json "$prom" <<'PY'
import json, re, sys, urllib.parse, urllib.request
d = json.load(open(sys.argv[1], encoding="utf-8"))
prom = sys.argv[2]
subst = {"$__rate_interval": "1m", "$__range": "5m", "$__interval": "15s", "$route": ".*", "$instance": ".*"}

def ask(expr):
    url = prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)

bad, n = [], 0
for p in d["panels"]:
    for t in p.get("targets", []):
        expr = t["expr"]
        for k, v in subst.items():
            expr = expr.replace(k, v)
        n += 1
        try:
            r = ask(expr)
            if r.get("status") != "success":
                bad.append(f'{p["title"]}: {r.get("error")}')
        except Exception as e:  # an HTTP 400 is a query that does not parse
            bad.append(f'{p["title"]}: {e}: {expr}')
for v in d["templating"]["list"]:
    if v["type"] != "query":
        continue
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", v["definition"])
    if not m:
        bad.append(f'variable {v["name"]}: not label_values(...)')
        continue
    sel = m.group(1)
    for k, val in subst.items():
        sel = sel.replace(k, val)
    r = ask(f"count by ({m.group(2)}) ({sel})")
    values = sorted(s["metric"].get(m.group(2), "") for s in r["data"]["result"])
    if not values:
        bad.append(f'variable {v["name"]}: no values')
    print(f'variable {v["name"]}: {values}')
print(f"{n} panel queries evaluated")
if bad:
    print("\n".join(bad))
    sys.exit(1)
PY
}
if dashboard_queries >"$tmp/out" 2>&1; then
    pass "grafana dashboard: $(tail -n1 "$tmp/out"); $(grep '^variable' "$tmp/out" | paste -sd ';' - | sed 's/;/; /g')"
else
    fail "grafana dashboard queries evaluate on prometheus"
fi

stop_all
echo "observability checks took $((SECONDS - started)) s"
if ((skipped > 0)); then
    echo "observability: $passed passed, $failed failed, $skipped skipped"
else
    echo "observability: $passed passed, $failed failed"
fi
