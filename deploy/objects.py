"""Reading rendered Kubernetes objects: names, namespaces, pod templates, container args, label selectors.

The vocabulary the checks (``deploy.k8s_checks``, ``deploy.kvscale_checks``) are written in. An object is the
plain ``dict`` that YAML parsing gives (:data:`Doc`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from kvscale.labels import matches

Doc = dict[str, Any]
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")


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
