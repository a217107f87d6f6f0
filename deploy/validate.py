"""Offline checks of the deployment recipes; deploy/check.sh runs them.

    validate.py k8s --kube-version V [--cli-root DIR] FILE...
                                                each object against the Kubernetes schemas
                                                (strict), then consistency checks; with
                                                --cli-root, `kvmesh` containers' arguments
                                                must parse with the kvmesh CLI in DIR
    validate.py ray-config --schema S FILE      a Ray cluster launcher YAML against Ray's schema
    validate.py separate-releases A B           two rendered releases write no node directory
                                                (hostPath) in common
    validate.py values-comments FILE            every key of a Helm values file has a comment
    validate.py dockerfile FILE...              a non-root USER and ENTRYPOINT ["kvmesh"]
    validate.py selftest --kube-version V       negative controls: the checks reject bad input

Schema validation uses kubernetes-validate as a library (what `kubernetes-validate
--strict` does per object), except that a kind without a schema is an error here
unless it is one of the custom resources below; those are reported as skipped, and the
pod templates inside RayClusters are validated as core/v1 PodTemplates. Prints one
line per object and exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import re
import sys

import yaml

# Custom resources the offline schemas do not know: kind -> its API group.
CUSTOM_KINDS = {"ServiceMonitor": "monitoring.coreos.com", "RayCluster": "ray.io",
                "RayService": "ray.io", "RayJob": "ray.io"}
WORKLOADS = {"Deployment", "DaemonSet", "StatefulSet", "Job"}
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


class Report:
    def __init__(self) -> None:
        self.errors = 0
        self.checked = 0
        self.skipped = 0

    def ok(self, msg: str) -> None:
        print(f"  ok    {msg}")

    def skip(self, msg: str) -> None:
        self.skipped += 1
        print(f"  skip  {msg}")

    def error(self, msg: str) -> None:
        self.errors += 1
        print(f"  ERROR {msg}")


def load_docs(path: str) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def name_of(obj: dict) -> str:
    return f"{obj.get('kind', '?')}/{obj.get('metadata', {}).get('name', '?')}"


# ---------------------------------------------------------------- schema validation


def validate_schema(obj: dict, version: str, report: Report, label: str | None = None) -> None:
    import kubernetes_validate

    label = label or name_of(obj)
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError as e:
        report.error(f"{label}: {e.message} (not a known custom resource either)")
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        report.error(f"{label}: {path}: {e.message}")
    else:
        report.checked += 1
        report.ok(f"{label} (schema {version}, strict)")


def ray_pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(group name, pod template) of a RayCluster, RayService or RayJob."""
    spec = obj.get("spec", {})
    cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or spec
    groups = [("head", cluster.get("headGroupSpec", {}))]
    groups += [(g.get("groupName", "?"), g) for g in cluster.get("workerGroupSpecs", [])]
    return [(name, g["template"]) for name, g in groups if "template" in g]


def validate_object(obj: dict, version: str, report: Report) -> None:
    kind = obj.get("kind")
    if kind in CUSTOM_KINDS:
        group = obj.get("apiVersion", "").split("/")[0]
        if group != CUSTOM_KINDS[kind]:
            report.error(f"{name_of(obj)}: apiVersion {obj.get('apiVersion')} is not in {CUSTOM_KINDS[kind]}")
            return
        report.skip(f"{name_of(obj)}: custom resource ({obj['apiVersion']}), no schema offline")
        for group_name, template in ray_pod_templates(obj):
            pod_template = {"apiVersion": "v1", "kind": "PodTemplate",
                            "metadata": {"name": f"{obj['metadata']['name']}-{group_name}"},
                            "template": template}
            validate_schema(pod_template, version, report,
                            f"{name_of(obj)} group {group_name}: pod template as v1/PodTemplate")
        return
    validate_schema(obj, version, report)


# ---------------------------------------------------------------- consistency checks


