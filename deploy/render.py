#!/usr/bin/env python3
"""Render kvscale's Kubernetes manifests and check them before they reach a cluster.

    python deploy/render.py deploy/overlays/pd            # print the rendered YAML (kubectl kustomize)
    python deploy/render.py deploy/overlays/pd --check    # render, then run every check below; exit 1 on problems

Rendering is ``kubectl kustomize`` (or a standalone ``kustomize build``); this file does not re-implement
kustomize. The checks are what an API server, KEDA and the kvscale scaler would reject, plus the wiring mistakes
nothing rejects until traffic fails:

* schemas: built-in kinds against Kubernetes' OpenAPI schemas (``kubernetes-validate``, strict, oldest and newest
  supported versions); KEDA and Prometheus Operator kinds against the JSON schemas in ``deploy/schemas/``;
* wiring: Deployment / Service / PDB / NetworkPolicy selectors select pods, Service and probe ports exist,
  ConfigMaps / Secrets / ServiceAccounts / PriorityClasses / Roles that are referenced exist (Secrets the operator
  creates are listed in :data:`OPERATOR_SECRETS`), GPU pods tolerate the GPU taint;
* kvscale semantics: engine role labels, ``--kv-events-config`` / ``--kv-transfer-config``, the router's
  ``--k8s-selector``, and every ScaledObject against its target (pool vs role, podSelector, model, port,
  ``maxNumSeqs``, scaler address and namespace, the mounted latency model, replica bounds and fallback);
* the scaler's own validation of each trigger's metadata (``scaler.metadata.parse_scaler_metadata``), when the
  kvscale package is importable.

Importable: ``render(path) -> list[dict]`` and ``check(docs) -> list[str]`` (the tests use both).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from kvscale.labels import label_key_ok, label_value_ok, matches, parse_selector

DEPLOY_DIR = Path(__file__).resolve().parent
SCHEMA_DIR = DEPLOY_DIR / "schemas"
# Kubernetes versions the manifests must be valid for: the oldest we support (sleep preStop hooks are on by
# default from 1.30) and the newest kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")
# Secrets that the operator creates (docs/deploy.md); every other referenced Secret must be in the output.
OPERATOR_SECRETS = {
    "kvscale-router-api-keys": "router API keys, one per line under the key api-keys",
    "kvscale-scaler-tls": "the scaler's TLS server certificate (deploy/tls/make-certs.sh)",
    "kvscale-keda-client-tls": "KEDA's TLS client certificate (deploy/tls/make-certs.sh)",
    "hf-token": "Hugging Face token for gated models (optional)",
}
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_v1alpha1_scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda.sh_v1alpha1_triggerauthentication.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_v1_podmonitor.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_servicemonitor.json",
}
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
ROLES = ("prefill", "decode", "both")
POOL_ROLE = {"prefill": "prefill", "decode": "decode", "aggregated": "both"}
GPU_RESOURCE = "nvidia.com/gpu"

Doc = dict[str, Any]


class RenderError(RuntimeError):
    """The manifests could not be rendered (no kustomize, or kustomize rejected them)."""


# ----------------------------------------------------------------------------------------------- rendering
# The overlays use kustomize v5 features (labels, components, replacements with delimiters).
MIN_KUSTOMIZE = (5, 0)


def kustomize_command() -> list[str]:
    """``kubectl kustomize`` if kubectl embeds kustomize v5+, else a standalone ``kustomize build``."""
    found = []
    if kubectl := shutil.which("kubectl"):
        version = _version(
            [kubectl, "version", "--client", "-o", "json"], lambda out: json.loads(out).get("kustomizeVersion", "")
        )
        if version >= MIN_KUSTOMIZE:
            return [kubectl, "kustomize"]
        found.append(f"{kubectl} embeds kustomize {'.'.join(map(str, version)) or 'unknown'}")
    if kustomize := shutil.which("kustomize"):
        version = _version([kustomize, "version"], lambda out: out)
        if version >= MIN_KUSTOMIZE:
            return [kustomize, "build"]
        found.append(f"{kustomize} is version {'.'.join(map(str, version)) or 'unknown'}")
    raise RenderError(
        "rendering deploy/ needs kustomize >= 5: kubectl >= 1.27 (it embeds kustomize) or a standalone kustomize; "
        + ("found: " + "; ".join(found) if found else "neither kubectl nor kustomize is on PATH")
        + ". Debian's kubernetes-client (1.20) is too old: install kubectl from the Kubernetes apt repository."
    )


def _version(cmd: list[str], pick: Callable[[str], str]) -> tuple[int, ...]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False).stdout
        m = re.search(r"v?(\d+)\.(\d+)", pick(out))
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return ()
    return (int(m[1]), int(m[2])) if m else ()


def render_text(path: str | Path) -> str:
    """The YAML ``kustomize`` renders for one kustomization directory."""
    cmd = [*kustomize_command(), str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RenderError(f"{shlex.join(cmd)} failed:\n{proc.stderr.strip()}")
    return proc.stdout


def render(path: str | Path) -> list[Doc]:
    """Rendered objects of one kustomization directory, in kustomize's order."""
    return [d for d in yaml.safe_load_all(render_text(path)) if d]


