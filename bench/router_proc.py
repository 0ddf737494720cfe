"""Run the kvscale router app (``router.app.create_app``) as its own process for the benchmark.

``python -m bench.router_proc CONFIG.json``: the JSON holds ``port``, ``policy``, ``policy_config`` (a
path or null) and ``backends`` (``--backend`` spec strings). The benchmark starts the app this way rather than
through ``kvscale router serve`` so that it depends only on the app factory and RouterConfig.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from router.runner import serve


def main(argv: list[str]) -> int:
    from router.app import create_app
    from router.backends import parse_backend_spec
    from router.config import RouterConfig

    spec = json.loads(Path(argv[0]).read_text())
    config = RouterConfig(
        host="127.0.0.1",
        port=int(spec["port"]),
        backends=[parse_backend_spec(b) for b in spec["backends"]],
        policy=spec["policy"],
        policy_config=spec.get("policy_config"),
        governance_log=None,
        **spec.get("extra", {}),
    )
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    serve(create_app(config), config.host, config.port, header_timeout_s=config.header_timeout_s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
