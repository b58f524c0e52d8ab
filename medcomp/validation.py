"""Bad params, said plainly: one line per wrong key, and never a secret repeated back.

pydantic's errors become ``dotted.key: what is allowed; got value`` lines (``describe``); a section's
whole dict is never printed, and a value that may be a pasted key never is. ``looks_like_variable_name``
tells an environment variable's name from a key pasted in its place. ``UniqueKeyLoader`` reads YAML refusing a
repeated key, which PyYAML would silently drop.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from pydantic import ValidationError


# Key formats of the hosted APIs people paste by mistake, and what a variable name looks like.
_KEY_PREFIXES = ("sk-", "sk_", "hf_", "gsk_", "ghp_", "gho_", "github_pat_", "xai-", "pk-", "rk-", "AKIA", "ASIA", "AIza", "nvapi-", "r8_")
_VARIABLE_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")


_SECRET = re.compile(r"(?:" + "|".join(re.escape(prefix) for prefix in _KEY_PREFIXES) + r")[A-Za-z0-9_\-]{12,}")


def secret_like_keys(values: Any, prefix: str = "") -> list[str]:
    """Dotted keys of string values that carry something shaped like an API key (a known key prefix and
    a long body): such a value would be written to the manifest and every report."""
    if isinstance(values, dict):
        return [key for name, value in values.items() for key in secret_like_keys(value, f"{prefix}{name}.")]
    if isinstance(values, (list, tuple)):
        return [key for value in values for key in secret_like_keys(value, prefix)]
    return [prefix.rstrip(".")] if isinstance(values, str) and _SECRET.search(values) else []


def looks_like_variable_name(value: str) -> bool:
    """An environment variable's name (OPENAI_API_KEY, HF_TOKEN), not a secret: capitals, digits and
    underscores, no known key prefix, and no long run of mixed letters and digits (a key's body)."""
    if not _VARIABLE_NAME.fullmatch(value) or value.startswith(_KEY_PREFIXES):
        return False
    return not any(len(run) >= 16 and re.search(r"\d", run) and re.search(r"[A-Z]", run) for run in value.split("_"))


def _shown(value: Any) -> str:
    """A given value as the error line shows it: scalars only, cut short; a section's whole dict never
    (it is noise, and may hold a pasted secret)."""
    if isinstance(value, (dict, list, tuple)):
        return ""
    text = repr(value)
    return f"; got {text[:60] + '...' if len(text) > 60 else text}"


def describe(error: ValidationError, source: str) -> str:
    """One line per wrong key: its dotted name, what is allowed, what was given. A union's branches
    (``batch_size``: a number or 'auto') are reported as one line, not one per branch; a value that may
    be a secret is never repeated."""
    lines = [f"invalid params in {source}:"]
    by_key: dict[str, list[dict[str, Any]]] = {}
    for item in error.errors():
        # pydantic names a union's branches in the location (constrained-int, literal['auto']): not keys
        parts = [str(part) for part in item["loc"] if not (isinstance(part, str) and ("[" in part or "-" in part))]
        by_key.setdefault(".".join(parts) or "(top level)", []).append(item)
    for key, items in by_key.items():
        item = items[0]
        message = " or ".join(dict.fromkeys(i["msg"].removeprefix("Value error, ") for i in items))
        if key == "(top level)":  # a check across sections: its message names the keys
            lines.append(f"  {message}")
        elif item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check its spelling and the section it is in)")
        elif "api_key" in key or "base_url" in key or "value not shown" in message:  # may be a pasted secret: never echoed
            lines.append(f"  {key}: {message if 'value not shown' in message else message + '; value not shown'}")
        else:
            lines.append(f"  {key}: {message}{_shown(item.get('input'))}")
    return "\n".join(lines)


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML requires a mapping's keys to be unique; PyYAML keeps the last silently (``seed: 0`` then ``seed: 7``
    would run seed 7). This loader refuses a repeated key, naming it and both lines."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice (lines {seen[key]} and "
                                                        f"{key_node.start_mark.line + 1}): YAML keeps only one", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` laid over it, nested dicts merged key by key."""
    return {**base, **{key: merge_overrides(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
                       for key, value in overrides.items()}}


def key_paths(mapping: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of a nested mapping's leaves (``a.b.c``): names keys without showing values."""
    return [path for key, value in mapping.items() for path in (key_paths(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])]
