"""`kvscale scaler serve` (registered by kvscale.cli; `kvscale eval scaling` is scaler.evaluate.cli's)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"KVSCALE_SCALER_{name}", default)


def _non_negative_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {n}")
    return n


def serve_main(args: argparse.Namespace) -> int:
    import asyncio

    from scaler.app import ScalerApp, TLSFiles
    from scaler.service import ScalerService, ServeOptions

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tls = None
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        if not (args.tls_cert and args.tls_key):
            print("kvscale scaler serve: --tls-cert and --tls-key go together (--tls-client-ca needs both)",
                  file=sys.stderr)  # fmt: skip
            return 2
        paths = [Path(p) for p in (args.tls_cert, args.tls_key, args.tls_client_ca) if p]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            print(f"kvscale scaler serve: TLS file(s) not found: {', '.join(missing)}", file=sys.stderr)
            return 2
        client_ca = Path(args.tls_client_ca) if args.tls_client_ca else None
        tls = TLSFiles(Path(args.tls_cert), Path(args.tls_key), client_ca)
    kube = None
    if args.kube_api_server:
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = args.kube_api_server
        kube = client.ApiClient(cfg)
    options = ServeOptions(expire_after_s=args.expire_after, parse_workers=args.parse_workers)
    service = ScalerService(kube_api_client=kube, options=options)
    app = ScalerApp(
        service, host=args.host, grpc_port=args.port, metrics_port=args.metrics_port, tls=tls, grace_s=args.grace
    )
    try:
        import uvloop  # type: ignore[import-not-found]

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    try:
        asyncio.run(app.run_forever())
    except OSError as e:  # e.g. the gRPC or metrics port is taken
        print(f"kvscale scaler serve: {e}", file=sys.stderr)
        return 2
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``kvscale scaler serve``."""
    scaler = sub.add_parser("scaler", help="the KEDA external scaler")
    ssub = scaler.add_subparsers(dest="scaler_command", required=True)
    serve = ssub.add_parser("serve", help="serve KEDA's ExternalScaler gRPC API and /metrics",
                            description="Env: KVSCALE_SCALER_<FLAG> (e.g. KVSCALE_SCALER_PORT).")  # fmt: skip
    serve.add_argument("--host", default=_env("HOST", "0.0.0.0"))
    serve.add_argument("--port", type=int, default=int(_env("PORT", "6000") or 6000), help="gRPC port")
    serve.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", "8080") or 8080),
                       help="HTTP port of /metrics and /healthz")  # fmt: skip
    serve.add_argument("--tls-cert", default=_env("TLS_CERT"), help="server certificate (PEM)")
    serve.add_argument("--tls-key", default=_env("TLS_KEY"), help="server private key (PEM)")
    serve.add_argument("--tls-client-ca", default=_env("TLS_CLIENT_CA"),
                       help="CA of client certificates: require mTLS (KEDA's tlsClientCert/tlsClientKey)")  # fmt: skip
    serve.add_argument("--kube-api-server", default=_env("KUBE_API_SERVER"),
                       help="Kubernetes API URL for discovery (default: in-cluster, else kubeconfig)")  # fmt: skip
    serve.add_argument("--expire-after", type=float, default=float(_env("EXPIRE_AFTER", "900") or 900),
                       help="stop tracking a ScaledObject after this many seconds without a call")  # fmt: skip
    serve.add_argument("--parse-workers", type=_non_negative_int, default=_env("PARSE_WORKERS", "1"),
                       help="processes that parse pods' metrics pages, off the gRPC event loop (0: on it)")  # fmt: skip
    serve.add_argument("--grace", type=float, default=5.0, help="graceful-shutdown time for in-flight RPCs (s)")
    serve.add_argument("--log-level", default=_env("LOG_LEVEL", "info"))
    serve.set_defaults(func=serve_main)
