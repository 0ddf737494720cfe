"""`kvscale router` commands (registered by kvscale.cli)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this part's commands to the top-level parser."""
