"""Readable expert labels: "L3·E5 — math digits", from an expert's dominant categories and the
token ids routed to it most specifically, or hand-written in an override file.

The override file is JSON mapping an expert to its text: `{"L3·E5": "arithmetic digits"}` (the
keys `L3.E5` and `3:5` work too); the label then reads "L3·E5 — arithmetic digits".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from tinyonn.errors import TinyONNError

DOMINANT_LIFT = 1.2
"""A category is dominant for an expert when its routing share is ≥ this × the expert's mean share."""
TOKEN_KINDS = ("digits", "punctuation", "spaces", "capitalised words")


def expert_name(layer: int, expert: int) -> str:
    return f"L{layer}·E{expert}"


def dominant_categories(share: np.ndarray, categories: tuple[str, ...], most: int = 2) -> list[str]:
    """The categories (at most `most`) whose share of this expert is ≥ DOMINANT_LIFT × its mean
    share over categories, strongest first. `share` [C] for one expert."""
    mean = share.mean()
    if mean <= 0:
        return []
    order = np.argsort(-share, kind="stable")
    return [categories[c] for c in order[:most] if share[c] >= DOMINANT_LIFT * mean]


def top_tokens(ids: np.ndarray, counts: np.ndarray, share: np.ndarray, rate: float, n: int) -> list[int]:
    """Rows of the `n` token ids most specific to one expert: ranked by how far the fraction of
    their occurrences routed to it (`share` [V]) exceeds its overall rate, then by count."""
    lift = share - rate
    order = np.lexsort((-counts, -lift))
    return [int(i) for i in order if share[i] > rate][:n]


def token_kind(texts: list[str]) -> str | None:
    """What most of these token texts are (one of TOKEN_KINDS), or None when they are mixed."""
    if not texts:
        return None
    kinds = []
    for text in texts:
        core = text.strip()
        if not core:
            kinds.append("spaces")
        elif core.isdigit():
            kinds.append("digits")
        elif not any(ch.isalnum() for ch in core):
            kinds.append("punctuation")
        elif core[0].isupper():
            kinds.append("capitalised words")
        else:
            kinds.append(None)
    best = max(TOKEN_KINDS, key=kinds.count)
    return best if kinds.count(best) * 2 > len(kinds) else None


def auto_label(dominant: list[str], token_texts: list[str]) -> str:
    """"math digits", "code ‘def’ ‘return’", "mixed": the dominant categories, then what the top
    tokens are (a kind when most share one, else the first two tokens quoted)."""
    what = "+".join(dominant) if dominant else "mixed"
    kind = token_kind(token_texts)
    if kind:
        return f"{what} {kind}"
    shown = [f"‘{text.strip() or text}’" for text in token_texts[:2]]
    return " ".join([what, *shown])


def load_overrides(path: str | Path | None) -> dict[tuple[int, int], str]:
    """(layer, expert) → hand-written label text from a JSON override file (none: {})."""
    if path is None:
        return {}
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise TinyONNError(f"label override file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise TinyONNError(f"{path}: not JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, dict):
        raise TinyONNError(f"{path}: expected an object mapping experts (\"L3·E5\" or \"3:5\") to labels")
    out = {}
    for key, text in data.items():
        match = re.fullmatch(r"\s*L?(\d+)\s*(?:·|\.|:|\s)\s*E?(\d+)\s*", str(key))
        if match is None or not isinstance(text, str) or not text.strip():
            raise TinyONNError(f"{path}: entry {key!r}: expected \"L3·E5\" (or \"3:5\") → a non-empty label")
        out[int(match.group(1)), int(match.group(2))] = text.strip()
    return out
