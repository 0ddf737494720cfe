"""`kvscale bench routing` (registered by kvscale.cli)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `bench` command group."""
