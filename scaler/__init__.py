"""kvscale scaler."""
