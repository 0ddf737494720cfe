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

The pieces: ``deploy.kustomize`` renders, ``deploy.k8s_checks`` holds the generic Kubernetes checks,
``deploy.kvscale_checks`` kvscale's own, ``deploy.objects`` the accessors they share; this file is the command
and :func:`check`, which runs them all. It runs as a script (``python deploy/render.py``) and imports as
``deploy.render`` (from the repository root).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # `python deploy/render.py`: Python put deploy/ first on sys.path; the repository root instead, for `deploy.*`.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from deploy.k8s_checks import (
    OPERATOR_SECRETS,
    check_labels,
    check_rbac,
    check_schemas,
    check_services,
    check_trigger_auth,
    check_workloads,
)
from deploy.kustomize import RenderError, render, render_text
from deploy.kvscale_checks import (
    check_engines,
    check_kvscale_args,
    check_router,
    check_scaledobjects,
    check_scaler_metadata,
    check_vllm_args,
)
from deploy.objects import Doc, of_kind


def check(docs: list[Doc], *, schemas: bool = True, kvscale: bool = True) -> list[str]:
    """Every check listed in the module docstring but vLLM's parser; an empty list means the manifests are consistent.

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