# ----------------------------------------------------------------------------------------------- helpers
def ident(doc: Doc) -> str:
    md = doc.get("metadata", {})
    ns = f"{md['namespace']}/" if md.get("namespace") else ""
    return f"{doc.get('kind')} {ns}{md.get('name')}"


def ns_of(doc: Doc) -> str | None:
    return doc.get("metadata", {}).get("namespace")


def of_kind(docs: Iterable[Doc], *kinds: str) -> Iterator[Doc]:
    return (d for d in docs if d.get("kind") in kinds)


def find(docs: Iterable[Doc], kind: str, name: str, namespace: str | None) -> Doc | None:
    for d in of_kind(docs, kind):
        if d["metadata"].get("name") == name and ns_of(d) == namespace:
            return d
    return None


def pod_spec(doc: Doc) -> Doc:
    return doc["spec"]["template"]["spec"]


def pod_labels(doc: Doc) -> dict[str, str]:
    return doc["spec"]["template"].get("metadata", {}).get("labels", {}) or {}


def containers(doc: Doc) -> list[Doc]:
    spec = pod_spec(doc)
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def flag(args: list[str], name: str) -> str | None:
    """Value of ``--name=value`` or ``--name value`` in a container's args (last one wins, like argparse)."""
    value = None
    for i, a in enumerate(args):
        if a.startswith(f"{name}="):
            value = a.split("=", 1)[1]
        elif a == name and i + 1 < len(args):
            value = args[i + 1]
    return value


def selector_from_object(sel: Doc) -> list[tuple[str, str, set[str]]]:
    """A LabelSelector object (matchLabels + matchExpressions) as requirements."""
    reqs = [(k, "=", {v}) for k, v in (sel.get("matchLabels") or {}).items()]
    ops = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!exists"}
    for e in sel.get("matchExpressions") or []:
        reqs.append((e["key"], ops[e["operator"]], set(e.get("values") or [])))
    return reqs


def selected_workloads(docs: list[Doc], reqs: list[tuple[str, str, set[str]]], namespace: str | None) -> list[Doc]:
    return [w for w in of_kind(docs, *WORKLOAD_KINDS) if ns_of(w) == namespace and matches(reqs, pod_labels(w))]


def container_ports(workload: Doc) -> list[Doc]:
    return [p for c in containers(workload) for p in c.get("ports", [])]


# ----------------------------------------------------------------------------------------------- schema checks
def check_schemas(docs: list[Doc], versions: Iterable[str] = K8S_VERSIONS) -> list[str]:
    """Built-in kinds against Kubernetes' schemas (strict), the CRD kinds against deploy/schemas/."""
    import jsonschema
    import kubernetes_validate

    problems: list[str] = []
    validators: dict[tuple[str, str], jsonschema.Validator] = {}
    for doc in docs:
        key = (doc.get("apiVersion", ""), doc.get("kind", ""))
        if key in CRD_SCHEMAS:
            if key not in validators:
                schema = json.loads((SCHEMA_DIR / CRD_SCHEMAS[key]).read_text())
                cls = jsonschema.validators.validator_for(schema)
                cls.check_schema(schema)
                validators[key] = cls(schema)
            for err in sorted(validators[key].iter_errors(doc), key=lambda e: list(e.absolute_path)):
                where = ".".join(str(p) for p in err.absolute_path) or "(root)"
                problems.append(f"{ident(doc)}: {where}: {err.message}")
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.utils.SchemaNotFoundError:
                problems.append(f"{ident(doc)}: no schema for {key[0]} {key[1]} (Kubernetes {version})")
                break
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path) or "(root)"
                problems.append(f"{ident(doc)}: Kubernetes {version}: {where}: {e.message}")
    return problems


# ----------------------------------------------------------------------------------------------- wiring checks
def check_labels(docs: list[Doc]) -> list[str]:
    problems = []
    for doc in docs:
        sets = [("metadata.labels", doc.get("metadata", {}).get("labels") or {})]
        if doc.get("kind") in WORKLOAD_KINDS:
            sets.append(("pod labels", pod_labels(doc)))
        for where, labels in sets:
            for k, v in labels.items():
                if not label_key_ok(k) or not isinstance(v, str) or not label_value_ok(v):
                    problems.append(f"{ident(doc)}: {where}: invalid label {k}={v!r}")
    return problems