def pod_template(obj: dict) -> dict | None:
    if obj.get("kind") in WORKLOADS:
        return obj.get("spec", {}).get("template")
    return None


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_container(c: dict, pod: dict, where: str, config_maps: dict, secrets: dict,
                    main: bool, need_probes: bool, report: Report):
    """Checks one container; returns its kvmesh arguments as parsed (None: not kvmesh)."""
    label = f"{where} container {c.get('name')}"
    image = c.get("image", "")
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    if not tag or tag == "latest":
        report.error(f"{label}: image {image!r} needs a fixed tag")
    res = c.get("resources", {})
    missing = [k for k, present in (("requests.cpu", "cpu" in res.get("requests", {})),
                                    ("requests.memory", "memory" in res.get("requests", {})),
                                    ("limits.memory", "memory" in res.get("limits", {})))
               if not present]
    if missing:
        report.error(f"{label}: no resources {', '.join(missing)}")
    sc, psc = c.get("securityContext", {}), pod.get("securityContext", {})
    if main:
        if not sc.get("runAsNonRoot", psc.get("runAsNonRoot")) or sc.get("runAsUser", psc.get("runAsUser")) == 0:
            report.error(f"{label}: must run as non-root (runAsNonRoot)")
        if sc.get("allowPrivilegeEscalation") is not False:
            report.error(f"{label}: allowPrivilegeEscalation must be false")
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = c.get(probe)
        if spec is None:
            if need_probes and probe != "startupProbe":
                report.error(f"{label}: no {probe}")
            continue
        for action in ("tcpSocket", "httpGet", "grpc"):
            port = spec.get(action, {}).get("port")
            if isinstance(port, str) and port not in ports:
                report.error(f"{label}: {probe} names port {port!r}, which the container lacks")
    # $(VAR) in command/args: Kubernetes leaves an undefined reference as literal text.
    defined = {e["name"] for e in c.get("env", [])}
    for src in c.get("envFrom", []):
        ref = src.get("configMapRef") or src.get("secretRef") or {}
        table = config_maps if "configMapRef" in src else secrets
        if ref.get("name") in table:
            defined |= set(table[ref["name"]])
        elif not ref.get("optional"):
            report.error(f"{label}: envFrom {ref.get('name')!r} is not in the manifests")
    for arg in c.get("command", []) + c.get("args", []):
        for var in VAR_REF.findall(str(arg)):
            if var not in defined:
                report.error(f"{label}: {arg!r} refers to $({var}), which is not defined")
    for e in c.get("env", []):
        for kind, table in (("configMapKeyRef", config_maps), ("secretKeyRef", secrets)):
            ref = e.get("valueFrom", {}).get(kind)
            if ref and ref["name"] in table and ref["key"] not in table[ref["name"]]:
                report.error(f"{label}: env {e['name']}: {ref['name']} has no key {ref['key']!r}")
    parsed = None
    if KVMESH_PARSER is not None and c.get("command", [None])[0] == "kvmesh":
        parsed = check_kvmesh_args(c, config_maps, label, report)
    volumes = {v["name"] for v in pod.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        if m["name"] not in volumes:
            report.error(f"{label}: mounts volume {m['name']!r}, which the pod lacks")
    # GPUs: one engine gets tensor-parallel x pipeline-parallel of them.
    flags = dict(a[2:].split("=", 1) for a in c.get("args", []) if isinstance(a, str)
                 and a.startswith("--") and "=" in a)
    gpus = {k: v for k, v in res.get("limits", {}).items() if k.endswith("/gpu")}
    if gpus and "tensor-parallel-size" in flags:
        want = int(flags["tensor-parallel-size"]) * int(flags.get("pipeline-parallel-size", 1))
        for k, v in gpus.items():
            if int(v) != want:
                report.error(f"{label}: {k}={v} but TP x PP = {want}")
    return parsed


# The kvmesh command line parser (cluster.cli.build_parser), when --cli-root is given.
KVMESH_PARSER = None


def kvmesh_parser(root: str):
    """The CLI parsing of the kvmesh source tree at ``root`` (``parse_args(argv)``: a
    worker's flags that are not kvmesh's go to vLLM), without installing it: the
    tree's folders install as ``kvmesh.*``, so ``kvmesh`` is made a package whose path is
    the tree (and the tree's own top-level modules, the protocol, importable)."""
    import types

    root = os.path.abspath(root)
    sys.path.insert(0, root)
    package = types.ModuleType("kvmesh")
    package.__path__ = [root]
    sys.modules.setdefault("kvmesh", package)
    import types as _types

    from kvmesh.cluster import cli

    return _types.SimpleNamespace(parse_args=cli.parse_args)
# Stand-ins for values only the cluster knows. Where kvmesh binds an IPv6 address
# (KVMESH_LISTEN_HOST "::"), the cluster is IPv6-only and so are the pod IPs.
FIELD_VALUES = {"status.podIP": "10.1.2.3", "metadata.name": "pod-0", "status.hostIP": "10.0.0.1"}
FIELD_VALUES_IPV6 = {**FIELD_VALUES, "status.podIP": "fd00::a01:203", "status.hostIP": "fd00::a00:1"}
# kvmesh flags (as argparse attributes) of ports a process listens on; 0 or None: none.
LISTEN_PORTS = ("port", "grpc_port", "metrics_port", "transfer_port")
# Per subcommand, the ports others reach through the component's Service.
SERVICE_PORTS = {"router": ("port", "grpc_port"), "prefill": ("port",), "decode": ("port",),
                 "store": ("port", "metrics_port")}
# kvmesh flags that take HOST:PORT addresses (comma-separated lists for some).
ADDRESS_FLAGS = ("advertise", "store", "prefill", "decode")
HOST_PORT = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[^\[\]:]+):\d+$")


