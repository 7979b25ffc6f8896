"""The run's offline report: `report/index.html`, one self-contained page (inline CSS, images by
relative path, no script, no network) whose every number is read from the run's files.

- run: `run_config.json`'s top-level settings; stage times: `stages/*.json`;
- every `report/*.json` other than `explain.json` (evaluate.json, extract.json, ...) drawn
  generically as tables, and every PNG under `report/` that explain did not draw, plus the plan's
  `plan/cells.png`;
- explain: its figures, per-layer specialisation, concept cells and the labelled experts.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterable
from pathlib import Path

from tinyonn.files import write_text_atomic

STAGE_ORDER = ("probe", "cluster", "assemble", "train", "evaluate", "explain", "release")
"""How stage records are listed (others follow, by name)."""
MISSING = "–"
"""What an empty table cell shows."""

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1280px;
       color: #1d2330; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { border-bottom: 2px solid #d9dee8; padding-bottom: .2em;
margin-top: 2em; } h3 { margin-bottom: .3em; }
table { border-collapse: collapse; margin: .5em 0 1.2em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d9dee8; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #eef1f6; } td.num { text-align: right; } tr:nth-child(even) td { background: #f8f9fb; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #d9dee8; }
figcaption { color: #5a6478; font-size: .9em; } .note { color: #5a6478; }
"""


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _is_flat(value) -> bool:
    """A scalar or a list of scalars: fits in one cell."""
    return _is_scalar(value) or (isinstance(value, list) and all(_is_scalar(v) for v in value))


def cell(value) -> str:
    """A JSON value as the (escaped) text of a table cell; never empty."""
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, int):
        text = f"{value:,}"
    elif isinstance(value, float):
        text = "NaN" if value != value else f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    elif isinstance(value, list):
        text = ", ".join(cell(v) for v in value)
    elif isinstance(value, dict):
        text = ", ".join(f"{k}: {cell(v)}" for k, v in value.items())
    else:
        text = "" if value is None else str(value)
    return html.escape(text) if text.strip() else MISSING