def check_workloads(docs: list[Doc]) -> list[str]:
    """Selectors vs pod labels, volumes, mounts, probe ports, references to ConfigMaps / Secrets / accounts."""
    problems = []
    for w in of_kind(docs, *WORKLOAD_KINDS):
        ns, spec, me = ns_of(w), pod_spec(w), ident(w)
        if not matches(selector_from_object(w["spec"]["selector"]), pod_labels(w)):
            problems.append(f"{me}: spec.selector does not match the pod template's labels")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            if "configMap" in v:
                cm = find(docs, "ConfigMap", v["configMap"]["name"], ns)
                if cm is None and not v["configMap"].get("optional"):
                    problems.append(f"{me}: volume {v['name']}: ConfigMap {v['configMap']['name']} not rendered")
                for item in v["configMap"].get("items", []) if cm else []:
                    if item["key"] not in (cm.get("data") or {}):
                        problems.append(f"{me}: volume {v['name']}: ConfigMap has no key {item['key']}")
            if "secret" in v and not _secret_readable(spec, v["secret"]):
                problems.append(
                    f"{me}: volume {v['name']}: Secret files (mode {oct(v['secret']['defaultMode'])}) "
                    "are unreadable for the non-root user: set securityContext.fsGroup"
                )
            if "secret" in v:
                problems += _secret_ref(
                    docs, me, f"volume {v['name']}", v["secret"]["secretName"], ns, v["secret"].get("optional", False)
                )
        sa = spec.get("serviceAccountName")
        if sa and find(docs, "ServiceAccount", sa, ns) is None:
            problems.append(f"{me}: serviceAccountName {sa} not rendered")
        pc = spec.get("priorityClassName")
        if pc and find(docs, "PriorityClass", pc, None) is None:
            problems.append(f"{me}: priorityClassName {pc} not rendered")
        gpu = any(GPU_RESOURCE in (c.get("resources", {}).get("limits") or {}) for c in containers(w))
        if gpu and not any(t.get("key") == GPU_RESOURCE for t in spec.get("tolerations", [])):
            problems.append(f"{me}: requests {GPU_RESOURCE} but does not tolerate the {GPU_RESOURCE} taint")
        for c in containers(w):
            where = f"{me}: container {c['name']}"
            port_names = {p.get("name") for p in c.get("ports", [])}
            port_numbers = {p["containerPort"] for p in c.get("ports", [])}
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    problems.append(f"{where}: volumeMount {m['name']} has no volume")
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(probe_name) or {}
                for kind in ("httpGet", "tcpSocket", "grpc"):
                    port = (probe.get(kind) or {}).get("port")
                    if isinstance(port, str) and port not in port_names:
                        problems.append(f"{where}: {probe_name} uses port {port!r}, not a named container port")
                    if isinstance(port, int) and port not in port_numbers:
                        problems.append(f"{where}: {probe_name} uses port {port}, not a container port")
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    r = ref["configMapKeyRef"]
                    cm = find(docs, "ConfigMap", r["name"], ns)
                    if (cm is None or r["key"] not in (cm.get("data") or {})) and not r.get("optional"):
                        problems.append(f"{where}: env {e['name']}: ConfigMap key {r['name']}/{r['key']} missing")
                if "secretKeyRef" in ref:
                    r = ref["secretKeyRef"]
                    problems += _secret_ref(docs, where, f"env {e['name']}", r["name"], ns, r.get("optional", False))
            for src in c.get("envFrom", []):
                if "configMapRef" in src and find(docs, "ConfigMap", src["configMapRef"]["name"], ns) is None:
                    problems.append(f"{where}: envFrom ConfigMap {src['configMapRef']['name']} not rendered")
                if "secretRef" in src:
                    r = src["secretRef"]
                    problems += _secret_ref(docs, where, "envFrom", r["name"], ns, r.get("optional", False))
    return problems


def _secret_readable(spec: Doc, secret: Doc) -> bool:
    """Secret volume files are root-owned (group: the pod's fsGroup); can the containers' user read them?"""
    mode = secret.get("defaultMode", 0o644)
    pod_ctx = spec.get("securityContext") or {}
    for c in spec.get("containers", []):
        uid = (c.get("securityContext") or {}).get("runAsUser", pod_ctx.get("runAsUser"))
        if uid in (None, 0):
            continue  # root (or the image's user, which we cannot know)
        if not (mode & 0o004 or (mode & 0o040 and pod_ctx.get("fsGroup") is not None)):
            return False
    return True


