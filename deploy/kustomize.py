"""Rendering deploy/'s kustomizations: ``kubectl kustomize`` (or a standalone ``kustomize build``), nothing more.

This does not re-implement kustomize: it finds a kustomize v5+, runs it, and parses the YAML it prints.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


class RenderError(RuntimeError):
    """The manifests could not be rendered (no kustomize, or kustomize rejected them)."""


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


def render(path: str | Path) -> list[dict[str, Any]]:
    """Rendered objects of one kustomization directory, in kustomize's order."""
    return [d for d in yaml.safe_load_all(render_text(path)) if d]
