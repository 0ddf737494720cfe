"""`kvscale router serve` (registered by kvscale.cli). Every flag has an env equivalent ``KVSCALE_ROUTER_<FLAG>``
(upper case, dashes → underscores; ``--backend`` takes a space-separated list in ``KVSCALE_ROUTER_BACKENDS``)."""

from __future__ import annotations

import argparse
import os
import sys


def _env(flag: str, default=None, cast=str):
    raw = os.environ.get("KVSCALE_ROUTER_" + flag.upper().replace("-", "_"))
    return default if raw is None or raw == "" else cast(raw)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--host", default=_env("host", "0.0.0.0"))
    a("--port", type=int, default=_env("port", 8080, int))
    g = p.add_argument_group("discovery")
    g.add_argument("--backend", action="append", default=None, metavar="URL[,role=..,model=..,KEY=VALUE]",
                   help="a static backend (repeatable); env KVSCALE_ROUTER_BACKENDS (space-separated)")
    g.add_argument("--k8s-selector", default=_env("k8s-selector"), help="pod label selector (Kubernetes discovery)")
    g.add_argument("--namespace", default=_env("namespace", "default"))
    g.add_argument("--k8s-port", type=int, default=_env("k8s-port", 8000, int), help="engine port on each pod")
    g.add_argument("--k8s-relist-s", type=float, default=_env("k8s-relist-s", 30.0, float),
                   help="full pod relist period (repairs missed watch events)")
    g = p.add_argument_group("policy")
    g.add_argument("--policy", default=_env("policy", "least-request"),
                   help="round-robin, random, least-request, least-kv, power-of-two, prefix, kv-events, slo, best, "
                        "length-buckets, session-affinity, lora-affinity, or one from --policy-config")
    g.add_argument("--policy-config", default=_env("policy-config"), help='JSON file {"policies": {NAME: spec}}')
    g.add_argument("--prefix-index-capacity", type=int, default=_env("prefix-index-capacity", 200_000, int))
    g = p.add_argument_group("backend state")
    g.add_argument("--scrape-interval-s", type=float, default=_env("scrape-interval-s", 0.2, float))
    g.add_argument("--scrape-timeout-s", type=float, default=_env("scrape-timeout-s", 1.0, float))
    g.add_argument("--health-interval-s", type=float, default=_env("health-interval-s", 2.0, float))
    g.add_argument("--health-timeout-s", type=float, default=_env("health-timeout-s", 1.0, float))
    g.add_argument("--health-failure-threshold", type=int, default=_env("health-failure-threshold", 2, int))
    g.add_argument("--eject-failures", type=int, default=_env("eject-failures", 3, int),
                   help="consecutive failures that eject a backend")
    g.add_argument("--eject-base-s", type=float, default=_env("eject-base-s", 1.0, float))
    g.add_argument("--eject-max-s", type=float, default=_env("eject-max-s", 60.0, float))
    g.add_argument("--max-ejection-percent", type=float, default=_env("max-ejection-percent", 10.0, float),
                   help="most of the pool ejected at once (at least one backend may always be), as Envoy's")
    g = p.add_argument_group("proxy")
    g.add_argument("--max-attempts", type=int, default=_env("max-attempts", 3, int))
    g.add_argument("--retry-backoff-s", type=float, default=_env("retry-backoff-s", 0.02, float))
    g.add_argument("--retry-backoff-max-s", type=float, default=_env("retry-backoff-max-s", 0.5, float))
    g.add_argument("--connect-timeout-s", type=float, default=_env("connect-timeout-s", 5.0, float))
    g.add_argument("--read-timeout-s", type=float, default=_env("read-timeout-s", 300.0, float),
                   help="max silence between upstream chunks")
    g.add_argument("--request-timeout-s", type=float, default=_env("request-timeout-s", 0.0, float),
                   help="total time per attempt (0 = none)")
    g.add_argument("--first-byte-timeout-s", type=float, default=_env("first-byte-timeout-s", 120.0, float),
                   help="streamed requests: max time to the first chunk, then retried elsewhere (0 = none)")
    g.add_argument("--stream-idle-timeout-s", type=float, default=_env("stream-idle-timeout-s", 60.0, float),
                   help="started streams: max silence between chunks, then an SSE error event (0 = none)")
    g.add_argument("--header-timeout-s", type=float, default=_env("header-timeout-s", 10.0, float),
                   help="clients: max time to send a complete request head (0 = none)")
    g = p.add_argument_group("limits and security")
    g.add_argument("--max-concurrency", type=int, default=_env("max-concurrency", 4096, int))
    g.add_argument("--max-queue", type=int, default=_env("max-queue", 1024, int))
    g.add_argument("--queue-timeout-s", type=float, default=_env("queue-timeout-s", 10.0, float))
    g.add_argument("--max-body-bytes", type=int, default=_env("max-body-bytes", 4 * 1024 * 1024, int))
    g.add_argument("--api-key-file", default=_env("api-key-file"),
                   help="file of API keys, one per line (also env KVSCALE_ROUTER_API_KEYS, comma-separated)")
    g.add_argument("--governance-log", default=_env("governance-log", "-"),
                   help="JSON request log: '-' = stderr, a file path, or 'off'")
    g.add_argument("--log-level", default=_env("log-level", "warning"))
    g.add_argument("--seed", type=int, default=_env("seed", None, int), help="seed the policies' RNG")


