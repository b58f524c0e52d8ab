"""Read a 1-4 rating out of a judge's reply: untrusted text, taken only where the rating is unambiguous.

JSON (bare, fenced or inside prose) or ``Rating: N``; several different ratings, a rating outside 1-4,
``3.5`` or ``4/5`` are not guessed at: ``parse_rating`` says why it found none.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable


RATINGS = (1, 2, 3, 4)


@dataclass(frozen=True)
class ParsedReply:
    rating: int | None
    evaluation: str
    problem: str | None  # why no rating was taken, when none was


_RATING_KEYS = ("rating", "total rating", "total_rating", "totalrating")


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


_THINKING = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


# "Rating: 3", "**Rating**: 3", '"Rating": "3"', "Total rating = 3/4", "rating of 3"
_RATING_TEXT = re.compile(r"""(?:total[\s_]*)?rating\W{0,4}?(?:\s*(?:[:=]|is|of))\s*["'*]*\s*(-?\d+(?:\.\d+)?)(\s*/\s*\d+)?""",
                          re.IGNORECASE)


def _json_objects(text: str) -> Iterable[Any]:
    """Every JSON object in ``text``: fenced blocks first, then each balanced ``{...}`` span."""
    spans = [match.group(1) for match in _FENCE.finditer(text)]
    depth, start = 0, None
    for index, char in enumerate(text):
        if char == "{":
            if depth == 0:
                start = index
            depth += 1
        elif char == "}" and depth:
            depth -= 1
            if depth == 0 and start is not None:
                spans.append(text[start : index + 1])
    for span in spans:
        try:
            yield json.loads(span)
        except (json.JSONDecodeError, ValueError):
            continue


def _finite(text_or_number: Any) -> float | None:
    """A finite float, or None: JSON's NaN, Infinity and 1e400, and integers past a float's range, are no rating."""
    try:
        number = float(text_or_number)
    except (OverflowError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _as_rating(value: Any) -> float | None:
    """A number from a JSON value: 3, 3.0, "3", "3/4"; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return _finite(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*4\s*)?", value)
        return _finite(match.group(1)) if match else None
    return None


def parse_rating(reply: Any) -> ParsedReply:
    """The rating a judge's reply gives, if exactly one can be read from it; never a guess, never an exception.

    JSON (bare, fenced, or inside prose) is read first, then ``Rating: N`` written as text. Several
    different ratings, a rating outside 1-4, a fraction (3.5), a non-finite number, or a scale other
    than /4 give no rating, with the reason. A reply that breaks the reader gives no rating either: at
    temperature 0 a rerun gets the same reply, so it must never stop the stage.
    """
    try:
        return _parse(reply)
    except Exception as error:  # noqa: BLE001  untrusted input: any failure is "no rating", with its kind
        return ParsedReply(None, "", f"unreadable reply ({type(error).__name__})")


def _parse(reply: Any) -> ParsedReply:
    if not isinstance(reply, str) or not reply.strip():
        return ParsedReply(None, "", "empty reply")
    text = _THINKING.sub("", reply).strip()
    found: list[float] = []
    evaluation = ""
    for obj in _json_objects(text):
        if not isinstance(obj, dict):
            continue
        lowered: dict[str, Any] = {}
        for key, value in obj.items():  # "Rating" and "rating " are one key to a reader: two values are two ratings
            normal = " ".join(str(key).lower().split())
            if normal in lowered and lowered[normal] != value:
                return ParsedReply(None, "", f"ambiguous: key {normal!r} given twice ({repr(lowered[normal])[:20]}, {repr(value)[:20]})")
            lowered[normal] = value
        for key in _RATING_KEYS:
            if key in lowered:
                number = _as_rating(lowered[key])
                if number is None:
                    return ParsedReply(None, "", f"rating {repr(lowered[key])[:40]} is not a number")
                found.append(number)
                break
        evaluation = evaluation or str(lowered.get("evaluation", ""))
    if not found:
        for match in _RATING_TEXT.finditer(text):
            scale = match.group(2)
            if scale and scale.replace("/", "").strip() != "4":
                return ParsedReply(None, "", f"rating given on another scale ({match.group(0).strip()!r})")
            number = _finite(match.group(1))
            if number is None:
                return ParsedReply(None, "", f"rating {match.group(1)[:20]!r} is not a finite number")
            found.append(number)
    if not found:
        return ParsedReply(None, "", "no rating found")
    distinct = sorted(set(found))
    if len(distinct) > 1:
        return ParsedReply(None, "", f"ambiguous: several ratings {[_tidy(v) for v in distinct]}")
    value = distinct[0]
    if value != int(value):
        return ParsedReply(None, "", f"rating {_tidy(value)} is not a whole number")
    if int(value) not in RATINGS:
        return ParsedReply(None, "", f"rating {_tidy(value)} is outside 1-4")
    return ParsedReply(int(value), evaluation or text, None)


def _tidy(value: float) -> int | float:
    return int(value) if value == int(value) else value