def _secret_ref(docs: list[Doc], who: str, what: str, name: str, ns: str | None, optional: bool) -> list[str]:
    if find(docs, "Secret", name, ns) is not None or name in OPERATOR_SECRETS:
        return []
    return [f"{who}: {what}: Secret {name} is neither rendered nor an operator-created Secret"]


def check_services(docs: list[Doc]) -> list[str]:
    problems = []
    for svc in of_kind(docs, "Service"):
        sel = svc["spec"].get("selector")
        if not sel:
            continue
        pods = selected_workloads(docs, selector_from_object({"matchLabels": sel}), ns_of(svc))
        if not pods:
            problems.append(f"{ident(svc)}: selector {sel} selects no pod template")
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            for w in pods:
                cps = container_ports(w)
                ok = (
                    any(p.get("name") == target for p in cps)
                    if isinstance(target, str)
                    else any(p["containerPort"] == target for p in cps)
                )
                if not ok:
                    problems.append(
                        f"{ident(svc)}: port {port.get('name', port['port'])} targets {target!r}, "
                        f"which {ident(w)} does not expose"
                    )
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        pods = selected_workloads(docs, selector_from_object(pdb["spec"]["selector"]), ns_of(pdb))
        if not pods:
            problems.append(f"{ident(pdb)}: selects no pod template")
        min_available = pdb["spec"].get("minAvailable")
        for w in pods:
            replicas = w["spec"].get("replicas", 1)
            if isinstance(min_available, int) and min_available >= replicas:
                problems.append(
                    f"{ident(pdb)}: minAvailable {min_available} >= {ident(w)} replicas {replicas}: "
                    "no voluntary disruption would ever be allowed"
                )
    for np in of_kind(docs, "NetworkPolicy"):
        pods = selected_workloads(docs, selector_from_object(np["spec"]["podSelector"]), ns_of(np))
        if not pods:
            problems.append(f"{ident(np)}: podSelector selects no pod template")
        for rule in np["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                if isinstance(port.get("port"), str):
                    for w in pods:
                        if not any(p.get("name") == port["port"] for p in container_ports(w)):
                            problems.append(f"{ident(np)}: named port {port['port']} not in {ident(w)}")
    return problems


def check_trigger_auth(docs: list[Doc]) -> list[str]:
    problems = []
    for ta in of_kind(docs, "TriggerAuthentication"):
        for ref in ta["spec"].get("secretTargetRef", []):
            problems += _secret_ref(docs, ident(ta), f"parameter {ref['parameter']}", ref["name"], ns_of(ta), False)
    return problems


def check_rbac(docs: list[Doc]) -> list[str]:
    problems = []
    for rb in of_kind(docs, "RoleBinding"):
        ref = rb["roleRef"]
        scope = ns_of(rb) if ref["kind"] == "Role" else None
        if find(docs, ref["kind"], ref["name"], scope) is None:
            problems.append(f"{ident(rb)}: roleRef {ref['kind']} {ref['name']} not rendered")
        for s in rb.get("subjects", []):
            if s["kind"] == "ServiceAccount" and find(docs, "ServiceAccount", s["name"], s.get("namespace")) is None:
                problems.append(f"{ident(rb)}: subject ServiceAccount {s.get('namespace')}/{s['name']} not rendered")
    return problems


# ----------------------------------------------------------------------------------------------- kvscale checks
def engine_workloads(docs: list[Doc]) -> list[Doc]:
    return [w for w in of_kind(docs, *WORKLOAD_KINDS) if pod_labels(w).get("app.kubernetes.io/component") == "engine"]


def engine_container(w: Doc) -> Doc:
    return next(c for c in pod_spec(w)["containers"] if c["name"] == "vllm")


def check_engines(docs: list[Doc]) -> list[str]:
    """Role labels, KV events, P/D connector, health probes of the vLLM pools."""
    problems = []
    for w in engine_workloads(docs):
        me, labels = ident(w), pod_labels(w)
        role = labels.get("kvscale.io/role")
        if role not in ROLES:
            problems.append(f"{me}: pod label kvscale.io/role={role!r}, expected one of {ROLES}")
        if labels.get("llm-d.ai/role") != role:
            problems.append(f"{me}: llm-d.ai/role={labels.get('llm-d.ai/role')!r} differs from kvscale.io/role")
        if w["spec"]["selector"].get("matchLabels", {}).get("kvscale.io/role") != role:
            problems.append(f"{me}: the selector must include kvscale.io/role so pools never adopt each other's pods")
        c = engine_container(w)
        args = c.get("args", [])
        if flag(args, "--model") is None:
            problems.append(f"{me}: no --model")
        served = flag(args, "--served-model-name") or flag(args, "--model")
        if labels.get("kvscale.io/model") != served:
            problems.append(
                f"{me}: the router serves the model named by the label kvscale.io/model="
                f"{labels.get('kvscale.io/model')!r}, but vLLM serves {served!r} (set --served-model-name)"
            )
        if "--enable-prefix-caching" not in args:
            problems.append(f"{me}: no --enable-prefix-caching")
        events = flag(args, "--kv-events-config")
        try:
            ev = json.loads(events or "")
            if not (ev.get("enable_kv_cache_events") is True and ev.get("publisher") == "zmq"):
                problems.append(f"{me}: --kv-events-config must enable events with the zmq publisher")
            port = int(str(ev.get("endpoint", "")).rsplit(":", 1)[-1])
            if not any(p["containerPort"] == port for p in c.get("ports", [])):
                problems.append(f"{me}: KV-events port {port} is not a container port")
            if labels and w["spec"]["template"].get("metadata", {}).get("annotations", {}).get(
                "kvscale.io/kv-events-port"
            ) != str(port):
                problems.append(f"{me}: annotation kvscale.io/kv-events-port differs from --kv-events-config")
        except (ValueError, AttributeError):
            problems.append(f"{me}: --kv-events-config is missing or not a JSON object: {events!r}")
        transfer = flag(args, "--kv-transfer-config")
        if role in ("prefill", "decode"):
            try:
                kt = json.loads(transfer or "")
                if kt.get("kv_connector") != "NixlConnector" or kt.get("kv_role") != "kv_both":
                    problems.append(f"{me}: P/D pods need NixlConnector with kv_role kv_both, got {transfer}")
            except (ValueError, AttributeError):
                problems.append(f"{me}: P/D pod without a JSON --kv-transfer-config")
            env = {e["name"]: e for e in c.get("env", [])}
            host = env.get("VLLM_NIXL_SIDE_CHANNEL_HOST", {}).get("valueFrom", {}).get("fieldRef", {})
            if host.get("fieldPath") != "status.podIP":
                problems.append(f"{me}: VLLM_NIXL_SIDE_CHANNEL_HOST must be the pod IP (vLLM's default is localhost)")
        elif transfer is not None:
            problems.append(f"{me}: role {role} pods should not set --kv-transfer-config")
        http_port = flag(args, "--port") or "8000"
        if not any(p.get("name") == "http" and str(p["containerPort"]) == http_port for p in c.get("ports", [])):
            problems.append(f"{me}: container port 'http' is not vLLM's --port {http_port}")
        readiness = (c.get("readinessProbe") or {}).get("httpGet", {})
        if readiness.get("path") != "/health":
            problems.append(f"{me}: readiness must probe vLLM's /health")
    return problems


def check_router(docs: list[Doc]) -> list[str]:
    """The router's --k8s-selector finds the engine pods (and nothing else) in its namespace."""
    problems = []
    for w in of_kind(docs, *WORKLOAD_KINDS):
        if pod_labels(w).get("app.kubernetes.io/component") != "router":
            continue
        c = pod_spec(w)["containers"][0]
        sel = flag(c.get("args", []), "--k8s-selector")
        if not sel:
            problems.append(f"{ident(w)}: no --k8s-selector")
            continue
        try:
            reqs = parse_selector(sel)
        except ValueError as e:
            problems.append(f"{ident(w)}: --k8s-selector: {e}")
            continue
        chosen = selected_workloads(docs, reqs, ns_of(w))
        if not chosen:
            problems.append(f"{ident(w)}: --k8s-selector {sel!r} selects no engine pods")
        for x in chosen:
            if pod_labels(x).get("app.kubernetes.io/component") != "engine":
                problems.append(f"{ident(w)}: --k8s-selector also selects {ident(x)}")
        host = flag(c.get("args", []), "--host")
        if host not in ("0.0.0.0", "::"):
            problems.append(f"{ident(w)}: the router must listen on all interfaces (--host=0.0.0.0), got {host!r}")
        k8s_port = flag(c.get("args", []), "--k8s-port") or "8000"
        for x in chosen:
            if not any(str(p["containerPort"]) == k8s_port and p.get("name") == "http" for p in container_ports(x)):
                problems.append(f"{ident(w)}: --k8s-port {k8s_port} is not the http port of {ident(x)}")
    return problems


def _scaler_service(docs: list[Doc], address: str) -> tuple[Doc | None, str]:
    m = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc(?:\.cluster\.local)?:(\d+)", address)
    if not m:
        return None, f"scalerAddress {address!r} is not <service>.<namespace>.svc:<port>"
    svc = find(docs, "Service", m[1], m[2])
    if svc is None:
        return None, f"scalerAddress {address!r}: Service {m[2]}/{m[1]} not rendered"
    port = next((p for p in svc["spec"]["ports"] if p["port"] == int(m[3])), None)
    if port is None or port.get("name") != "grpc":
        return None, f"scalerAddress {address!r}: Service {m[1]} has no grpc port {m[3]}"
    return svc, ""


def check_scaledobjects(docs: list[Doc]) -> list[str]:
    problems = []
    for so in of_kind(docs, "ScaledObject"):
        me, ns, spec = ident(so), ns_of(so), so["spec"]
        ref = spec["scaleTargetRef"]
        target = find(docs, ref.get("kind", "Deployment"), ref["name"], ns)
        if target is None:
            problems.append(f"{me}: scaleTargetRef {ref.get('kind', 'Deployment')} {ref['name']} not rendered")
        lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if lo > hi:
            problems.append(f"{me}: minReplicaCount {lo} > maxReplicaCount {hi}")
        if "idleReplicaCount" in spec and spec["idleReplicaCount"] >= lo:
            problems.append(f"{me}: idleReplicaCount must be below minReplicaCount")
        fallback = spec.get("fallback")
        if fallback and not lo <= fallback["replicas"] <= hi:
            problems.append(f"{me}: fallback.replicas {fallback['replicas']} outside [{lo}, {hi}]")
        for trig in spec["triggers"]:
            md = trig["metadata"]
            if fallback and trig.get("metricType", "AverageValue") != "AverageValue":
                problems.append(f"{me}: fallback only works with metricType AverageValue")
            if trig["type"] != "external":
                continue
            svc, err = _scaler_service(docs, md.get("scalerAddress", ""))
            if err:
                problems.append(f"{me}: {err}")
            auth = trig.get("authenticationRef")
            if auth is None:
                problems.append(f"{me}: the external trigger has no authenticationRef (TLS to the scaler)")
            elif find(docs, auth.get("kind", "TriggerAuthentication"), auth["name"], ns) is None:
                problems.append(f"{me}: authenticationRef {auth['name']} not rendered")
            if md.get("podNamespace", ns) != ns:
                problems.append(f"{me}: podNamespace {md.get('podNamespace')!r} is not the ScaledObject's {ns!r}")
            s2z = md.get("scaleToZero", "false").lower() == "true"
            if s2z != (lo == 0 or spec.get("idleReplicaCount") == 0):
                problems.append(f"{me}: scaleToZero={md.get('scaleToZero')} disagrees with minReplicaCount {lo}")
            if target is None:
                continue
            labels = pod_labels(target)
            pool, role = md.get("pool"), labels.get("kvscale.io/role")
            if POOL_ROLE.get(pool or "") != role:
                problems.append(f"{me}: pool {pool!r} but the target's pods have role {role!r}")
            try:
                reqs = parse_selector(md.get("podSelector", ""))
                chosen = selected_workloads(docs, reqs, ns)
                if chosen != [target]:
                    problems.append(f"{me}: podSelector selects {[ident(x) for x in chosen]}, expected only the target")
            except ValueError as e:
                problems.append(f"{me}: podSelector: {e}")
            try:
                c = engine_container(target)
            except (StopIteration, KeyError):
                problems.append(f"{me}: target {ident(target)} has no vllm container")
                continue
            args = c.get("args", [])
            served = flag(args, "--served-model-name") or flag(args, "--model")
            if md.get("model") != served:
                problems.append(f"{me}: model {md.get('model')!r} is not the served model {served!r}")
            if md.get("metricsPort") and not any(str(p["containerPort"]) == md["metricsPort"] for p in c["ports"]):
                problems.append(f"{me}: metricsPort {md['metricsPort']} is not a port of the target's pods")
            seqs = flag(args, "--max-num-seqs")
            if md.get("maxNumSeqs") != seqs:
                problems.append(f"{me}: maxNumSeqs {md.get('maxNumSeqs')!r} differs from --max-num-seqs {seqs!r}")
            if svc is not None:
                problems += [f"{me}: {p}" for p in _latency_model_mount(docs, svc, md.get("latencyModel", ""))[1]]
    return problems


def scaler_workload(docs: list[Doc], service: Doc) -> Doc | None:
    chosen = selected_workloads(docs, selector_from_object({"matchLabels": service["spec"]["selector"]}),
                                ns_of(service))  # fmt: skip
    return chosen[0] if chosen else None


def _latency_model_mount(docs: list[Doc], service: Doc, path: str) -> tuple[tuple[Doc, str] | None, list[str]]:
    """The ConfigMap and key that the scaler pod sees at ``path`` (when it is a file path, not a built-in name)."""
    if not path.startswith("/"):
        return None, []
    w = scaler_workload(docs, service)
    if w is None:
        return None, [f"no scaler pods behind Service {ident(service)}"]
    volumes = {v["name"]: v for v in pod_spec(w).get("volumes", [])}
    for c in pod_spec(w)["containers"]:
        for m in c.get("volumeMounts", []):
            mount = m["mountPath"].rstrip("/")
            if not path.startswith(mount + "/"):
                continue
            vol = volumes.get(m["name"], {})
            if "configMap" not in vol:
                return None, [f"latencyModel {path}: mounted from a volume that is not a ConfigMap"]
            key = path[len(mount) + 1 :]
            cm = find(docs, "ConfigMap", vol["configMap"]["name"], ns_of(w))
            if cm is None or key not in (cm.get("data") or {}):
                return None, [f"latencyModel {path}: ConfigMap {vol['configMap']['name']} has no key {key}"]
            return (cm, key), []
    return None, [f"latencyModel {path} is not under any volumeMount of the scaler pods"]


def materialize_latency_models(docs: list[Doc], md: dict[str, str], root: Path) -> dict[str, str]:
    """Trigger metadata with ``latencyModel`` pointing at a local copy of the ConfigMap the scaler pod mounts."""
    svc, _ = _scaler_service(docs, md.get("scalerAddress", ""))
    if svc is None:
        return md
    found, _ = _latency_model_mount(docs, svc, md.get("latencyModel", ""))
    if found is None:
        return md
    cm, key = found
    local = root / cm["metadata"]["name"] / key
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text(cm["data"][key])
    return {**md, "latencyModel": str(local)}


def check_scaler_metadata(docs: list[Doc], parse: Callable[[dict[str, str], str], Any] | None = None) -> list[str]:
    """Run every external trigger's metadata through the scaler's own parser, exactly as KEDA passes it.

    KEDA hands the scaler the *whole* trigger ``metadata`` map (``scalerAddress`` included) as
    ``ScaledObjectRef.scalerMetadata``; the latency-model path is resolved against the ConfigMap the scaler mounts.
    """
    if parse is None:
        try:
            from scaler.metadata import parse_scaler_metadata as parse
        except ImportError as e:
            return [f"cannot import scaler.metadata ({e}); install kvscale to run the scaler's own validation"]
    problems = []
    with tempfile.TemporaryDirectory(prefix="kvscale-deploy-") as tmp:
        for so in of_kind(docs, "ScaledObject"):
            for trig in so["spec"]["triggers"]:
                if trig["type"] != "external":
                    continue
                md = materialize_latency_models(docs, dict(trig["metadata"]), Path(tmp))
                try:
                    parse(md, ns_of(so) or "default")
                except ValueError as e:
                    problems.append(f"{ident(so)}: trigger {trig.get('name', '')}: the scaler rejects it: {e}")
    return problems


def _expand(arg: str, container: Doc, namespace: str | None) -> str:
    """Kubernetes' ``$(VAR)`` expansion in args, for the env vars this deployment uses."""
    values = {}
    for e in container.get("env", []):
        if "value" in e:
            values[e["name"]] = e["value"]
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            values[e["name"]] = namespace or "default"
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: values.get(m[1], m[0]), arg)


