"""kvscale: SLO-driven autoscaling and KV-cache-aware routing for LLM serving (shared core)."""

__version__ = "0.1.0"