class Parsed:
    """A kvmesh container's arguments: as given ($(VAR)s filled in) and as parsed."""

    def __init__(self, args: list[str], ns: argparse.Namespace) -> None:
        self.args, self.ns = args, ns

    def given(self, flag: str) -> bool:
        return any(a == flag or a.startswith(flag + "=") for a in self.args)

    def value(self, flag: str) -> str | None:
        """The last value given to ``flag`` (``--flag=V`` or ``--flag V``), or None."""
        found = None
        for i, a in enumerate(self.args):
            if a.startswith(flag + "="):
                found = a.split("=", 1)[1]
            elif a == flag and i + 1 < len(self.args):
                found = self.args[i + 1]
        return found

    @property
    def block_size(self) -> int | None:
        """The router's --block-size, or the one a worker passes to its vLLM engine."""
        value = getattr(self.ns, "block_size", None)
        if value is None and self.value("--block-size") is not None:
            value = int(self.value("--block-size"))
        return value


def check_kvmesh_args(c: dict, config_maps: dict, label: str, report: Report) -> Parsed | None:
    """The container's arguments, $(VAR)s filled in, must parse with kvmesh's own CLI."""
    env = {}
    for src in c.get("envFrom", []):
        env.update(config_maps.get(src.get("configMapRef", {}).get("name"), {}))
    fields = FIELD_VALUES_IPV6 if ":" in str(env.get("KVMESH_LISTEN_HOST", "")) else FIELD_VALUES
    for e in c.get("env", []):
        field = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        env[e["name"]] = e.get("value", fields.get(field, "from-a-secret"))
    args = [VAR_REF.sub(lambda m: str(env.get(m.group(1), m.group(0))), str(a))
            for a in c.get("command", [])[1:] + c.get("args", [])]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            ns = KVMESH_PARSER.parse_args(args)
    except SystemExit:
        message = stderr.getvalue().strip().splitlines()[-1:] or ["?"]
        report.error(f"{label}: `kvmesh {' '.join(args)}` does not parse: {message[0]}")
        return None
    # Every port it listens on is declared (NetworkPolicies and Services name them).
    declared = {p.get("containerPort") for p in c.get("ports", [])}
    for attr in LISTEN_PORTS:
        port = getattr(ns, attr, None)
        if port and port not in declared:
            report.error(f"{label}: listens on {port} (--{attr.replace('_', '-')}), "
                         f"which is no containerPort")
    # HOST:PORT with an IPv6 host needs brackets: fd00::1:50051 is ambiguous.
    for attr in ADDRESS_FLAGS:
        value = getattr(ns, attr, None)
        for address in (value.split(",") if isinstance(value, str) else value or []):
            if not HOST_PORT.match(address):
                report.error(f"{label}: --{attr} {address!r} is not HOST:PORT "
                             f"(an IPv6 host goes in brackets: [fd00::1]:50051)")
    return Parsed(args, ns)


def secret_mounted(template: dict, path: str) -> bool:
    """Whether ``path`` lies in a volume of the pod mounted from a Secret."""
    pod = template.get("spec", {})
    secret_volumes = {v.get("name") for v in pod.get("volumes", []) if "secret" in v}
    return any(m.get("name") in secret_volumes and path.startswith(m.get("mountPath", "").rstrip("/") + "/")
               for c in pod.get("containers", []) for m in c.get("volumeMounts", []))