def check_kvscale_args(docs: list[Doc]) -> list[str]:
    """Parse every ``kvscale ...`` container's args with the real ``kvscale`` CLI parser.

    The router's configuration is also built and validated (``router.cli.build_config``), with its API-key file
    replaced by a local one the way the Secret is mounted.
    """
    import contextlib
    import io

    try:
        from kvscale.cli import build_parser
    except ImportError as e:
        return [f"cannot import kvscale.cli ({e}); install kvscale to check the kvscale containers' flags"]
    problems = []
    for w in of_kind(docs, *WORKLOAD_KINDS):
        for c in pod_spec(w)["containers"]:
            if c.get("command", [None])[0] != "kvscale":
                continue
            argv = [_expand(a, c, ns_of(w)) for a in [*c["command"][1:], *c.get("args", [])]]
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    ns = build_parser(argv[0] if argv else None).parse_args(argv)
            except SystemExit:
                problems.append(f"{ident(w)}: kvscale rejects its args: {err.getvalue().strip().splitlines()[-1:]}")
                continue
            if argv[:2] == ["router", "serve"]:
                problems += _check_router_config(docs, w, c, ns)
    return problems


def _check_router_config(docs: list[Doc], w: Doc, c: Doc, ns: argparse.Namespace) -> list[str]:
    from router.cli import build_config

    key_file = getattr(ns, "api_key_file", None)
    if not key_file:
        return [f"{ident(w)}: the router has no --api-key-file (it would accept unauthenticated requests)"]
    mounts = [m for m in c.get("volumeMounts", []) if key_file.startswith(m["mountPath"].rstrip("/") + "/")]
    if not mounts:
        return [f"{ident(w)}: --api-key-file {key_file} is not under a volumeMount"]
    with tempfile.TemporaryDirectory(prefix="kvscale-deploy-") as tmp:
        local = Path(tmp) / "api-keys"
        local.write_text("# stand-in for the operator's Secret\nsk-example-key\n")
        ns.api_key_file = str(local)
        try:
            config = build_config(ns)
            config.validate()
        except (ValueError, OSError) as e:
            return [f"{ident(w)}: the router rejects its configuration: {e}"]
    if not config.api_keys:
        return [f"{ident(w)}: the router loaded no API keys"]
    return []


