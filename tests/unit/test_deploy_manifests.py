"""deploy/: the kustomize overlays render, validate, and are wired together correctly.

No Kubernetes API server exists here, so "what the cluster would reject" is checked with the real tools that can
run offline: ``kubectl kustomize`` renders, ``kubernetes-validate`` holds Kubernetes' own OpenAPI schemas, the
KEDA / Prometheus Operator schemas are written down in ``deploy/schemas/``, and the kvscale CLI parsers and the
scaler's metadata validation are the real ones. Each checker is also shown to catch a broken manifest.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from deploy import k8s_checks, kvscale_checks, objects, render

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("aggregated", "pd", "variants", "pd-variants")



@pytest.fixture(scope="module")
def rendered(kustomize_render: Callable[[Path], list[dict]]) -> dict[str, list[dict]]:
    return {name: kustomize_render(DEPLOY / "overlays" / name) for name in OVERLAYS}


def _get(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} rendered"
    return found[0]


def test_overlays_render_the_expected_objects(rendered: dict[str, list[dict]]) -> None:
    common = {
        ("Namespace", "kvscale"), ("PriorityClass", "kvscale-online-inference"),
        ("Deployment", "kvscale-router"), ("Service", "kvscale-router"), ("PodDisruptionBudget", "kvscale-router"),
        ("ServiceAccount", "kvscale-router"), ("Role", "kvscale-router"), ("RoleBinding", "kvscale-router"),
        ("Deployment", "kvscale-scaler"), ("Service", "kvscale-scaler"), ("NetworkPolicy", "kvscale-scaler"),
        ("ServiceAccount", "kvscale-scaler"), ("Role", "kvscale-scaler"), ("RoleBinding", "kvscale-scaler"),
        ("PodDisruptionBudget", "kvscale-scaler"),
        ("TriggerAuthentication", "kvscale-scaler-tls"),
    }  # fmt: skip
    expected = {
        "aggregated": common | {("Deployment", "vllm"), ("ScaledObject", "vllm")},
        "pd": common | {("Deployment", "vllm-prefill"), ("Deployment", "vllm-decode"),
                        ("ScaledObject", "vllm-prefill"), ("ScaledObject", "vllm-decode")},
        "variants": common | {("Deployment", "vllm-h100"), ("Deployment", "vllm-a100"),
                              ("ScaledObject", "vllm-h100"), ("ScaledObject", "vllm-a100")},
        "pd-variants": common | {("Deployment", "vllm-prefill"), ("Deployment", "vllm-decode-h100"),
                                 ("Deployment", "vllm-decode-a100"), ("ScaledObject", "vllm-prefill"),
                                 ("ScaledObject", "vllm-decode-h100"), ("ScaledObject", "vllm-decode-a100")},
    }  # fmt: skip
    for name, docs in rendered.items():
        got = {(d["kind"], d["metadata"]["name"]) for d in docs}
        assert expected[name] <= got, f"{name}: missing {expected[name] - got}"
        assert sum(d["kind"] == "ScaledObject" for d in docs) == {"aggregated": 1, "pd-variants": 3}.get(name, 2)
        # The latency model is generated with a content hash, and the scaler mounts that exact name.
        cms = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("kvscale-latency-")]
        assert len(cms) == 1
        scaler = _get(docs, "Deployment", "kvscale-scaler")
        vols = {v["name"]: v for v in scaler["spec"]["template"]["spec"]["volumes"]}
        assert vols["latency-model"]["configMap"]["name"] == cms[0]["metadata"]["name"]
        # two scaler replicas: KEDA's fallback does not cover an unreachable external scaler (kedacore/keda#8056)
        assert scaler["spec"]["replicas"] == 2
        rules = _get(docs, "Role", "kvscale-scaler")["rules"]
        assert any("pods" in r["resources"] and "patch" in r["verbs"] for r in rules)  # pod-deletion-cost
        for d in docs:
            if d["kind"] not in ("Namespace", "PriorityClass"):
                assert d["metadata"].get("namespace") == "kvscale", objects.ident(d)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_its_schema(rendered: dict[str, list[dict]], overlay: str) -> None:
    assert k8s_checks.check_schemas(rendered[overlay]) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_wiring_is_consistent(rendered: dict[str, list[dict]], overlay: str) -> None:
    assert render.check(rendered[overlay], schemas=False, kvscale=False) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kvscale_containers_parse_with_the_real_cli(rendered: dict[str, list[dict]], overlay: str) -> None:
    """The router and scaler args go through ``kvscale``'s own parser; the router config is built and validated."""
    assert kvscale_checks.check_kvscale_args(rendered[overlay]) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaler_accepts_every_scaledobject_trigger(rendered: dict[str, list[dict]], overlay: str) -> None:
    """Each trigger's metadata, exactly as KEDA passes it (``scalerAddress`` included), through the scaler's parser.

    ``latencyModel`` points into the ConfigMap the scaler pod mounts; the check reads that ConfigMap's content.
    """
    from kvscale.latency import builtin_models
    from scaler.metadata import parse_scaler_metadata

    seen: list[tuple[str, str]] = []

    def parse(md: dict[str, str], namespace: str):
        settings = parse_scaler_metadata(md, namespace)
        seen.append((settings.pool, settings.pod_namespace))
        assert Path(settings.latency_model).is_file() or settings.latency_model in builtin_models()
        return settings

    assert kvscale_checks.check_scaler_metadata(rendered[overlay], parse) == []
    pools = {"aggregated": {("aggregated", "kvscale")}, "pd": {("prefill", "kvscale"), ("decode", "kvscale")},
             "variants": {("aggregated", "kvscale")}, "pd-variants": {("prefill", "kvscale"), ("decode", "kvscale")}}
    assert set(seen) == pools[overlay]


