"""Kubernetes label selectors: one parser and matcher for the deploy checks, the scaler and the demo."""

from __future__ import annotations

import re

__all__ = ["label_key_ok", "label_value_ok", "matches", "parse_selector", "split_selector"]


def split_selector(selector: str) -> list[str]:
    """Split a label selector on the commas that are not inside ``in (...)`` sets."""
    parts, depth, cur = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


# Kubernetes label syntax (apimachinery validation): optional DNS-subdomain prefix, 63-char name and value.
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def label_key_ok(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return bool(_LABEL_NAME.match(name))


def label_value_ok(value: str) -> bool:
    return value == "" or bool(_LABEL_NAME.match(value))


def parse_selector(text: str) -> list[tuple[str, str, set[str]]]:
    """Parse a Kubernetes label selector string into (key, op, values); op in =, !=, in, notin, exists, !exists."""
    reqs: list[tuple[str, str, set[str]]] = []
    for raw in split_selector(text):
        part = raw.strip()
        if not part:
            raise ValueError(f"empty requirement in selector {text!r}")
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", part):
            reqs.append((m[1], m[2], {v.strip() for v in m[3].split(",") if v.strip()}))
        elif m := re.fullmatch(r"([^=!\s]+)\s*(==|=|!=)\s*(\S*)", part):
            reqs.append((m[1], "!=" if m[2] == "!=" else "=", {m[3]}))
        elif m := re.fullmatch(r"!\s*(\S+)", part):
            reqs.append((m[1], "!exists", set()))
        elif re.fullmatch(r"\S+", part):
            reqs.append((part, "exists", set()))
        else:
            raise ValueError(f"cannot parse requirement {part!r} in selector {text!r}")
        key = reqs[-1][0]
        if not label_key_ok(key):
            raise ValueError(f"invalid label key {key!r} in selector {text!r}")
    return reqs


def matches(reqs: list[tuple[str, str, set[str]]], labels: dict[str, str]) -> bool:
    for key, op, values in reqs:
        present, value = key in labels, labels.get(key)
        ok = {
            "=": present and value in values,
            "in": present and value in values,
            "!=": not present or value not in values,
            "notin": not present or value not in values,
            "exists": present,
            "!exists": not present,
        }[op]
        if not ok:
            return False
    return True
