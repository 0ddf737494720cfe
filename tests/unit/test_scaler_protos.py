"""The generated stubs must match protos/externalscaler.proto, and the proto must keep KEDA's wire contract."""

from __future__ import annotations

from pathlib import Path

from protos import externalscaler_pb2 as pb
from protos.generate import PROTOS_DIR, generate


def test_stubs_do_not_drift_from_the_proto(tmp_path: Path):
    for path in generate(tmp_path):
        committed = PROTOS_DIR / path.name
        assert committed.exists(), f"{committed} missing: run `python -m protos.generate`"
        assert path.read_text() == committed.read_text(), f"{committed.name} drifted: run `python -m protos.generate`"


def test_wire_contract_matches_keda():
    fd = pb.DESCRIPTOR
    assert fd.package == "externalscaler"
    svc = fd.services_by_name["ExternalScaler"]
    methods = {m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in svc.methods}
    assert methods["IsActive"] == ("ScaledObjectRef", "IsActiveResponse", False)
    assert methods["StreamIsActive"] == ("ScaledObjectRef", "IsActiveResponse", True)
    assert methods["GetMetricSpec"] == ("ScaledObjectRef", "GetMetricSpecResponse", False)
    assert methods["GetMetrics"] == ("GetMetricsRequest", "GetMetricsResponse", False)

    def fields(msg: str) -> dict[str, tuple[int, int]]:
        return {f.name: (f.number, f.type) for f in fd.message_types_by_name[msg].fields}

    F = pb.DESCRIPTOR.message_types_by_name["MetricValue"].fields_by_name
    assert fields("ScaledObjectRef")["name"][0] == 1 and fields("ScaledObjectRef")["namespace"][0] == 2
    assert fields("ScaledObjectRef")["scalerMetadata"][0] == 3
    assert fields("IsActiveResponse") == {"result": (1, F["metricName"].TYPE_BOOL)}
    spec = {k: v[0] for k, v in fields("MetricSpec").items()}
    assert spec == {"metricName": 1, "targetSize": 2, "targetSizeFloat": 3}
    assert fields("MetricSpec")["targetSize"][1] == F["metricName"].TYPE_INT64
    assert fields("MetricSpec")["targetSizeFloat"][1] == F["metricName"].TYPE_DOUBLE
    assert {k: v[0] for k, v in fields("GetMetricsRequest").items()} == {"scaledObjectRef": 1, "metricName": 2}
    assert {k: v[0] for k, v in fields("MetricValue").items()} == {
        "metricName": 1, "metricValue": 2, "metricValueFloat": 3
    }
    assert fields("MetricValue")["metricValue"][1] == F["metricName"].TYPE_INT64
    # a round trip through the wire format
    m = pb.GetMetricsResponse(metricValues=[pb.MetricValue(metricName="x", metricValue=3, metricValueFloat=3.0)])
    assert pb.GetMetricsResponse.FromString(m.SerializeToString()) == m
