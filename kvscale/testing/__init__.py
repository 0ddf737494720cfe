"""Test and benchmark helpers: a tiny local model, process management, and a real vLLM CPU server."""
