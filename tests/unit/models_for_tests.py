"""Latency models shared by the unit tests."""

from kvscale.latency import LatencyModel, StepCoefficients

# Deliberately "ugly" coefficients so that a wrong feature cannot hide behind round numbers.
LAT = LatencyModel(
    "test",
    StepCoefficients(
        base_s=0.0123,
        per_prefill_token_s=1.7e-4,
        per_prefill_attn_s=3.1e-8,
        per_decode_seq_s=2.3e-4,
        per_decode_ctx_s=1.9e-7,
    ),
    kv_transfer_base_s=0.0071,
    kv_transfer_per_token_s=4.3e-5,
)


def least_request():
    """The router's default policy as the virtual cluster's dispatcher (the simulator has none of its own)."""
    from router.evaluate.dispatch import PipelineDispatcher

    return PipelineDispatcher("least-request")
