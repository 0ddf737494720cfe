"""The core's pod watch (kvscale.podwatch): readiness as an Endpoints controller judges it, on ``V1Pod`` objects
and their dict form, and the state a list or a watch event leaves (the thread itself runs against a fake API
server in tests/integration/test_scaler_discovery.py and test_router_k8s.py)."""

from __future__ import annotations

from kubernetes.client import V1ObjectMeta, V1Pod, V1PodCondition, V1PodStatus

from kvscale.podwatch import PodWatch, pod_host, pod_ready
from router.discovery import pod_to_spec


def v1pod(name="p", *, ready=True, ip="10.0.0.5", phase="Running", deleting=False, rv="1", labels=None) -> V1Pod:
    return V1Pod(
        metadata=V1ObjectMeta(name=name, resource_version=rv, labels=labels or {},
                              deletion_timestamp="2026-01-01T00:00:00Z" if deleting else None),
        status=V1PodStatus(phase=phase, pod_ip=ip,
                           conditions=[V1PodCondition(type="Ready", status="True" if ready else "False")]),
    )  # fmt: skip


def test_ready_as_an_endpoints_controller_judges_it():
    assert pod_ready(v1pod())
    assert not pod_ready(v1pod(ready=False))
    assert not pod_ready(v1pod(ip=None))
    assert not pod_ready(v1pod(deleting=True))  # terminating: out at once, Ready or not
    assert not pod_ready(v1pod(phase="Pending"))
    assert not pod_ready(V1Pod(metadata=V1ObjectMeta(name="x")))  # no status yet
    assert pod_ready(v1pod().to_dict()) and not pod_ready(v1pod(deleting=True).to_dict())


def test_pod_host_and_spec_from_a_v1pod():
    assert pod_host(v1pod(ip="fd00::7")) == "[fd00::7]" and pod_host(v1pod()) == "10.0.0.5"
    spec = pod_to_spec(v1pod(labels={"kvscale.io/role": "decode"}), 8000)
    assert spec is not None and spec.url == "http://10.0.0.5:8000" and spec.role == "decode"
    assert pod_to_spec(v1pod(ip="fd00::7"), 8000).url == "http://[fd00::7]:8000"
    assert pod_to_spec(v1pod(deleting=True), 8000) is None


def test_state_and_change_callbacks():
    seen: list[set[str]] = []
    w = PodWatch("ns", "app=x", api_client=object(), on_change=lambda pods: seen.append(set(pods)))  # not started
    assert w.pods() is None  # not known yet: never "no pods"
    w._set({}, "list")
    assert w.pods() == {} and seen == [set()]  # the first list is a change even when empty
    w._apply("ADDED", v1pod("a"))
    w._apply("ADDED", v1pod("b", ready=False))  # not Ready: no change
    assert set(w.pods()) == {"a"} and seen == [set(), {"a"}]
    w._set({"a": v1pod("a")}, "list")  # the same pod, same resourceVersion, listed again: no change
    assert len(seen) == 2
    w._apply("MODIFIED", v1pod("a", rv="2", labels={"role": "decode"}))  # a new version of a Ready pod
    assert len(seen) == 3 and w.pods()["a"].metadata.labels == {"role": "decode"}
    w._apply("MODIFIED", v1pod("a", rv="3", deleting=True))
    assert w.pods() == {} and seen[-1] == set()
    w._apply("DELETED", v1pod("a", rv="4"))  # already gone: no change
    assert len(seen) == 4
