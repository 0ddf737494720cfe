"""deploy/tls/make-certs.sh → Secrets → the real scaler serving mTLS → a client configured the way KEDA is.

The scaler is started with the exact args of the rendered scaler Deployment (the Secret's files put where the
Deployment mounts them, ports made free), and the client gets its CA / certificate / key from the Secret the
TriggerAuthentication names, and verifies the server under the host name of the ScaledObject's ``scalerAddress``:
what KEDA's operator does (``caCert``, ``tlsClientCert``, ``tlsClientKey`` → ``credentials.NewTLS``).
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy import k8s_checks, objects
from harness.procs import ManagedProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCRIPT = DEPLOY / "tls" / "make-certs.sh"



def _make_certs(out: Path, namespace: str = "kvscale") -> list[dict]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed; deploy/tls/make-certs.sh needs it")
    proc = subprocess.run(["bash", str(SCRIPT), "--namespace", namespace, "--out", str(out)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [d for d in yaml.safe_load_all((out / "secrets.yaml").read_text()) if d]


def _secret_file(secrets: list[dict], name: str, key: str) -> bytes:
    secret = next(s for s in secrets if s["metadata"]["name"] == name)
    return base64.b64decode(secret["data"][key])


@pytest.fixture(scope="module")
def pd(kustomize_render: Callable[[Path], list[dict]]) -> list[dict]:
    return kustomize_render(DEPLOY / "overlays" / "pd")


def test_secrets_match_what_the_manifests_reference(tmp_path: Path, pd: list[dict]) -> None:
    secrets = _make_certs(tmp_path / "tls")
    for s in secrets:
        s["metadata"].pop("creationTimestamp", None)  # kubectl's dry-run output carries a null timestamp
    assert k8s_checks.check_schemas(secrets) == []
    assert {s["metadata"]["name"] for s in secrets} == {"kvscale-scaler-tls", "kvscale-keda-client-tls"}
    assert all(s["metadata"]["namespace"] == "kvscale" for s in secrets)
    # The TriggerAuthentication's keys exist in the Secret it names.
    ta = next(d for d in pd if d["kind"] == "TriggerAuthentication")
    params = {r["parameter"]: r for r in ta["spec"]["secretTargetRef"]}
    assert set(params) == {"caCert", "tlsClientCert", "tlsClientKey"}
    for r in params.values():
        assert _secret_file(secrets, r["name"], r["key"])
    # The scaler's --tls-* files are keys of the Secret mounted where those paths point.
    scaler = next(d for d in pd if d["kind"] == "Deployment" and d["metadata"]["name"] == "kvscale-scaler")
    spec = scaler["spec"]["template"]["spec"]
    c = spec["containers"][0]
    vols = {v["name"]: v for v in spec["volumes"]}
    for flag in ("--tls-cert", "--tls-key", "--tls-client-ca"):
        path = objects.flag(c["args"], flag)
        mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        secret_name = vols[mount["name"]]["secret"]["secretName"]
        assert _secret_file(secrets, secret_name, path[len(mount["mountPath"]) + 1 :])


def test_make_certs_rejects_bad_input(tmp_path: Path) -> None:
    bad = subprocess.run(["bash", str(SCRIPT), "--namespace", "Team_A", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    assert bad.returncode == 2 and "namespace" in bad.stderr
    bad = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


def _health(port: int, host_name: str, root: bytes, key: bytes | None, chain: bytes | None) -> int:
    creds = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)
    options = [("grpc.ssl_target_name_override", host_name)]
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def test_scaler_serves_mtls_to_a_keda_like_client(tmp_path: Path, pd: list[dict]) -> None:
    secrets = _make_certs(tmp_path / "tls")
    other_ca = _make_certs(tmp_path / "other")  # an unrelated CA
    scaler = next(d for d in pd if d["kind"] == "Deployment" and d["metadata"]["name"] == "kvscale-scaler")
    spec = scaler["spec"]["template"]["spec"]
    c = spec["containers"][0]
    # Put the Secret's files where the Deployment mounts them (under tmp_path instead of /).
    vols = {v["name"]: v for v in spec["volumes"]}
    for m in c["volumeMounts"]:
        if "secret" in vols[m["name"]]:
            target = tmp_path / m["mountPath"].lstrip("/")
            target.mkdir(parents=True)
            secret = next(s for s in secrets if s["metadata"]["name"] == vols[m["name"]]["secret"]["secretName"])
            for key, value in secret["data"].items():
                (target / key).write_bytes(base64.b64decode(value))
    grpc_port, metrics_port = free_port(), free_port()
    args = []
    for a in c["args"]:
        name, _, value = a.partition("=")
        if name == "--port":
            a = f"--port={grpc_port}"
        elif name == "--metrics-port":
            a = f"--metrics-port={metrics_port}"
        elif value.startswith("/etc/"):
            a = f"{name}={tmp_path / value.lstrip('/')}"
        args.append(a)
    kvscale = Path(sys.executable).with_name("kvscale")
    cmd = [str(kvscale) if kvscale.exists() else c["command"][0], *args, "--host=127.0.0.1"]

    ta = next(d for d in pd if d["kind"] == "TriggerAuthentication")
    auth = {r["parameter"]: _secret_file(secrets, r["name"], r["key"]) for r in ta["spec"]["secretTargetRef"]}
    so = next(d for d in pd if d["kind"] == "ScaledObject")
    host = so["spec"]["triggers"][0]["metadata"]["scalerAddress"].rsplit(":", 1)[0]
    assert host == "kvscale-scaler.kvscale.svc"
    serving = health_pb2.HealthCheckResponse.SERVING
    with ManagedProcess(cmd, log_path=tmp_path / "scaler.log", name="kvscale-scaler") as proc:
        # The readiness probe's path on the metrics port.
        probe = c["readinessProbe"]["httpGet"]["path"]
        proc.wait_http_ready(f"http://127.0.0.1:{metrics_port}{probe}", timeout=60)
        assert _health(grpc_port, host, auth["caCert"], auth["tlsClientKey"], auth["tlsClientCert"]) == serving
        # Every other spelling of the Service name in the certificate works too.
        assert _health(grpc_port, f"{host}.cluster.local", auth["caCert"], auth["tlsClientKey"],
                       auth["tlsClientCert"]) == serving  # fmt: skip
        failures = {
            "no client certificate": (host, auth["caCert"], None, None),
            "client certificate from another CA": (
                host, auth["caCert"], _secret_file(other_ca, "kvscale-keda-client-tls", "tls.key"),
                _secret_file(other_ca, "kvscale-keda-client-tls", "tls.crt")),
            "server name of another namespace": (
                "kvscale-scaler.team-b.svc", auth["caCert"], auth["tlsClientKey"], auth["tlsClientCert"]),
            "server not signed by the trusted CA": (
                host, _secret_file(other_ca, "kvscale-keda-client-tls", "ca.crt"), auth["tlsClientKey"],
                auth["tlsClientCert"]),
        }  # fmt: skip
        for what, (name, root, key, chain) in failures.items():
            with pytest.raises(grpc.RpcError) as err:
                _health(grpc_port, name, root, key, chain)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, what
        assert proc.is_running()
