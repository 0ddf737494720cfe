"""The engine model: vLLM-like scheduler, KV cache and step-time model, with HTTP and virtual-clock drivers."""