def check_vllm_args(docs: list[Doc]) -> list[str]:
    """Parse every engine's ``vllm serve`` args with the installed vLLM's own parser (slow: imports vLLM).

    The parser builds vLLM's typed configs from the JSON flags (``KVEventsConfig``, ``KVTransferConfig``), so a
    misspelled field or a bad value fails here as it would in the pod. The installed vLLM should be the image's
    version (see docs/deploy.md).
    """
    import contextlib
    import io

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    problems = []
    for w in engine_workloads(docs):
        c = engine_container(w)
        argv = [*c.get("command", [])[1:], *c.get("args", [])]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                ns = parser.parse_args(argv)
            validate_parsed_serve_args(ns)
            engine_args = AsyncEngineArgs.from_cli_args(ns)
        except SystemExit:
            problems.append(f"{ident(w)}: vllm rejects its args: {err.getvalue().strip().splitlines()[-3:]}")
            continue
        except (TypeError, ValueError) as e:
            problems.append(f"{ident(w)}: vllm rejects its args: {e}")
            continue
        if not engine_args.enable_prefix_caching:
            problems.append(f"{ident(w)}: prefix caching is off")
        events = engine_args.kv_events_config
        if events is None or not events.enable_kv_cache_events or events.publisher != "zmq":
            problems.append(f"{ident(w)}: vLLM would not publish KV events over ZMQ: {events}")
    return problems


