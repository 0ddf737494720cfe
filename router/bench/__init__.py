"""Routing-quality benchmark: simulator pods behind each router configuration (issue 6)."""