def test_scaler_metadata_check_reports_what_the_scaler_rejects(rendered: dict[str, list[dict]]) -> None:
    docs = copy.deepcopy(rendered["pd"])
    so = _get(docs, "ScaledObject", "vllm-prefill")
    so["spec"]["triggers"][0]["metadata"]["ttftSloMs"] = "fast"
    problems = kvscale_checks.check_scaler_metadata(docs)
    assert any("vllm-prefill" in p and "ttftSloMs" in p for p in problems), problems


def test_latency_model_matches_the_engines(rendered: dict[str, list[dict]]) -> None:
    """The shipped latency model loads, describes the served model, and the GPU the engines are pinned to."""
    from kvscale.latency import latency_model_from_dict

    for name, docs in rendered.items():
        if name in ("variants", "pd-variants"):
            continue  # one model per variant: test_variants_overlay_pins_each_variant_to_its_gpu_and_model
        cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("kvscale-latency"))
        model = latency_model_from_dict(json.loads(cm["data"]["latency-model.json"]))
        for w in kvscale_checks.engine_workloads(docs):
            args = kvscale_checks.engine_container(w)["args"]
            assert objects.flag(args, "--model") == model.model
            terms = w["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]  # fmt: skip
            products = [v for t in terms for e in t["matchExpressions"] if e["key"] == "nvidia.com/gpu.product"
                        for v in e["values"]]  # fmt: skip
            assert products and all("H100" in p for p in products) and "H100" in model.hardware


def test_pd_pools_differ_only_where_they_should(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["pd"]
    pre, dec = _get(docs, "Deployment", "vllm-prefill"), _get(docs, "Deployment", "vllm-decode")
    for w, role in ((pre, "prefill"), (dec, "decode")):
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert labels["kvscale.io/role"] == labels["llm-d.ai/role"] == role
        assert w["spec"]["selector"]["matchLabels"]["kvscale.io/role"] == role
    strip = copy.deepcopy
    a, b = strip(pre), strip(dec)
    for w in (a, b):
        w["metadata"].pop("name")
        template_labels = w["spec"]["template"]["metadata"]["labels"]
        for obj in (w["metadata"]["labels"], w["spec"]["selector"]["matchLabels"], template_labels):
            obj.pop("kvscale.io/role", None)
            obj.pop("llm-d.ai/role", None)
    assert a == b
    agg = _get(rendered["aggregated"], "Deployment", "vllm")
    assert objects.flag(kvscale_checks.engine_container(agg)["args"], "--kv-transfer-config") is None


# A mutation of the rendered pd overlay and the problem the checks must then report.
Mutation = Callable[[list[dict]], None]


def _container(docs: list[dict], name: str) -> dict:
    return _get(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]


def _trigger_md(docs: list[dict], name: str) -> dict:
    return _get(docs, "ScaledObject", name)["spec"]["triggers"][0]["metadata"]


def _set_arg(docs: list[dict], deployment: str, name: str, value: str) -> None:
    c = _container(docs, deployment)
    c["args"] = [f"{name}={value}" if a.startswith(f"{name}=") else a for a in c["args"]]


MUTATIONS: dict[str, tuple[Mutation, str]] = {
    "service-target-port": (
        lambda d: _get(d, "Service", "kvscale-scaler")["spec"]["ports"][0].update(targetPort="grpcs"),
        "targets 'grpcs'",
    ),
    "router-selector-model": (
        lambda d: _set_arg(
            d, "kvscale-router", "--k8s-selector", "app.kubernetes.io/component=engine,kvscale.io/model=llama-3-70b"
        ),
        "selects no engine pods",
    ),
    "router-selector-too-wide": (
        lambda d: _set_arg(d, "kvscale-router", "--k8s-selector", "app.kubernetes.io/part-of=kvscale"),
        "also selects Deployment kvscale/kvscale-scaler",
    ),
    "podselector-wrong-pool": (
        lambda d: _trigger_md(d, "vllm-prefill").update(
            podSelector="app.kubernetes.io/component=engine,kvscale.io/role=decode"
        ),
        "podSelector selects ['Deployment kvscale/vllm-decode']",
    ),
    "pool-vs-role": (lambda d: _trigger_md(d, "vllm-decode").update(pool="prefill"), "pool 'prefill' but"),
    "model-mismatch": (lambda d: _trigger_md(d, "vllm-decode").update(model="llama"), "is not the served model"),
    "max-num-seqs": (lambda d: _set_arg(d, "vllm-decode", "--max-num-seqs", "512"), "maxNumSeqs '256' differs"),
    "scaler-address-namespace": (
        lambda d: _trigger_md(d, "vllm-prefill").update(scalerAddress="kvscale-scaler.other.svc:9090"),
        "Service other/kvscale-scaler not rendered",
    ),
    "scaler-address-port": (
        lambda d: _trigger_md(d, "vllm-prefill").update(scalerAddress="kvscale-scaler.kvscale.svc:9091"),
        "has no grpc port 9091",
    ),
    "latency-model-path": (
        lambda d: _trigger_md(d, "vllm-prefill").update(latencyModel="/etc/kvscale/model.json"),
        "is not under any volumeMount",
    ),
    "fallback-out-of-range": (
        lambda d: _get(d, "ScaledObject", "vllm-decode")["spec"]["fallback"].update(replicas=40),
        "fallback.replicas 40 outside",
    ),
    "scale-to-zero-vs-min": (
        lambda d: _trigger_md(d, "vllm-decode").update(scaleToZero="true"),
        "disagrees with minReplicaCount",
    ),
    "gpu-toleration": (
        lambda d: _get(d, "Deployment", "vllm-decode")["spec"]["template"]["spec"].pop("tolerations"),
        "does not tolerate the nvidia.com/gpu taint",
    ),
    "unknown-secret": (
        lambda d: _get(d, "TriggerAuthentication", "kvscale-scaler-tls")["spec"]["secretTargetRef"][0].update(
            name="keda-tls"
        ),
        "Secret keda-tls is neither rendered",
    ),
    "nixl-host": (
        lambda d: _container(d, "vllm-prefill").update(
            env=[e for e in _container(d, "vllm-prefill")["env"] if e["name"] != "VLLM_NIXL_SIDE_CHANNEL_HOST"]
        ),
        "VLLM_NIXL_SIDE_CHANNEL_HOST must be the pod IP",
    ),
    "kv-events-json": (
        lambda d: _set_arg(d, "vllm-prefill", "--kv-events-config", "{enable_kv_cache_events: true}"),
        "--kv-events-config is missing or not a JSON object",
    ),
    "probe-port": (
        lambda d: _container(d, "vllm-decode")["readinessProbe"]["httpGet"].update(port="web"),
        "readinessProbe uses port 'web'",
    ),
    "selector-vs-template": (
        lambda d: _get(d, "Deployment", "kvscale-router")["spec"]["selector"]["matchLabels"].update(
            {"app.kubernetes.io/name": "router"}
        ),
        "spec.selector does not match",
    ),
    "pdb-blocks-everything": (
        lambda d: _get(d, "PodDisruptionBudget", "kvscale-router")["spec"].update(minAvailable=2),
        "no voluntary disruption would ever be allowed",
    ),
    "missing-service-account": (
        lambda d: d.remove(_get(d, "ServiceAccount", "kvscale-scaler")),
        "serviceAccountName kvscale-scaler not rendered",
    ),
    "secret-unreadable": (
        lambda d: _get(d, "Deployment", "kvscale-scaler")["spec"]["template"]["spec"]["securityContext"].pop("fsGroup"),
        "unreadable for the non-root user",
    ),
    "label-vs-served-name": (
        lambda d: _set_arg(d, "vllm-decode", "--served-model-name", "llama-8b"),
        "the router serves the model named by the label",
    ),
    "bad-label": (
        lambda d: _get(d, "Deployment", "vllm-decode")["spec"]["template"]["metadata"]["labels"].update(
            {"kvscale.io/model": "meta-llama/Llama-3.1-8B"}
        ),
        "invalid label kvscale.io/model",
    ),
}


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_checks_catch_broken_wiring(rendered: dict[str, list[dict]], case: str) -> None:
    mutate, expected = MUTATIONS[case]
    docs = copy.deepcopy(rendered["pd"])
    mutate(docs)
    problems = render.check(docs, schemas=False, kvscale=False)
    assert any(expected in p for p in problems), f"{case}: expected {expected!r} in {problems}"


def test_cli_check_catches_flag_typos(rendered: dict[str, list[dict]]) -> None:
    docs = copy.deepcopy(rendered["aggregated"])
    args = _container(docs, "kvscale-scaler")["args"]
    args[args.index("--port=9090")] = "--grpc-port=9090"
    problems = kvscale_checks.check_kvscale_args(docs)
    assert any("kvscale-scaler" in p and "--grpc-port" in p for p in problems), problems
    docs = copy.deepcopy(rendered["aggregated"])
    c = _container(docs, "kvscale-router")
    c["args"] = [a for a in c["args"] if not a.startswith("--api-key-file")]
    assert any("no --api-key-file" in p for p in kvscale_checks.check_kvscale_args(docs))


SCHEMA_BREAKS: dict[str, tuple[str, str, Callable[[dict], None], str]] = {
    # name: (kind, object name, mutation, expected message part)
    "so-unknown-field": (
        "ScaledObject",
        "vllm-decode",
        lambda o: o["spec"]["fallback"].update(replica=2),
        "Additional properties",
    ),
    "so-int-as-string": (
        "ScaledObject",
        "vllm-decode",
        lambda o: o["spec"].update(minReplicaCount="1"),
        "is not of type 'integer'",
    ),
    "so-metadata-number": (
        "ScaledObject",
        "vllm-decode",
        lambda o: o["spec"]["triggers"][0]["metadata"].update(ttftSloMs=500),
        "is not of type 'string'",
    ),
    "so-fallback-behavior": (
        "ScaledObject",
        "vllm-prefill",
        lambda o: o["spec"]["fallback"].update(behavior="keepCurrent"),
        "is not one of",
    ),
    "so-hpa-policy": (
        "ScaledObject",
        "vllm-prefill",
        lambda o: o["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["policies"][0].update(
            periodSeconds=3600
        ),
        "is greater than the maximum",
    ),
    "so-no-triggers": ("ScaledObject", "vllm-prefill", lambda o: o["spec"].update(triggers=[]), "should be non-empty"),
    "ta-missing-key": (
        "TriggerAuthentication",
        "kvscale-scaler-tls",
        lambda o: o["spec"]["secretTargetRef"][0].pop("key"),
        "'key' is a required property",
    ),
    "ta-typo": (
        "TriggerAuthentication",
        "kvscale-scaler-tls",
        lambda o: o["spec"].update(secretTargetRefs=[]),
        "Additional properties",
    ),
    "k8s-port-type": (
        "Service",
        "kvscale-router",
        lambda o: o["spec"]["ports"][0].update(port="8080"),
        "is not of type 'integer'",
    ),
    "k8s-unknown-field": (
        "Deployment",
        "vllm-decode",
        lambda o: o["spec"]["template"]["spec"].update(tolerations_=[]),
        "tolerations_",
    ),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_BREAKS))
def test_schemas_reject_broken_objects(rendered: dict[str, list[dict]], case: str) -> None:
    kind, name, mutate, expected = SCHEMA_BREAKS[case]
    obj = copy.deepcopy(_get(rendered["pd"], kind, name))
    mutate(obj)
    problems = k8s_checks.check_schemas([obj])
    assert any(expected in p for p in problems), f"{case}: expected {expected!r} in {problems}"


def test_crd_schema_files_are_valid_json_schemas() -> None:
    import jsonschema

    for path in sorted((DEPLOY / "schemas").glob("*.json")):
        schema = json.loads(path.read_text())
        jsonschema.validators.validator_for(schema).check_schema(schema)
        assert schema["properties"]["spec"]["additionalProperties"] is False, path.name
    assert {p.name for p in (DEPLOY / "schemas").glob("*.json")} == set(k8s_checks.CRD_SCHEMAS.values())


def test_changing_the_overlay_namespace_moves_everything(
    tmp_path: Path, rendered: dict[str, list[dict]], kustomize_render: Callable[[Path], list[dict]]
) -> None:
    """docs/deploy.md says: change ``namespace:`` in the overlay and everything follows. Check that claim."""
    copy_root = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy_root, ignore=shutil.ignore_patterns("__pycache__"))
    for overlay in OVERLAYS:
        k = copy_root / "overlays" / overlay / "kustomization.yaml"
        text = k.read_text()
        assert "\nnamespace: kvscale\n" in text
        k.write_text(text.replace("\nnamespace: kvscale\n", "\nnamespace: team-a\n"))
        docs = kustomize_render(k.parent)
        assert render.check(docs, schemas=False, kvscale=False) == []
        for d in docs:
            if d["kind"] == "Namespace":
                assert d["metadata"]["name"] == "team-a"
            elif d["kind"] != "PriorityClass":
                assert d["metadata"]["namespace"] == "team-a", objects.ident(d)
        for rb in (d for d in docs if d["kind"] == "RoleBinding"):
            assert {s["namespace"] for s in rb["subjects"]} == {"team-a"}
        for so in (d for d in docs if d["kind"] == "ScaledObject"):
            md = so["spec"]["triggers"][0]["metadata"]
            assert md["scalerAddress"] == "kvscale-scaler.team-a.svc:9090"
            assert md["podNamespace"] == "team-a"


