"""kvscale's Kubernetes manifests (kustomize) and the tool that renders and checks them (``deploy/render.py``)."""