def check_kvmesh_cluster(kvmesh: list[tuple[str, dict, Parsed]], services: dict, report: Report) -> None:
    """Across the kvmesh containers (label, pod template, parsed arguments): one block
    size, the Service ports of each component, and the cluster secret: every component
    reads it from a file mounted from a Secret."""
    for label, template, parsed in kvmesh:
        if parsed.ns.command not in ("router", "prefill", "decode", "store"):
            continue
        path = getattr(parsed.ns, "cluster_secret_file", None)
        if not path:
            report.error(f"{label}: no --cluster-secret-file (its internal API would take anyone's calls)")
        elif not secret_mounted(template, path):
            report.error(f"{label}: --cluster-secret-file {path} lies in no volume mounted from a Secret")
    sizes = {}
    for label, _, parsed in kvmesh:
        if parsed.ns.command not in ("router", "prefill", "decode"):
            continue
        if not parsed.given("--block-size"):
            report.error(f"{label}: no --block-size (its default need not be the cluster's)")
            continue
        sizes[label] = parsed.block_size
    if len(set(sizes.values())) > 1:
        report.error("kvmesh components disagree on --block-size: "
                     + ", ".join(f"{label} {size}" for label, size in sizes.items()))
    for label, template, parsed in kvmesh:
        labels = template.get("metadata", {}).get("labels", {})
        ports = {p.get("name"): p.get("containerPort") for c in template["spec"]["containers"]
                 for p in c.get("ports", [])}
        exposed = set()
        for s in services.values():
            if matches(s["spec"]["selector"], labels):
                for p in s["spec"].get("ports", []):
                    target = p.get("targetPort", p.get("port"))
                    exposed.add(ports.get(target) if isinstance(target, str) else target)
        for attr in SERVICE_PORTS.get(parsed.ns.command, ()):
            port = getattr(parsed.ns, attr, None)
            if port and port not in exposed:
                report.error(f"{label}: no Service exposes its port {port} "
                             f"(--{attr.replace('_', '-')})")


def allowed_ports(rule: dict, container_ports: dict) -> set | None:
    """Container port numbers one NetworkPolicy ingress rule admits (None: all)."""
    if not rule.get("ports"):
        return None
    allowed = set()
    for p in rule["ports"]:
        port = p.get("port")
        if port is None:
            return None
        allowed.add(container_ports.get(port) if isinstance(port, str) else port)
    return allowed


def check_pod(obj: dict, template: dict, where: str, config_maps: dict, secrets: dict,
              need_probes: bool, report: Report) -> list[tuple[str, dict, Parsed]]:
    """Checks a pod template; returns its kvmesh containers (label, template, parsed args)."""
    pod = template.get("spec", {})
    kvmesh = []
    for c in pod.get("initContainers", []):
        parsed = check_container(c, pod, where, config_maps, secrets, False, False, report)
        if parsed:
            kvmesh.append((f"{where} init container {c.get('name')}", template, parsed))
    for c in pod.get("containers", []):
        parsed = check_container(c, pod, where, config_maps, secrets, True, need_probes, report)
        if parsed:
            kvmesh.append((f"{where} container {c.get('name')}", template, parsed))
    annotations = template.get("metadata", {}).get("annotations") or {}
    if annotations.get("prometheus.io/scrape") == "true":
        port = int(annotations.get("prometheus.io/port", 0))
        if port not in {p.get("containerPort") for c in pod.get("containers", []) for p in c.get("ports", [])}:
            report.error(f"{where}: prometheus.io/port {port} is no container port")
    return kvmesh


