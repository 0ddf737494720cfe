"""Checks of kvscale's own wiring: the engines, the router, the ScaledObjects, and the kvscale and vLLM CLIs.

* engines: role labels, ``--kv-events-config`` / ``--kv-transfer-config`` (P/D over NIXL), the served model name,
  ports and probes;
* the router's ``--k8s-selector`` finds the engine pods and nothing else;
* every ScaledObject against its target (pool vs role, podSelector, model, port, ``maxNumSeqs``, scaler address and
  namespace, the mounted latency model, replica bounds and fallback);
* the scaler's own validation of each trigger's metadata (``scaler.metadata.parse_scaler_metadata``), and the
  ``kvscale ...`` containers' args through the real ``kvscale`` parser (the router's configuration through
  ``router.cli``), when the kvscale package is importable;
* optionally (:func:`check_vllm_args`, slow) the engines' args through the installed vLLM's own parser.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deploy.objects import (
    WORKLOAD_KINDS,
    Doc,
    container_ports,
    find,
    flag,
    ident,
    ns_of,
    of_kind,
    pod_labels,
    pod_spec,
    selected_workloads,
    selector_from_object,
)
from kvscale.labels import parse_selector

ROLES = ("prefill", "decode", "both")
POOL_ROLE = {"prefill": "prefill", "decode": "decode", "aggregated": "both"}


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
