"""``kvscale demo``: the whole stack locally (pods, router, KEDA external scaler, a KEDA + HPA controller) under a
ramp / burst / idle traffic pattern. The top of the house: nothing imports it but the CLI."""