def check_consistency(docs: list[dict], report: Report) -> None:
    config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d.get("kind") == "ConfigMap"}
    secrets = {d["metadata"]["name"]: {**d.get("data", {}), **d.get("stringData", {})}
               for d in docs if d.get("kind") == "Secret"}
    pods = []  # (owner, template)
    kvmesh = []  # (label, template, parsed arguments) of every kvmesh container
    for d in docs:
        template = pod_template(d)
        if template:
            pods.append((name_of(d), template))
            kvmesh += check_pod(d, template, name_of(d), config_maps, secrets, True, report)
            strategy = d["spec"].get("strategy", {}) if d["kind"] == "Deployment" else {}
            if "rollingUpdate" in strategy and strategy.get("type", "RollingUpdate") != "RollingUpdate":
                # The API server refuses it ("may not be specified when strategy type is ...").
                report.error(f"{name_of(d)}: strategy type {strategy['type']} with rollingUpdate")
            selector = d["spec"].get("selector", {}).get("matchLabels", {})
            if not matches(selector, template.get("metadata", {}).get("labels", {})):
                report.error(f"{name_of(d)}: selector does not match its pod template's labels")
        elif d.get("kind") in CUSTOM_KINDS and d.get("apiVersion", "").startswith("ray.io/"):
            for group, template in ray_pod_templates(d):
                # KubeRay adds the Ray probes itself.
                kvmesh += check_pod(d, template, f"{name_of(d)} group {group}", config_maps, secrets, False,
                                    report)
                pods.append((f"{name_of(d)} group {group}", template))
    services = {}
    for d in docs:
        if d.get("kind") != "Service" or not d["spec"].get("selector"):
            continue
        services[d["metadata"]["name"]] = d
        selected = [t for _, t in pods if matches(d["spec"]["selector"], t.get("metadata", {}).get("labels", {}))]
        if not selected:
            report.error(f"{name_of(d)}: selector matches no pod template")
            continue
        for port in d["spec"].get("ports", []):
            target = port.get("targetPort", port.get("port"))
            found = any((p.get("name") == target if isinstance(target, str) else p.get("containerPort") == target)
                        for t in selected for c in t["spec"]["containers"] for p in c.get("ports", []))
            if not found:
                report.error(f"{name_of(d)}: targetPort {target!r} is no port of the selected pods")
    check_kvmesh_cluster(kvmesh, services, report)
    for d in docs:
        if d.get("kind") == "ServiceMonitor":
            selector = d["spec"].get("selector", {}).get("matchLabels", {})
            hits = [s for s in services.values() if matches(selector, s["metadata"].get("labels", {}))]
            if not hits:
                report.error(f"{name_of(d)}: selects no Service")
            for ep in d["spec"].get("endpoints", []):
                if hits and not any(ep.get("port") == p.get("name") for s in hits for p in s["spec"]["ports"]):
                    report.error(f"{name_of(d)}: endpoint port {ep.get('port')!r} is on no selected Service")
        if d.get("kind") == "NetworkPolicy":
            labels = [t.get("metadata", {}).get("labels", {}) for _, t in pods]
            selectors = [d["spec"]["podSelector"].get("matchLabels", {})]
            selectors += [peer["podSelector"].get("matchLabels", {}) for rule in d["spec"].get("ingress", [])
                          for peer in rule.get("from", []) if "podSelector" in peer]
            for sel in selectors:
                if not any(matches(sel, lab) for lab in labels):
                    report.error(f"{name_of(d)}: pod selector {sel} matches no pod template")
            # The selected pods take only what a rule admits: every port they listen on
            # needs one.
            for owner, t in pods if "Ingress" in d["spec"].get("policyTypes", ["Ingress"]) else []:
                if not matches(selectors[0], t.get("metadata", {}).get("labels", {})):
                    continue
                ports = {p.get("name"): p.get("containerPort") for c in t["spec"]["containers"]
                         for p in c.get("ports", [])}
                admitted = [allowed_ports(rule, ports) for rule in d["spec"].get("ingress", [])]
                if any(a is None for a in admitted):
                    continue
                for name, number in ports.items():
                    if not any(number in a for a in admitted):
                        report.error(f"{name_of(d)}: no ingress rule admits port {name} ({number}) of {owner}")


def cmd_k8s(args) -> int:
    global KVMESH_PARSER
    if args.cli_root:
        KVMESH_PARSER = kvmesh_parser(args.cli_root)
    report = Report()
    for path in args.files:
        print(f"validate {path}")
        docs = load_docs(path)
        if not docs:
            report.error(f"{path}: no objects")
        for obj in docs:
            validate_object(obj, args.kube_version, report)
        check_consistency(docs, report)
    print(f"  {report.checked} objects valid against Kubernetes {args.kube_version}, "
          f"{report.skipped} custom resources skipped, {report.errors} errors")
    return 1 if report.errors else 0


