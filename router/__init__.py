"""kvscale router."""
