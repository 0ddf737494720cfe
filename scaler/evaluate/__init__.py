"""``kvscale eval scaling``: replay one trace on the virtual-clock cluster under KEDA + HPA, once per policy.

Every policy gets the same trace, the same cluster (latency model, engine config, dispatcher, pod startup delay),
the same SLO and the same starting replica count; only who decides the replica count differs:

* ``kvscale``: :class:`~scaler.policy.ScalingPolicy` reading :class:`~scaler.evaluate.signals.VirtualSource`
  signals (the same ``EngineStats`` → :class:`~scaler.signals.PodHistory` path as the live pod scraper) every
  signal interval; KEDA's ``GetMetrics`` returns its desired count, target 1, ``AverageValue``; the HPA runs with
  the ``behavior`` of the committed ScaledObject of the pool (``deploy/overlays/*/scaledobject*.yaml``, read at
  run time).
* ``kvscale-hpa-default``: the same policy under the Kubernetes HPA defaults (300 s scale-down stabilization),
  i.e. a ScaledObject without ``advanced.horizontalPodAutoscalerConfig``.
* ``kvscale-noforecast``: ``kvscale`` without the trend forecast (an ablation justifying the forecaster).
* ``static-peak``: the oracle's peak replica count, all the time.
* ``keda-queue``: KEDA prometheus trigger on ``sum(vllm:num_requests_waiting)``, threshold 5, ``AverageValue``
  (the vLLM production-stack tutorial's setting), HPA defaults.
* ``hpa-kv``: HPA on the pods' ``vllm:kv_cache_usage_perc``, average target 0.7, HPA defaults.
* ``peer:...``: the peers' autoscalers (:mod:`~scaler.evaluate.peers`): AIBrix KPA and APA, Dynamo's SLA planner
  (Kalman and constant load predictors), llm-d's WVA saturation analyzer, each from its published algorithm.
* ``oracle``: knows the future: per ``oracle_bucket_s`` bucket, the fewest replicas whose planned capacity (the
  same capacity model x targetUtilization) covers the demand that will arrive, started ``startup_s`` ahead; no HPA.

With every run comes ``reactive_bound``: an upper bound on the attainment of *any* reactive policy without
standing headroom (:meth:`~scaler.evaluate.run.Evaluation.reactive_attainment_bound`), which shows where 99 %
is out of reach because pods start ``startup_s`` after the demand that asks for them.

KEDA + HPA emulation: :class:`scaler.hpa.Hpa` (HPA sync every 15 s, 0.1 tolerance, ``AverageValue`` →
``ceil(metric / target)``, pods metrics → ``ceil(ready x average / target)``, behaviour stabilization windows and
rate policies, min/max replicas); the HPA settings each policy ran under are part of the results. New pods serve
after ``startup_s``. KEDA's pollingInterval only matters for activation from zero, which no policy uses here (min
replicas 1).

The package: :mod:`~scaler.evaluate.signals` (pool signals from the virtual pods),
:mod:`~scaler.evaluate.controllers` (KEDA + HPA, the kvscale producer, the oracle), :mod:`~scaler.evaluate.run`
(``EvalConfig``, ``Evaluation``), :mod:`~scaler.evaluate.report` (goal check, table, plot) and
:mod:`~scaler.evaluate.cli` (the command). It is the one part of ``scaler`` that imports the simulator; the
serving scaler (``kvscale scaler serve``) imports nothing of it. This file holds only the names the command
line offers (policies, traces), so registering the command loads no evaluation code.
"""

from __future__ import annotations

PEER_POLICIES = ("peer:aibrix-kpa", "peer:aibrix-apa", "peer:dynamo-sla", "peer:dynamo-sla-constant", "peer:llm-d-wva")
POLICIES = ("kvscale", "kvscale-hpa-default", "kvscale-noforecast", "static-peak", "keda-queue", "hpa-kv", "oracle",
            *PEER_POLICIES)  # fmt: skip
KVSCALE_POLICIES = ("kvscale", "kvscale-hpa-default", "kvscale-noforecast")
TRACES = ("diurnal", "step", "bursty", "poisson")