def check(docs: list[Doc], *, schemas: bool = True, kvscale: bool = True) -> list[str]:
    """Every check above but vLLM's parser; an empty list means the manifests are consistent.

    ``kvscale=False`` skips the checks that need the kvscale package (the CLI parsers and the scaler's metadata
    validation).
    """
    problems: list[str] = []
    if schemas:
        problems += check_schemas(docs)
    for fn in (check_labels, check_workloads, check_services, check_rbac, check_trigger_auth, check_engines,
               check_router, check_scaledobjects):  # fmt: skip
        problems += fn(docs)
    if kvscale:
        problems += check_kvscale_args(docs)
        problems += check_scaler_metadata(docs)
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="a kustomization directory, e.g. deploy/overlays/pd")
    ap.add_argument("--check", action="store_true", help="run the checks instead of printing the YAML")
    ap.add_argument(
        "--no-kvscale",
        action="store_true",
        help="skip the checks that import kvscale (CLI flags, the scaler's metadata validation)",
    )
    ap.add_argument("--vllm", action="store_true", help="also parse the engines' args with the installed vLLM")
    args = ap.parse_args(argv)
    try:
        if not args.check:
            sys.stdout.write(render_text(args.path))
            return 0
        docs = render(args.path)
    except RenderError as e:
        print(f"render.py: {e}", file=sys.stderr)
        return 2
    problems = check(docs, kvscale=not args.no_kvscale)
    if args.vllm:
        problems += check_vllm_args(docs)
    for p in problems:
        print(f"PROBLEM {p}")
    kinds = sorted({d["kind"] for d in docs})
    print(f"{args.path}: {len(docs)} objects ({', '.join(kinds)}): {len(problems)} problem(s)")
    needed = sorted({n for n in OPERATOR_SECRETS if _references_secret(docs, n)})
    if needed:
        print("Secrets to create before applying: " + ", ".join(f"{n} ({OPERATOR_SECRETS[n]})" for n in needed))
    return 1 if problems else 0


def _references_secret(docs: list[Doc], name: str) -> bool:
    rendered = any(d["metadata"].get("name") == name for d in of_kind(docs, "Secret"))
    return not rendered and f'"{name}"' in json.dumps(docs)


if __name__ == "__main__":
    sys.exit(main())