def test_render_script_cli(tmp_path: Path) -> None:
    py = sys.executable
    out = subprocess.run([py, str(DEPLOY / "render.py"), str(DEPLOY / "overlays" / "pd")], capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert {d["kind"] for d in docs} >= {"Deployment", "ScaledObject", "TriggerAuthentication"}
    checked = subprocess.run([py, str(DEPLOY / "render.py"), str(DEPLOY / "overlays" / "aggregated"), "--check",
                              "--no-kvscale"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert re.search(r"overlays/aggregated: \d+ objects .*: 0 problem\(s\)", checked.stdout)
    assert "Secrets to create before applying: " in checked.stdout
    missing = subprocess.run([py, str(DEPLOY / "render.py"), str(tmp_path), "--check"], capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert missing.returncode == 2 and "kustomize" in missing.stderr
    # A kubectl too old for the overlays (Debian's kubernetes-client 1.20 reports no kustomizeVersion): a stand-in
    # script answers `kubectl version` the way that kubectl does.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "kubectl").write_text('#!/bin/sh\necho \'{"clientVersion": {"gitVersion": "v1.20.2"}}\'\n')
    (fake / "kubectl").chmod(0o755)
    old = subprocess.run([py, str(DEPLOY / "render.py"), str(DEPLOY / "overlays" / "pd")], capture_output=True,
                         text=True, timeout=60, env={"PATH": str(fake)})  # fmt: skip
    assert old.returncode == 2 and "needs kustomize >= 5" in old.stderr and "kubectl" in old.stderr


def test_docs_cover_secrets_and_every_metadata_key(rendered: dict[str, list[dict]]) -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    for name in k8s_checks.OPERATOR_SECRETS:
        assert f"`{name}`" in doc, f"docs/deploy.md does not tell the operator to create {name}"
    keys = {k for docs in rendered.values() for d in docs if d["kind"] == "ScaledObject"
            for k in d["spec"]["triggers"][0]["metadata"]}  # fmt: skip
    for key in sorted(keys):
        assert f"`{key}`" in doc, f"docs/deploy.md does not document the ScaledObject metadata key {key}"
    for cmd in ("kubectl apply -k deploy/overlays/pd", "kubectl apply -k deploy/overlays/aggregated",
                "deploy/tls/make-certs.sh", "python deploy/render.py"):  # fmt: skip
        assert cmd in doc


@pytest.mark.parametrize(("overlay", "prefix", "role"), [("variants", "vllm", "both"),
                                                     ("pd-variants", "vllm-decode", "decode")])
def test_variants_overlay_pins_each_variant_to_its_gpu_and_model(rendered: dict[str, list[dict]], overlay: str,
                                                                 prefix: str, role: str) -> None:  # fmt: skip
    """Each variant's pods run on its GPU type, carry the label naming its latency model (the router reads it),
    and its ScaledObject names the same model, its price and the shared variantGroup; the aggregated router runs
    ``slo`` (the P/D router's decode choice is ``least-request``, weighted by the same label)."""
    from kvscale.latency import load_latency_model
    from scaler.metadata import parse_scaler_metadata

    docs = rendered[overlay]
    groups = set()
    for gpu, product in (("h100", "NVIDIA-H100-80GB-HBM3"), ("a100", "NVIDIA-A100-SXM4-40GB")):
        dep, so = _get(docs, "Deployment", f"{prefix}-{gpu}"), _get(docs, "ScaledObject", f"{prefix}-{gpu}")
        tmpl = dep["spec"]["template"]
        terms = tmpl["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"]  # fmt: skip
        assert [v for t in terms for e in t["matchExpressions"] for v in e["values"]] == [product]
        assert dep["spec"]["selector"]["matchLabels"]["kvscale.io/gpu"] == gpu
        assert dep["spec"]["selector"]["matchLabels"]["kvscale.io/role"] == role
        s = parse_scaler_metadata(so["spec"]["triggers"][0]["metadata"], "kvscale")
        assert s.pool == ("aggregated" if role == "both" else role)
        assert tmpl["metadata"]["labels"]["kvscale.io/latency-model"] == s.latency_model
        assert gpu.upper() in load_latency_model(s.latency_model).hardware.upper()
        assert s.cost_per_hour > 0 and f"kvscale.io/gpu={gpu}" in s.pod_selector
        assert (s.min_replicas, s.max_replicas) == (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"])
        groups.add(s.variant_group)
    assert len(groups) == 1 and groups != {""}
    if overlay == "variants":
        router_args = _get(docs, "Deployment", "kvscale-router")["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--policy=slo" in router_args and "--policy=prefix" not in router_args
    else:  # the prefill pool is not in the group
        md = _get(docs, "ScaledObject", "vllm-prefill")["spec"]["triggers"][0]["metadata"]
        assert md["pool"] == "prefill" and "variantGroup" not in md
