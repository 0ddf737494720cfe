"""kvscale predictor."""
