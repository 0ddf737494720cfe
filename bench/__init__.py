"""Live benchmarks that start real processes: ``kvscale bench routing`` (simulator or vLLM CPU pods behind each
router configuration: kvscale's policies, the live vllm-router binary, P/D)."""