def table(header: list[str], rows: Iterable[list], caption: str | None = None) -> str:
    """An HTML table; numbers right-aligned, every cell filled (MISSING where a value is absent)."""
    lines = ["<table>"]
    if caption:
        lines.append(f"<caption>{html.escape(caption)}</caption>")
    lines.append("<tr>" + "".join(f"<th>{html.escape(str(h)) or MISSING}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = [f'<td class="num">{cell(v)}</td>' if isinstance(v, (int, float)) and not isinstance(v, bool)
                 else f"<td>{cell(v)}</td>" for v in row]
        cells += [f"<td>{MISSING}</td>"] * (len(header) - len(row))
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def json_tables(data, title: str) -> list[str]:
    """Any JSON value as tables: a dict's flat values as one key/value table, its dicts of flat
    values side by side (one column each, grouped by their keys), lists of records as record
    tables, and deeper values recursively under `title.key`."""
    if isinstance(data, list):
        if data and all(isinstance(item, dict) for item in data):
            header = list(dict.fromkeys(key for item in data for key in item))
            return [f"<h3>{html.escape(title)}</h3>", table(header, [[item.get(k) for k in header] for item in data])]
        return [f"<h3>{html.escape(title)}</h3>", table(["value"], [[data]])]
    if not isinstance(data, dict):
        return [f"<h3>{html.escape(title)}</h3>", table(["value"], [[data]])]
    out: list[str] = []
    flat = [(key, value) for key, value in data.items() if _is_flat(value)]
    if flat:
        out += [f"<h3>{html.escape(title)}</h3>", table(["field", "value"], [[k, v] for k, v in flat])]
    groups: dict[tuple, list[str]] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and all(_is_flat(v) for v in value.values()):
            groups.setdefault(tuple(value), []).append(key)
    for keys, names in groups.items():
        out += [f"<h3>{html.escape(title)}: {html.escape(', '.join(names))}</h3>",
                table(["key", *names], [[k, *(data[n][k] for n in names)] for k in keys])]
    grouped = {name for names in groups.values() for name in names}
    for key, value in data.items():
        if not _is_flat(value) and key not in grouped:
            out += json_tables(value, f"{title}.{key}")
    return out


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _stage_rows(run_dir: Path) -> list[list]:
    records = [r for r in (_read_json(p) for p in sorted((run_dir / "stages").glob("*.json"))) if isinstance(r, dict)]
    rank = {name: i for i, name in enumerate(STAGE_ORDER)}
    records.sort(key=lambda r: (rank.get(r.get("stage"), len(rank)), str(r.get("stage"))))
    rows = [[r.get("stage"), r.get("seconds"), r.get("outputs"), r.get("fingerprint")] for r in records]
    if rows:
        rows.append(["all", round(sum(float(r.get("seconds") or 0) for r in records), 2), MISSING, MISSING])
    return rows


def _figure(src: str, caption: str) -> str:
    return (f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _explain_section(explain: dict, report_dir: Path) -> list[str]:
    images = explain.get("images", {})
    captions = {
        "heatmap": "Experts × categories: share of each category's held-out tokens the model routes to the "
                   "expert ÷ the uniform rate k/E (top), mean |h| of its units (bottom).",
        "projection": f"Units by {explain.get('projection', {}).get('method', '?').upper()} of their "
                      f"{explain.get('projection', {}).get('features', 'features')}, coloured by concept cell.",
        "cell_layers": "Each concept cell's routed units per layer (its layer span).",
        "specialisation": "Specialisation per layer (OLMoE's measures) beside a uniform router.",
        "coactivation": "Co-activation: P(expert j selected | expert i selected), per layer.",
    }
    out = ["<h2>Explain</h2>",
           f"<p class=note>{explain.get('examples', MISSING)} held-out examples, "
           f"{explain.get('tokens', MISSING)} response tokens, model "
           f"<code>{html.escape(str(explain.get('model_dir')))}</code>; labels file: "
           f"{html.escape(str(explain.get('labels_file') or 'none'))}.</p>"]
    for key, src in images.items():
        if (report_dir / src).is_file():
            out.append(_figure(src, captions.get(key, key)))
    layers = explain.get("layers", [])
    if layers:
        header = ["layer", "experts", "mean_selected", "uniform_rate", "domain_share_max", "domain_peak_share",
                  "domain_peak_ratio",
                  "experts_2x_uniform", "token_specialisation", "coactivation_peak", "coactivation_uniform",
                  "never_selected"]
        out += ["<h3>Specialisation per layer</h3>", table(header, [[row.get(h) for h in header] for row in layers])]
    cells = explain.get("cells", [])
    if cells:
        header = ["cell", "first_layer", "last_layer", "span", "units", "experts", "dominant_category", "mean_score",
                  "units_per_layer"]
        out += ["<h3>Concept cells</h3>", table(header, [[row.get(h) for h in header] for row in cells])]
    experts = explain.get("experts", [])
    if experts:
        header = ["label", "units", "cell", "selected_rate", "dominant_categories", "domain_peak_ratio",
                  "token_specialisation", "top tokens", "top co-active"]
        rows = [[e.get("label"), e.get("units"), e.get("cell"), e.get("selected_rate"), e.get("dominant_categories"),
                 e.get("domain_peak_ratio"), e.get("token_specialisation"),
                 [repr(t["token"]) for t in e.get("top_tokens", [])],
                 f"{e['top_coactive']['expert']} ({e['top_coactive']['p']:.2f})" if e.get("top_coactive") else None]
                for e in experts]
        out += ["<h3>Experts</h3>", table(header, rows)]
    return out


def write_report(run_dir: str | Path) -> Path:
    """Write `report/index.html` from what the run folder holds now; returns its path."""
    run_dir = Path(run_dir)
    report_dir = run_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    body = [f"<h1>Tiny-ONN run <code>{html.escape(run_dir.name)}</code></h1>"]
    config = _read_json(run_dir / "run_config.json")
    if isinstance(config, dict):
        body += ["<h2>Run</h2>", table(["setting", "value"], [[k, v] for k, v in config.items() if _is_flat(v)])]
    stages = _stage_rows(run_dir)
    if stages:
        body += ["<h2>Stage times</h2>", table(["stage", "seconds", "outputs", "fingerprint"], stages)]
    figures = []
    if (run_dir / "plan" / "cells.png").is_file():
        cells_png = os.path.relpath(run_dir / "plan" / "cells.png", report_dir)
        figures.append(_figure(cells_png, "The plan's concept cells."))
    explain = _read_json(report_dir / "explain.json")
    drawn = set(explain.get("images", {}).values()) if isinstance(explain, dict) else set()
    for png in sorted(report_dir.rglob("*.png")):
        name = png.relative_to(report_dir).as_posix()
        if name not in drawn:
            figures.append(_figure(name, png.stem.replace("_", " ")))
    for path in sorted(report_dir.glob("*.json")):
        if path.name == "explain.json":
            continue
        data = _read_json(path)
        if data is not None:
            title = f"{html.escape(path.stem.capitalize())} <small class=note>({html.escape(path.name)})</small>"
            body += [f"<h2>{title}</h2>", *json_tables(data, path.stem)]
    if figures:
        body += ["<h2>Figures</h2>", *figures]
    if isinstance(explain, dict):
        body += _explain_section(explain, report_dir)
    page = ("<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n"
            f"<title>Tiny-ONN report: {html.escape(run_dir.name)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
    path = report_dir / "index.html"
    write_text_atomic(path, page)
    return path