def build_config(args: argparse.Namespace):
    from router.backends import EjectionPolicy, parse_backend_spec
    from router.config import RouterConfig
    from router.security import load_api_keys

    backends = args.backend if args.backend is not None else _env("backends", "").split()
    return RouterConfig(
        host=args.host,
        port=args.port,
        backends=[parse_backend_spec(b) for b in backends],
        k8s_selector=args.k8s_selector,
        k8s_namespace=args.namespace,
        k8s_port=args.k8s_port,
        k8s_relist_s=args.k8s_relist_s,
        policy=args.policy,
        policy_config=args.policy_config,
        prefix_index_capacity=args.prefix_index_capacity,
        scrape_interval_s=args.scrape_interval_s,
        scrape_timeout_s=args.scrape_timeout_s,
        health_interval_s=args.health_interval_s,
        health_timeout_s=args.health_timeout_s,
        health_failure_threshold=args.health_failure_threshold,
        ejection=EjectionPolicy(args.eject_failures, args.eject_base_s, args.eject_max_s, args.max_ejection_percent),
        max_attempts=args.max_attempts,
        retry_backoff_s=args.retry_backoff_s,
        retry_backoff_max_s=args.retry_backoff_max_s,
        connect_timeout_s=args.connect_timeout_s,
        read_timeout_s=args.read_timeout_s,
        request_timeout_s=args.request_timeout_s,
        first_byte_timeout_s=args.first_byte_timeout_s,
        stream_idle_timeout_s=args.stream_idle_timeout_s,
        header_timeout_s=args.header_timeout_s,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        queue_timeout_s=args.queue_timeout_s,
        max_body_bytes=args.max_body_bytes,
        api_keys=load_api_keys(args.api_key_file),
        governance_log=None if args.governance_log in ("", "off", "none") else args.governance_log,
    )


def serve_main(args: argparse.Namespace) -> int:
    import logging
    import random

    from router.app import create_app
    from router.policies import PluginConfigError
    from router.runner import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = build_config(args)
        app = create_app(config, rng=random.Random(args.seed))
    except (ValueError, OSError, PluginConfigError) as exc:
        print(f"kvscale router serve: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    except ImportError:
        pass
    print(f"kvscale router: http://{config.host}:{config.port} policy={config.policy} "
          f"backends={[b.url for b in config.backends] or config.k8s_selector}", flush=True)  # fmt: skip
    serve(app, config.host, config.port, header_timeout_s=config.header_timeout_s)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this part's commands to the top-level parser."""
    router = sub.add_parser("router", help="the OpenAI-compatible, load- and prefix-aware router")
    rsub = router.add_subparsers(dest="router_command", required=True)
    serve = rsub.add_parser("serve", help="serve the router", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_serve_args(serve)
    serve.set_defaults(func=serve_main)
