"""Shared by every test directory: the repository root is importable, and deploy/'s renderer is a fixture.

``deploy`` is a package of the source tree, not of the installed kvscale (pyproject lists the installed ones), so
the root must be on ``sys.path``. ``python -m pytest`` from the root puts it there; this makes the other ways of
starting pytest (the ``pytest`` script, another working directory) import the same ``deploy``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def kustomize_render() -> Callable[[str | Path], list[dict[str, Any]]]:
    """``deploy.kustomize.render``: the objects of one kustomization directory, rendered by kustomize v5+.

    Fails the test with what to install when there is no kustomize v5+ (``kubectl`` >= 1.27 or ``kustomize``).
    """
    from deploy.kustomize import RenderError, kustomize_command, render

    try:
        kustomize_command()
    except RenderError as e:
        pytest.fail(str(e))
    return render