def writable_host_dirs(docs: list[dict]) -> dict[str, str]:
    """Node directories the pods mount writable (hostPath path plus subPath) -> where."""
    dirs = {}
    for d in docs:
        template = pod_template(d)
        if not template:
            continue
        pod = template.get("spec", {})
        host = {v["name"]: v["hostPath"]["path"] for v in pod.get("volumes", []) if "hostPath" in v}
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            for m in c.get("volumeMounts", []):
                if m["name"] in host and not m.get("readOnly"):
                    path = host[m["name"]].rstrip("/")
                    if m.get("subPath"):
                        path += "/" + m["subPath"].strip("/")
                    dirs[path] = f"{name_of(d)} container {c.get('name')}"
    return dirs


def overlapping_dirs(a: dict[str, str], b: dict[str, str]) -> list[str]:
    def inside(x: str, y: str) -> bool:
        return x == y or x.startswith(y + "/")

    return [f"{a[x]} writes {x}, {b[y]} writes {y}" for x in a for y in b if inside(x, y) or inside(y, x)]


def cmd_separate_releases(args) -> int:
    """Two releases rendered into one cluster must not write the same node directory."""
    print(f"{args.files[0]} and {args.files[1]}: no node directory written by both")
    clashes = overlapping_dirs(*(writable_host_dirs(load_docs(f)) for f in args.files))
    for clash in clashes:
        print(f"  ERROR {clash}")
    if not clashes:
        print("  ok")
    return 1 if clashes else 0


# ---------------------------------------------------------------- other files


def cmd_ray_config(args) -> int:
    import jsonschema

    with open(args.schema) as f:
        schema = json.load(f)
    with open(args.file) as f:
        config = yaml.safe_load(f)
    print(f"validate {args.file} against Ray's cluster config schema")
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.path))
    for e in errors:
        print(f"  ERROR {'.'.join(map(str, e.path)) or '(top)'}: {e.message}")
    # The custom resources come from node types or from `ray start --resources`.
    node_types = config.get("available_node_types", {})
    offered = json.dumps([t.get("resources", {}) for t in node_types.values()])
    starts = " ".join(config.get("head_start_ray_commands", []) + config.get("worker_start_ray_commands", []))
    if "--resources" in starts:
        offered += starts
    for resource in ("prefill", "decode"):
        if not re.search(rf"\b{resource}\b", offered):
            print(f"  ERROR no node type or `ray start --resources` offers the custom resource {resource!r}")
            errors.append(resource)
    if not errors:
        print("  ok    schema valid; the custom resources prefill and decode are offered")
    return 1 if errors else 0


def uncommented_keys(path: str) -> list[str]:
    """Keys of mappings (outside lists) with neither a comment line above nor one after them."""
    with open(path) as f:
        text = f.read()
    lines = text.splitlines()
    missing = []

    def has_comment(line_no: int) -> bool:
        line = lines[line_no]
        above = lines[line_no - 1].strip() if line_no > 0 else ""
        return above.startswith("#") or re.search(r"\s#\s", line) is not None

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = f"{prefix}.{key.value}" if prefix else key.value
                if not has_comment(key.start_mark.line):
                    missing.append(f"{name} (line {key.start_mark.line + 1})")
                walk(value, name)

    walk(yaml.compose(text), "")
    return missing


def cmd_values_comments(args) -> int:
    print(f"every value in {args.file} has a comment")
    missing = uncommented_keys(args.file)
    for m in missing:
        print(f"  ERROR no comment for {m}")
    if not missing:
        print("  ok")
    return 1 if missing else 0


def cmd_dockerfile(args) -> int:
    errors = 0
    for path in args.files:
        print(f"inspect {path}")
        with open(path) as f:
            lines = [ln.strip() for ln in f.read().replace("\\\n", " ").splitlines()]
        instructions = [ln for ln in lines if ln and not ln.startswith("#")]
        last_stage = max(i for i, ln in enumerate(instructions) if ln.upper().startswith("FROM "))
        users = [ln.split(None, 1)[1] for ln in instructions[last_stage:] if ln.upper().startswith("USER ")]
        problems = []
        if not users or users[-1].split(":")[0] in ("root", "0"):
            problems.append("the final stage must end with a non-root USER")
        entry = [ln for ln in instructions if ln.upper().startswith("ENTRYPOINT ")]
        if not entry or json.loads(entry[-1].split(None, 1)[1]) != ["kvmesh"]:
            problems.append('ENTRYPOINT must be ["kvmesh"]')
        for p in problems:
            print(f"  ERROR {p}")
        if not problems:
            print(f"  ok    USER {users[-1]}, ENTRYPOINT [\"kvmesh\"]")
        errors += len(problems)
    return 1 if errors else 0


