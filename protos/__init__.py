"""kvscale protos."""
