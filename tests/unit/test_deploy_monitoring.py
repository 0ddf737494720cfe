"""deploy/monitoring: PodMonitor / ServiceMonitors, the plain Prometheus scrape config, the Grafana dashboard.

Real parts: ``kubectl kustomize`` renders, ``promtool`` parses the scrape config and every dashboard query, a real
Prometheus applies the scrape config's relabeling to targets shaped like Kubernetes pod discovery, and the metric
names are checked against the router's and scaler's own registries and the installed vLLM's source.

Debian's Prometheus is built without Kubernetes service discovery, so the relabeling test hands Prometheus the
same ``__meta_kubernetes_*`` labels through ``file_sd_configs`` (one target per container port, as Kubernetes pod
discovery produces them); the ``kubernetes_sd_configs`` blocks themselves are only checked for their documented
fields.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from deploy import k8s_checks, objects
from harness.procs import ManagedProcess, free_port
from kvscale.labels import matches

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MONITORING = DEPLOY / "monitoring"
PROMTOOL = Path("/usr/bin/promtool")
PROMETHEUS = Path("/usr/bin/prometheus")

# The metrics the dashboard must show (issue 7): load, replicas, TTFT/ITL vs SLO, KV usage, prefix hits, decisions.
REQUIRED_METRICS = {
    "kvscale_router_requests_total", "kvscale_router_ttft_seconds_bucket", "kvscale_router_itl_seconds_bucket",
    "kvscale_router_retries_total", "kvscale_router_ejections_total", "kvscale_router_prefix_index_entries",
    "kvscale_router_prefix_hit_rate", "kvscale_scaler_desired_replicas", "kvscale_scaler_arrival_rate",
    "kvscale_scaler_predicted_ttft_seconds", "kvscale_scaler_observed_ttft_seconds",
    "kvscale_scaler_predicted_itl_seconds", "kvscale_scaler_observed_itl_seconds",
    "kvscale_scaler_signal_errors_total", "kvscale_scaler_decision_reason", "vllm:num_requests_running",
    "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_queries_total", "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
}  # fmt: skip
# Grafana variables → values that make the queries plain PromQL.
GRAFANA_VARS = {"$__rate_interval": "1m", "$namespace": "kvscale", "$percentile": "90", "$ttft_slo_ms": "500",
                "$itl_slo_ms": "50"}  # fmt: skip
METRIC_RE = re.compile(r"\b(?:kvscale_(?:router|scaler)_[a-z_]+|vllm:[a-z_:]+)")



@pytest.fixture(scope="module")
def monitoring(kustomize_render: Callable[[Path], list[dict]]) -> list[dict]:
    return kustomize_render(MONITORING)


@pytest.fixture(scope="module")
def pd(kustomize_render: Callable[[Path], list[dict]]) -> list[dict]:
    return kustomize_render(DEPLOY / "overlays" / "pd")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def _exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def _plain(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def test_monitoring_renders_and_validates(monitoring: list[dict]) -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in monitoring)
    assert kinds == [("ConfigMap", "kvscale-grafana-dashboard"), ("PodMonitor", "kvscale-vllm"),
                     ("ServiceMonitor", "kvscale-router"), ("ServiceMonitor", "kvscale-scaler")]  # fmt: skip
    assert k8s_checks.check_schemas(monitoring) == []
    cm = next(d for d in monitoring if d["kind"] == "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["grafana-dashboard.json"]) == json.loads(
        (MONITORING / "grafana-dashboard.json").read_text()
    )


def test_monitors_select_the_deployed_pods_and_ports(monitoring: list[dict], pd: list[dict]) -> None:
    """Monitors and the kvscale objects live in one namespace; their selectors and port names must line up."""
    pm = next(d for d in monitoring if d["kind"] == "PodMonitor")
    assert pm["metadata"]["namespace"] == "kvscale"
    pods = objects.selected_workloads(pd, objects.selector_from_object(pm["spec"]["selector"]), "kvscale")
    assert sorted(w["metadata"]["name"] for w in pods) == ["vllm-decode", "vllm-prefill"]
    for w in pods:
        for ep in pm["spec"]["podMetricsEndpoints"]:
            assert any(p.get("name") == ep["port"] for p in objects.container_ports(w))
    for sm in (d for d in monitoring if d["kind"] == "ServiceMonitor"):
        svcs = [
            s
            for s in pd
            if s["kind"] == "Service"
            and s["metadata"]["namespace"] == sm["metadata"]["namespace"]
            and matches(objects.selector_from_object(sm["spec"]["selector"]), s["metadata"]["labels"])
        ]
        assert [s["metadata"]["name"] for s in svcs] == [sm["metadata"]["name"]]
        for ep in sm["spec"]["endpoints"]:
            assert ep["port"] in {p["name"] for p in svcs[0]["spec"]["ports"]}
    scaler_sm = next(d for d in monitoring if d["metadata"]["name"] == "kvscale-scaler")
    assert scaler_sm["spec"]["endpoints"][0]["honorLabels"] is True  # the scaler's own "namespace" label wins


def test_podmonitor_schema_rejects_a_typo(monitoring: list[dict]) -> None:
    pm = copy.deepcopy(next(d for d in monitoring if d["kind"] == "PodMonitor"))
    pm["spec"]["podMetricEndpoints"] = pm["spec"].pop("podMetricsEndpoints")
    assert any("podMetricEndpoints" in p for p in k8s_checks.check_schemas([pm]))
    pm = copy.deepcopy(next(d for d in monitoring if d["kind"] == "PodMonitor"))
    pm["spec"]["podMetricsEndpoints"][0]["interval"] = "10 seconds"
    assert any("does not match" in p for p in k8s_checks.check_schemas([pm]))


def test_dashboard_shape(dashboard: dict) -> None:
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "percentile", "ttft_slo_ms", "itl_slo_ms"} <= variables
    for p in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs))
    # Panels do not overlap.
    cells = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']} overlaps another"
                cells.add((x, y))
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("requests per second", "replicas", "ttft", "itl", "slo", "kv-cache", "prefix", "decisions"):
        assert topic in titles, topic


def test_dashboard_uses_the_required_metrics(dashboard: dict) -> None:
    used = {m for e in _exprs(dashboard) for m in METRIC_RE.findall(e)}
    assert used >= REQUIRED_METRICS, f"missing from the dashboard: {REQUIRED_METRICS - used}"


def _series_names(registry) -> set[str]:
    names = set()
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}[fam.type]
        names |= {fam.name + s for s in suffixes}
    return names


def test_kvscale_metric_names_exist_in_the_real_registries(dashboard: dict) -> None:
    from router.metrics import RouterMetrics
    from scaler.metrics import ScalerMetrics

    known = _series_names(RouterMetrics().registry) | _series_names(ScalerMetrics().registry)
    used = {m for e in _exprs(dashboard) for m in METRIC_RE.findall(e) if m.startswith("kvscale_")}
    assert used - known == set(), f"the dashboard queries metrics nobody exports: {used - known}"


def test_vllm_metric_names_exist_in_the_installed_vllm(dashboard: dict) -> None:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed (make test installs it)")
    source = "".join(p.read_text() for p in (Path(spec.submodule_search_locations[0]) / "v1" / "metrics").glob("*.py"))
    used = {m for e in _exprs(dashboard) for m in METRIC_RE.findall(e) if m.startswith("vllm:")}
    for m in sorted(used):
        base = re.sub(r"_(bucket|sum|count|total)$", "", m)
        assert f'"{base}"' in source, f"vLLM does not define {base} (dashboard uses {m})"


@pytest.fixture(scope="module")
def promtool() -> Path:
    if not PROMTOOL.exists():
        pytest.fail(f"{PROMTOOL} is missing: `make install-prometheus` (Debian package prometheus) installs it")
    return PROMTOOL


def test_every_dashboard_query_parses(dashboard: dict, promtool: Path, tmp_path: Path) -> None:
    """promtool parses each query (Grafana variables substituted) as a recording rule."""
    exprs = _exprs(dashboard)
    rules = {"groups": [{"name": "kvscale-dashboard", "rules": [
        {"record": f"kvscale_dashboard:query_{i}", "expr": _plain(e)} for i, e in enumerate(exprs)]}]}  # fmt: skip
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run([str(promtool), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in out.stdout
    # And a broken query fails the same check (the check is live).
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "x:y", "expr": "sum by (le (rate(vllm:num_requests_running[1m]))"}]}]}))  # fmt: skip
    bad = subprocess.run([str(promtool), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0


def _scrape_config() -> dict:
    return yaml.safe_load((MONITORING / "prometheus-scrape.yml").read_text())


def _with_file_sd(config: dict, targets_file: Path) -> dict:
    cfg = copy.deepcopy(config)
    for job in cfg["scrape_configs"]:
        sd = job.pop("kubernetes_sd_configs")
        assert sd == [{"role": "pod", "namespaces": {"names": ["kvscale"]}}], job["job_name"]
        job["file_sd_configs"] = [{"files": [str(targets_file)]}]
    return cfg


def test_scrape_config_passes_promtool(promtool: Path, tmp_path: Path) -> None:
    targets = tmp_path / "targets.json"
    targets.write_text("[]")
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(_with_file_sd(_scrape_config(), targets)))
    out = subprocess.run([str(promtool), "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _pod_targets(docs: list[dict]) -> list[dict]:
    """What Kubernetes pod discovery would hand Prometheus for the rendered workloads: one target per container
    port of each replica, with the pod's labels and annotations as ``__meta_kubernetes_*`` labels."""
    out, n = [], 0
    for w in objects.of_kind(docs, "Deployment"):
        tmpl = w["spec"]["template"]
        for replica in range(w["spec"].get("replicas", 1)):
            n += 1
            ip = f"10.1.0.{n}"
            meta = {"__meta_kubernetes_namespace": w["metadata"]["namespace"],
                    "__meta_kubernetes_pod_name": f"{w['metadata']['name']}-{replica}",
                    "__meta_kubernetes_pod_ip": ip}  # fmt: skip
            for k, v in tmpl["metadata"].get("labels", {}).items():
                meta[f"__meta_kubernetes_pod_label_{_sanitize(k)}"] = v
            for k, v in tmpl["metadata"].get("annotations", {}).items():
                meta[f"__meta_kubernetes_pod_annotation_{_sanitize(k)}"] = v
            for c in tmpl["spec"]["containers"]:
                for p in c.get("ports", []):
                    out.append({"targets": [f"{ip}:{p['containerPort']}"], "labels": {
                        **meta, "__meta_kubernetes_pod_container_name": c["name"],
                        "__meta_kubernetes_pod_container_port_name": p.get("name", ""),
                        "__meta_kubernetes_pod_container_port_number": str(p["containerPort"])}})  # fmt: skip
    return out