# ---------------------------------------------------------------- self-test


def cmd_selftest(args) -> int:
    """Broken objects must be rejected, or a passing check proves nothing."""
    good = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
        "spec": {"selector": {"matchLabels": {"app": "x"}}, "template": {
            "metadata": {"labels": {"app": "x"}},
            "spec": {"securityContext": {"runAsNonRoot": True}, "containers": [{
                "name": "x", "image": "kvmesh:1", "args": ["--a=$(A)"],
                "env": [{"name": "A", "value": "1"}],
                "ports": [{"name": "grpc", "containerPort": 1}],
                "readinessProbe": {"tcpSocket": {"port": "grpc"}},
                "livenessProbe": {"tcpSocket": {"port": "grpc"}},
                "securityContext": {"allowPrivilegeEscalation": False},
                "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "1Gi"}},
            }]}}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
               "spec": {"selector": {"app": "x"}, "ports": [{"port": 1, "targetPort": "grpc"}]}}

    def run(docs) -> int:
        report = Report()
        for d in docs:
            validate_object(d, args.kube_version, report)
        check_consistency(docs, report)
        return report.errors

    def broken(edit):
        d, s = copy.deepcopy(good), copy.deepcopy(service)
        edit(d, s)
        return [d, s]

    container = lambda d: d["spec"]["template"]["spec"]["containers"][0]  # noqa: E731
    cases = {
        "an unknown field (strict schema)": broken(lambda d, s: container(d).update(imageTag="1")),
        "a wrong type": broken(lambda d, s: d["spec"].update(replicas="two")),
        "an unknown kind": [{"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}],
        "an undefined $(VAR)": broken(lambda d, s: container(d).update(args=["--a=$(B)"])),
        "a Service selecting nothing": broken(lambda d, s: s["spec"].update(selector={"app": "y"})),
        "a Service port the pods lack": broken(lambda d, s: s["spec"]["ports"][0].update(targetPort="http")),
        "a container running as root": broken(lambda d, s: d["spec"]["template"]["spec"].update(securityContext={})),
        "a container without a readiness probe": broken(lambda d, s: container(d).pop("readinessProbe")),
        "an image without a tag": broken(lambda d, s: container(d).update(image="kvmesh")),
        "a Recreate strategy with rollingUpdate": broken(lambda d, s: d["spec"].update(
            strategy={"type": "Recreate", "rollingUpdate": {"maxSurge": 0}})),
        "a NetworkPolicy that leaves a container port unreachable": broken(lambda d, s: None) + [{
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "x"},
            "spec": {"podSelector": {"matchLabels": {"app": "x"}}, "policyTypes": ["Ingress"],
                     "ingress": [{"ports": [{"port": 2}]}]}}],
    }
    if args.cli_root:
        global KVMESH_PARSER
        KVMESH_PARSER = kvmesh_parser(args.cli_root)
        cases["kvmesh arguments its CLI refuses"] = broken(
            lambda d, s: container(d).update(command=["kvmesh"], args=["store", "--host-bytes=$(A)GiB", "--bogus"]))
        kvmesh = lambda *args: lambda d, s: container(d).update(command=["kvmesh"], args=list(args))  # noqa: E731
        cases["a kvmesh port that is no containerPort"] = broken(kvmesh("router", "--port=1", "--grpc-port=2",
                                                                        "--block-size=32"))
        cases["a kvmesh port no Service exposes"] = broken(lambda d, s: (
            kvmesh("store", "--port=1", "--metrics-port=2")(d, s),
            container(d)["ports"].append({"name": "metrics", "containerPort": 2})))
        cases["an unbracketed IPv6 HOST:PORT"] = broken(kvmesh("store", "--port=1", "--metrics-port=0",
                                                               "--advertise=fd00::1:1"))
        cases["a kvmesh component without --block-size"] = broken(kvmesh("router", "--port=1", "--grpc-port=0"))
        cases["kvmesh components with different block sizes"] = broken(lambda d, s: (
            kvmesh("prefill", "--port=1", "--block-size=32")(d, s),
            d["spec"]["template"]["spec"]["containers"].append(
                {**copy.deepcopy(container(d)), "name": "y", "args": ["decode", "--port=1", "--block-size=64"]})))
        secret_volume = {"name": "s", "secret": {"secretName": "x"}}
        one_worker = kvmesh("prefill", "--port=1", "--block-size=32", "--cluster-secret-file=/s/secret")
        cases["a kvmesh component without --cluster-secret-file"] = broken(lambda d, s: (
            kvmesh("prefill", "--port=1", "--block-size=32")(d, s),
            d["spec"]["template"]["spec"].update(volumes=[secret_volume]),
            container(d).update(volumeMounts=[{"name": "s", "mountPath": "/s"}])))
        cases["a cluster secret file on no Secret volume"] = broken(lambda d, s: (
            one_worker(d, s), d["spec"]["template"]["spec"].update(volumes=[{"name": "s", "emptyDir": {}}]),
            container(d).update(volumeMounts=[{"name": "s", "mountPath": "/s"}])))
        with_secret = broken(lambda d, s: (
            one_worker(d, s), d["spec"]["template"]["spec"].update(volumes=[secret_volume]),
            container(d).update(volumeMounts=[{"name": "s", "mountPath": "/s"}])))
    print("self-test: the validator accepts a good Deployment and rejects broken ones")
    with contextlib.redirect_stdout(io.StringIO()):
        good_errors = run([good, service])
        rejected = {name: run(docs) > 0 for name, docs in cases.items()}
    print(f"  {'ok   ' if good_errors == 0 else 'ERROR'} accepts a good Deployment and Service")
    failures = int(good_errors > 0)
    if args.cli_root:  # the negative control of the cluster secret cases
        with contextlib.redirect_stdout(io.StringIO()):
            secret_errors = run(with_secret)
        print(f"  {'ok   ' if secret_errors == 0 else 'ERROR'} accepts a kvmesh worker reading its "
              "cluster secret from a Secret volume")
        failures += secret_errors > 0
    for name, was_rejected in rejected.items():
        print(f"  {'ok   ' if was_rejected else 'ERROR'} rejects {name}")
        failures += not was_rejected

    def on_node(path: str, sub_path: str = "") -> dict:  # the good Deployment, writing a node directory
        d = copy.deepcopy(good)
        d["spec"]["template"]["spec"]["volumes"] = [{"name": "disk", "hostPath": {"path": path}}]
        mount = {"name": "disk", "mountPath": "/d", **({"subPath": sub_path} if sub_path else {})}
        container(d)["volumeMounts"] = [mount]
        return d

    separate = not overlapping_dirs(writable_host_dirs([on_node("/mnt/x", "a")]),
                                    writable_host_dirs([on_node("/mnt/x", "b")]))
    shared = overlapping_dirs(writable_host_dirs([on_node("/mnt/x/")]), writable_host_dirs([on_node("/mnt/x", "b")]))
    print(f"  {'ok   ' if separate and shared else 'ERROR'} tells releases with separate node directories "
          f"from releases sharing one")
    failures += not (separate and shared)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("k8s")
    s.add_argument("--kube-version", required=True)
    s.add_argument("--cli-root", help="repository root: check kvmesh containers' args with its CLI parser")
    s.add_argument("files", nargs="+")
    s.set_defaults(func=cmd_k8s)
    s = sub.add_parser("separate-releases")
    s.add_argument("files", nargs=2, help="two releases rendered for the same cluster")
    s.set_defaults(func=cmd_separate_releases)
    s = sub.add_parser("ray-config")
    s.add_argument("--schema", required=True)
    s.add_argument("file")
    s.set_defaults(func=cmd_ray_config)
    s = sub.add_parser("values-comments")
    s.add_argument("file")
    s.set_defaults(func=cmd_values_comments)
    s = sub.add_parser("dockerfile")
    s.add_argument("files", nargs="+")
    s.set_defaults(func=cmd_dockerfile)
    s = sub.add_parser("selftest")
    s.add_argument("--kube-version", required=True)
    s.add_argument("--cli-root", help="repository root: include the kvmesh CLI check")
    s.set_defaults(func=cmd_selftest)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
