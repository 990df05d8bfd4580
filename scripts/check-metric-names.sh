#!/usr/bin/env bash
# Checks that every sluice_* metric name the deploy files use is a series
# sluice exports:
#   scripts/check-metric-names.sh [--exposition FILE] [FILE...]
# FILEs default to deploy/grafana/*.json and deploy/prometheus/*.y*ml.
#
# The families come from the `families!` block of src/metrics.rs (the
# registry's prefix, then each "name", "help" pair and its type):
# prometheus-client leaves a family without series out of /metrics
# entirely, so a scrape alone does not list them all. A counter's series is
# NAME_total, a histogram's NAME_bucket, NAME_sum and NAME_count, a gauge's
# NAME; any other sluice_* word in a file fails, named.
# With --exposition (a scrape of /metrics), also checks that every family it
# declares (# TYPE) is one read from src/metrics.rs, with the same type, so
# the parsing above cannot drift from what sluice serves.
# Prints one line per check; exits 1 if any failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

exposition=""
if [[ ${1:-} == --exposition ]]; then
    exposition="${2:?--exposition needs a file}"
    shift 2
fi
files=("$@")
if [[ ${#files[@]} -eq 0 ]]; then
    shopt -s nullglob
    files=(deploy/grafana/*.json deploy/prometheus/*.yaml deploy/prometheus/*.yml)
    shopt -u nullglob
fi

python3 - src/metrics.rs "$exposition" "${files[@]}" <<'PY'
import re
import sys

src, exposition, files = sys.argv[1], sys.argv[2], sys.argv[3:]
text = open(src, encoding="utf-8").read()
failed = 0


def report(ok, what, why=""):
    global failed
    if ok:
        print(f"ok   {what}")
    else:
        failed += 1
        print(f"FAIL {what}" + (f": {why}" if why else ""))


prefix = re.search(r'Registry::with_prefix\("([^"]+)"\)', text)
block = re.search(r"^families!\s*\{(.*?)^\}", text, re.S | re.M)
families = {}
if prefix and block:
    entry = re.compile(r'(\w+)\s*:\s*([^=;]+?)\s*=\s*[^;]*?,\s*"([a-z0-9_]+)"\s*,\s*"', re.S)
    for _, ty, name in entry.findall(block.group(1)):
        kind = "histogram" if "Histogram" in ty else "counter" if "Counter" in ty else "gauge" if "Gauge" in ty else None
        families[f"{prefix.group(1)}_{name}"] = kind
report(len(families) >= 10 and None not in families.values(),
       f"{src}: {len(families)} families read from families!",
       "expected a `families!` block with Registry::with_prefix and at least 10 typed families")
if failed:
    sys.exit(1)

series = {}
for fam, kind in families.items():
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}[kind]
    for s in suffixes:
        series[fam + s] = fam
word = re.compile(r"\b" + re.escape(prefix.group(1)) + r"_[a-zA-Z0-9_]+")

if exposition:
    declared = dict(re.findall(r"^# TYPE (\S+) (\S+)$", open(exposition, encoding="utf-8").read(), re.M))
    mine = {n: t for n, t in declared.items() if n.startswith(prefix.group(1) + "_")}
    wrong = sorted(f"{n} ({t})" for n, t in mine.items() if families.get(n) != t)
    if not mine:
        report(False, f"{exposition}: families served", "no sluice family in it")
    elif wrong:
        report(False, f"{exposition}: families served but not declared so in {src}", ", ".join(wrong))
    else:
        report(True, f"{exposition}: {len(mine)} families served, all declared in {src}")

for f in files:
    used = set(word.findall(open(f, encoding="utf-8").read()))
    unknown = sorted(used - series.keys())
    if unknown:
        report(False, f"{f}: {len(unknown)} of {len(used)} sluice metric names not exported by sluice",
               ", ".join(unknown))
    else:
        report(True, f"{f}: {len(used)} sluice metric names, all exported")

sys.exit(1 if failed else 0)
PY