def test_scrape_config_relabeling_in_a_real_prometheus(pd: list[dict], tmp_path: Path) -> None:
    if not PROMETHEUS.exists():
        pytest.fail(f"{PROMETHEUS} is missing: `make install-prometheus` installs it")
    docs = copy.deepcopy(pd)
    # Decoys: an unrelated pod that asks to be scraped, and an engine pod that opted out of scraping.
    router = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "kvscale-router")
    other = copy.deepcopy(router)
    other["metadata"]["name"] = "other-app"
    other["spec"]["template"]["metadata"]["labels"] = {"app.kubernetes.io/name": "other-app"}
    other["spec"]["template"]["metadata"]["annotations"] = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "8080",
    }
    quiet = copy.deepcopy(next(d for d in docs if d["metadata"]["name"] == "vllm-decode" and d["kind"] == "Deployment"))
    quiet["metadata"]["name"] = "vllm-quiet"
    quiet["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] = "false"
    docs += [other, quiet]

    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps(_pod_targets(docs)))
    cfg = _with_file_sd(_scrape_config(), targets)
    cfg["global"]["scrape_interval"] = "1h"  # discovery and relabeling only; the pod IPs do not exist
    cfg["global"]["scrape_timeout"] = "10s"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    cmd = [str(PROMETHEUS), f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    with ManagedProcess(cmd, log_path=tmp_path / "prometheus.log", name="prometheus") as prom:
        prom.wait_http_ready(f"http://127.0.0.1:{port}/-/ready", timeout=60)
        deadline, active = time.monotonic() + 30, []
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5) as resp:
                active = json.load(resp)["data"]["activeTargets"]
            if len(active) >= 5:
                break
            time.sleep(0.3)
    by_job: dict[str, list[dict]] = {}
    for t in active:
        by_job.setdefault(t["scrapePool"], []).append(t)
    engines = sorted(by_job.get("kvscale-vllm", []), key=lambda t: t["labels"]["pod"])
    assert [(t["labels"]["pod"], t["labels"]["role"], t["labels"]["model"], t["labels"]["namespace"])
            for t in engines] == [("vllm-decode-0", "decode", "llama-3.1-8b-instruct", "kvscale"),
                                  ("vllm-prefill-0", "prefill", "llama-3.1-8b-instruct", "kvscale")]  # fmt: skip
    assert all(re.fullmatch(r"http://10\.1\.0\.\d+:8000/metrics", t["scrapeUrl"]) for t in engines), engines
    routers = by_job.get("kvscale-router", [])
    assert len(routers) == 2 and all(t["scrapeUrl"].endswith(":8080/metrics") for t in routers)
    scalers = by_job.get("kvscale-scaler", [])
    # two scaler replicas (deploy/base/scaler/deployment.yaml), each scraped
    assert len(scalers) == 2 and all(t["scrapeUrl"].endswith(":9091/metrics") for t in scalers)
    assert set(by_job) == {"kvscale-vllm", "kvscale-router", "kvscale-scaler"}
