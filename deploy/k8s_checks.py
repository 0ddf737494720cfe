"""Checks any Kubernetes deployment needs: schemas, labels, and the wiring nothing rejects until traffic fails.

* schemas: built-in kinds against Kubernetes' OpenAPI schemas (``kubernetes-validate``, strict, oldest and newest
  supported versions); KEDA and Prometheus Operator kinds against the JSON schemas in ``deploy/schemas/``;
* wiring: Deployment / Service / PDB / NetworkPolicy selectors select pods, Service and probe ports exist,
  ConfigMaps / Secrets / ServiceAccounts / PriorityClasses / Roles that are referenced exist (Secrets the operator
  creates are listed in :data:`OPERATOR_SECRETS`), GPU pods tolerate the GPU taint.

Each ``check_*`` takes the rendered objects and returns the problems it found, one line each.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from deploy.objects import (
    WORKLOAD_KINDS,
    Doc,
    container_ports,
    containers,
    find,
    ident,
    ns_of,
    of_kind,
    pod_labels,
    pod_spec,
    selected_workloads,
    selector_from_object,
)
from kvscale.labels import label_key_ok, label_value_ok, matches

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
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
GPU_RESOURCE = "nvidia.com/gpu"


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
