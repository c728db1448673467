"""Showing comparisons, run reports and run diffs: rich tables, markdown, self-contained HTML.

The numbers come from :mod:`stackcomp.report`; this module only formats them. Metrics are
shown in percent (points), sizes in MB (10^6 bytes), latency in ms; a missing quantity is
``n/a``. HTML embeds its plots as base64 PNG, so the file stands alone.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
from typing import Any

NA = "n/a"


def _plain(*cells: Any) -> list[Any]:
    """Table cells as literal text: stage names from sweeps (``kd3[seed=1]``) look like rich markup."""
    from rich.markup import escape

    return [escape(c) if isinstance(c, str) else c for c in cells]


# ----------------------------------------------------------------------------- number formats


def pct(v: float | None) -> str:
    return NA if v is None else f"{v * 100:.2f}"


def pts(v: float | None) -> str:
    return NA if v is None else f"{v:+.2f}"


def mb(v: float | None) -> str:
    return NA if v is None else f"{v / 1e6:.2f}"


def dmb(v: float | None) -> str:
    return NA if v is None else f"{v / 1e6:+.2f}"


def ratio(v: float | None) -> str:
    return NA if v is None else f"{v:.2f}×"


def ms(v: float | None) -> str:
    return NA if v is None else f"{v:.1f}"


def dms(v: float | None) -> str:
    return NA if v is None else f"{v:+.1f}"


def secs(v: float | None) -> str:
    return NA if v is None else f"{v:.1f}"


def value(v: Any, width: int = 60) -> str:
    """Any JSON value, short: floats to 4 significant digits, long text cut."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v) \
            and len(v) <= 4:
        return "×".join(str(x) for x in v)
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


# ----------------------------------------------------------------------------- leaderboard model


def leaderboard_columns(comparison: Any, compact: bool = False) -> list[tuple[str, Any]]:
    """(header, row -> text) for the leaderboard: the ranking metric and its Δ, then every other
    metric of the task with its Δ in brackets. The same columns everywhere; ``compact`` (terminal)
    only shortens the Pareto and goal cells."""
    rows = comparison.rows
    cols: list[tuple[str, Any]] = []
    if len(comparison.runs) > 1:
        cols.append(("run", lambda r: r.run))
    cols += [
        ("leaf", lambda r: r.leaf),
        ("method", lambda r: r.method),
        (f"{comparison.metric_name or 'metric'} %", lambda r: pct(r.metric)),
        ("Δ pts", lambda r: pts(r.delta_points)),
    ]
    for name in comparison.metrics:
        if name != comparison.metric_name:
            cols.append((f"{name} % (Δ)", lambda r, n=name: _with_delta(pct(r.metrics.get(n)),
                                                                         pts(r.metric_deltas.get(n)))))
    cols += [
        ("vs", lambda r: "itself" if r.baseline == r.leaf else r.baseline),
        ("model MB", lambda r: mb(r.model_bytes)),
        ("linear MB", lambda r: mb(r.linear_bytes)),
        ("linear ×", lambda r: ratio(r.linear_ratio)),
        ("model ×", lambda r: ratio(r.model_ratio)),
        ("× parent", lambda r: ratio(r.parent_ratio)),
    ]
    cols.append(("CPU ms", lambda r: ms(r.cpu_latency_ms)))
    if any(r.gpu_latency_ms is not None for r in rows):
        cols.append(("GPU ms", lambda r: ms(r.gpu_latency_ms)))
    if any(r.ort_latency_ms is not None for r in rows):
        cols.append(("ORT ms", lambda r: ms(r.ort_latency_ms)))
    cols += [("compress s", lambda r: secs(r.compress_seconds)),
             ("Pareto", (lambda r: pareto_text(r, short=True)) if compact else pareto_text)]
    if comparison.goals_given:
        cols.append(("goal", (lambda r: "" if r.meets_goal is None else "✓" if r.meets_goal else "✗")
                     if compact else goal_text))
    return cols


def _row_name(comparison: Any, row: Any) -> str:
    return row.id if len(comparison.runs) > 1 else row.leaf


def pareto_text(row: Any, short: bool = False) -> str:
    marks = [name for name, on in (("size", row.pareto_bytes), ("latency", row.pareto_latency)) if on]
    if short:
        return "★" + "".join(m[0].upper() for m in marks) if marks else ""
    return "★ " + "+".join(marks) if marks else ""


def goal_text(row: Any) -> str:
    if row.meets_goal is None:
        return ""
    return "✓ meets" if row.meets_goal else "✗ " + "; ".join(row.goal_failures)


def attribution_columns() -> list[tuple[str, Any]]:
    """Per-stage columns: each value with its change against the previous model stage in brackets."""
    return [
        ("stage", lambda s: s.stage), ("pass", lambda s: s.pass_name),
        ("compresses", lambda s: "yes" if s.compresses else ""), ("s", lambda s: secs(s.seconds)),
        ("metric % (Δ pts)", lambda s: _with_delta(pct(s.metric), pts(s.d_metric_points))),
        ("model MB (Δ)", lambda s: _with_delta(mb(s.model_bytes), dmb(s.d_model_bytes))),
        ("linear MB (Δ)", lambda s: _with_delta(mb(s.linear_bytes), dmb(s.d_linear_bytes))),
        ("CPU ms (Δ)", lambda s: _with_delta(ms(s.cpu_latency_ms), dms(s.d_cpu_latency_ms))),
        ("sizes", lambda s: s.sizes_from or NA),
    ]


def seed_columns(comparison: Any) -> list[tuple[str, Any]]:
    """Columns of the over-seeds table (rows differing only in ``[seed=...]``)."""
    cols: list[tuple[str, Any]] = []
    if len(comparison.runs) > 1:
        cols.append(("run", lambda g: g.run))
    cols += [
        ("leaf", lambda g: g.name), ("seeds", lambda g: ",".join(g.seeds)),
        ("mean %", lambda g: pct(g.mean)), ("± std pts", lambda g: f"{g.std * 100:.2f}"),
        ("min–max %", lambda g: f"{pct(g.min)}–{pct(g.max)}"), ("mean vs", lambda g: pts(g.mean_delta_points)),
        ("each %", lambda g: " ".join(pct(v) for v in g.metrics)),
    ]
    return cols


SEED_NOTE = ("Rows that differ only in a swept seed, pooled: mean and sample standard deviation over seeds; a "
             "difference between two methods smaller than their spread is noise.")


def _with_delta(v: str, d: str) -> str:
    return v if d == NA or v == NA else f"{v} ({d})"


def goals_text(comparison: Any) -> list[str]:
    out = []
    for run in comparison.runs:
        goal = {k: v for k, v in (run.goal.model_dump() if run.goal else {}).items() if v is not None}
        if goal:
            out.append(f"{run.label}: " + ", ".join(_goal_item(k, v) for k, v in goal.items()))
    rows_goal = {json.dumps(r.goal, sort_keys=True) for r in comparison.rows if r.goal}
    if rows_goal and not out:
        out.append("command line: " + ", ".join(_goal_item(k, v) for k, v in json.loads(next(iter(rows_goal))).items()))
    return out


def _goal_item(k: str, v: float) -> str:
    if k == "max_bytes":
        return f"size ≤ {v / 1e6:g} MB"
    if k == "max_latency_ms":
        return f"CPU latency ≤ {v:g} ms"
    if k == "metric_drop":
        return f"metric drop ≤ {v:g} points"
    return f"{k}={v}"


def verdict(comparison: Any) -> str | None:
    if not comparison.goals_given:
        return None
    met = [r for r in comparison.rows if r.meets_goal]
    if not met:
        return "no stack meets the goal"
    return f"{len(met)} of {len(comparison.rows)} stacks meet the goal; best: {met[0].id}"


# ----------------------------------------------------------------------------- rich


def rich_leaderboard(comparison: Any):
    """The leaderboard for a terminal: the markdown/HTML columns; where they do not fit the width,
    the columns after the row names continue in further tables below (the names repeated)."""
    title = f"{comparison.task or ''} — {len(comparison.rows)} stacks, sorted by {comparison.metric_name or 'metric'}"
    cols = leaderboard_columns(comparison, compact=True)
    cells = [[fn(r) for _, fn in cols] for r in comparison.rows]
    styles = ["dim" if r.meets_goal is False else "bold" if (r.pareto_bytes or r.pareto_latency) else None
              for r in comparison.rows]
    return _FoldedTable(title, [h for h, _ in cols], cells, styles, keys=("run", "leaf"))


_TEXT_COLUMNS = ("run", "leaf", "method", "vs", "Pareto", "goal")


class _FoldedTable:
    """A rich table that splits its columns over as many stacked tables as the width needs, each
    repeating the ``keys`` columns, instead of squeezing numbers into one character per line."""

    def __init__(self, title: str, headers: list[str], cells: list[list[str]], styles: list[str | None],
                 keys: tuple[str, ...]):
        self.title, self.headers, self.cells, self.styles = title, headers, cells, styles
        self.keys = [i for i, h in enumerate(headers) if h in keys]

    def _width(self, i: int) -> int:
        """The column's width with its padding and divider: its header or its longest cell."""
        from rich.cells import cell_len

        return max(cell_len(self.headers[i]), *(cell_len(row[i]) for row in self.cells)) + 3

    def parts(self, max_width: int) -> list[list[int]]:
        """Column indices of each stacked table: the key columns, then as many others as fit."""
        base = sum(self._width(i) for i in self.keys) + 1
        parts: list[list[int]] = []
        used = max_width
        for i in (i for i in range(len(self.headers)) if i not in self.keys):
            if used + self._width(i) > max_width and (not parts or len(parts[-1]) > len(self.keys)):
                parts.append(list(self.keys))
                used = base
            parts[-1].append(i)
            used += self._width(i)
        return parts or [list(self.keys)]

    def table(self, columns: list[int], title: str | None):
        from rich.table import Table

        from rich import box

        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1))
        for i in columns:
            header = self.headers[i]
            table.add_column(header, justify="left" if header in _TEXT_COLUMNS else "right", overflow="fold",
                             no_wrap=header != "goal")
        for row, style in zip(self.cells, self.styles):
            table.add_row(*_plain(*[row[i] for i in columns]), style=style)
        return table

    def __rich_console__(self, console: Any, options: Any):
        parts = self.parts(options.max_width)
        for n, columns in enumerate(parts):
            title = self.title if n == 0 else f"(continued, {n + 1}/{len(parts)})"
            yield self.table(columns, title)


def rich_attribution(comparison: Any):
    from rich.table import Table

    from rich import box

    table = Table(title="per-stage attribution (each stage against the one before it on the path)",
                  title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1))
    table.add_column("leaf", no_wrap=True)
    cols = attribution_columns()
    for header, _ in cols:
        table.add_column(header, justify="left" if header in ("stage", "pass", "compresses", "sizes") else "right",
                         no_wrap=header in ("stage", "pass"))
    for r in comparison.rows:
        for i, step in enumerate(r.attribution):
            table.add_row(*_plain(_row_name(comparison, r) if i == 0 else "", *[fn(step) for _, fn in cols]))
        table.add_section()
    return table


def rich_seed_table(comparison: Any):
    from rich.table import Table

    from rich import box

    table = Table(title="over seeds", caption=SEED_NOTE, title_justify="left", caption_justify="left",
                  box=box.SIMPLE_HEAD, padding=(0, 1))
    cols = seed_columns(comparison)
    for header, _ in cols:
        table.add_column(header, justify="left" if header in ("run", "leaf", "seeds", "each %") else "right")
    for g in comparison.seed_groups:
        table.add_row(*_plain(*[fn(g) for _, fn in cols]))
    return table


def print_comparison(comparison: Any, console: Any, attribution: bool = True) -> None:
    from rich.markup import escape

    console.print(rich_leaderboard(comparison))
    for g in goals_text(comparison):
        console.print(f"[dim]goal[/] {g}")
    v = verdict(comparison)
    if v:
        console.print(("[green]" if comparison.any_goal_met else "[red]") + v + "[/]")
    for note in comparison.notes:
        console.print(f"[yellow]note[/]: {note}")
    failing = [r for r in comparison.rows if r.meets_goal is False]
    for r in failing:
        console.print(f"[dim]✗ {escape(r.id)}: {escape('; '.join(r.goal_failures))}[/]")
    if comparison.seed_groups:
        console.print(rich_seed_table(comparison))
    if attribution:
        console.print(rich_attribution(comparison))
    console.print("[dim]metrics in %; Δ pts against the uncompressed parent (vs: the stage before the first "
                  "compressing one); MB = 10^6 bytes; linear ×, model × against the fp32 dense bytes of that parent "
                  "(removed layers count), × parent against its bytes; ★ Pareto-optimal for S(ize) / L(atency)[/]")


def print_stage_analysis(stages: list[dict[str, Any]], console: Any) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    for st in stages:
        blocks = analysis_blocks(st["report"])
        if not blocks:
            continue
        console.rule(f"[bold]{escape(st['stage'])}[/] [dim]{escape(st['pass'])} · {st['seconds']:.1f}s[/]")
        for b in blocks:
            table = Table(title=b["title"], title_justify="left", show_header=b["kind"] == "table",
                          box=box.SIMPLE_HEAD, padding=(0, 1))
            for c in b["columns"]:
                table.add_column(c, overflow="fold")
            for row in b["rows"]:
                table.add_row(*_plain(*row))
            console.print(table)
            if b.get("note"):
                console.print(f"[dim]{b['note']}[/]")


def rich_diff(d: dict[str, Any]):
    from rich.table import Table

    out = []
    for section, title in (("lock", "environment and inputs (lock.json)"), ("recipe", "resolved recipe"),
                           ("results", "results per leaf")):
        items = d[section]
        table = Table(title=f"{title}: {len(items)} difference(s)", title_justify="left")
        if section == "results":
            table.add_column("leaf")
        for c in ("field", "A", "B"):
            table.add_column(c, overflow="fold")
        for it in items:
            cells = [value(it["field"], 80), _side(it, "a"), _side(it, "b")]
            table.add_row(*_plain(*([it["leaf"]] if section == "results" else []), *cells))
        out.append(table)
    return out


def _side(item: dict[str, Any], side: str) -> str:
    if item.get("only_in") and item["only_in"] != side:
        return "(absent)"
    return value(item[side])


# ----------------------------------------------------------------------------- per-stage analysis


def analysis_blocks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """A stage's report.json as titled blocks: key/value lists, tables (per layer, history), lists."""
    merged = {**(report.get("analyze") or {}), **{k: v for k, v in report.items() if k != "analyze"}}
    scalars, blocks = [], []
    for key, v in merged.items():
        warn = "warn" in key.lower() or "worse" in key.lower()
        title = ("⚠ " if warn and v else "") + key.replace("_", " ")
        if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
            cols = list(dict.fromkeys(c for x in v.values() for c in x))
            prefix = _common_prefix([str(n) for n in v])
            blocks.append({"title": f"{title} ({len(v)})", "kind": "table", "columns": ["name", *cols],
                           "rows": [[str(n)[len(prefix):], *[value(x.get(c), 30) for c in cols]] for n, x in v.items()],
                           "note": f"names after {prefix}" if prefix else None})
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            shown = v[-10:]
            cols = list(dict.fromkeys(c for x in shown for c in x))
            blocks.append({"title": f"{title} ({len(v)})", "kind": "table", "columns": cols,
                           "rows": [[value(x.get(c), 30) for c in cols] for x in shown],
                           "note": f"last 10 of {len(v)}" if len(v) > 10 else None})
        elif isinstance(v, list):
            blocks.append({"title": f"{title} ({len(v)})", "kind": "list", "columns": ["value"],
                           "rows": [[", ".join(value(x, 80) for x in v[:30]) + (" …" if len(v) > 30 else "")]]
                           if v else [["none"]]})
        elif isinstance(v, dict):
            flat = _flat(v)
            blocks.append({"title": title, "kind": "kv", "columns": ["key", "value"],
                           "rows": [[k, value(x)] for k, x in flat.items()] or [["—", "empty"]]})
        else:
            scalars.append([key, value(v)])
    if scalars:
        blocks.insert(0, {"title": "summary", "kind": "kv", "columns": ["key", "value"], "rows": scalars})
    return blocks


def _common_prefix(names: list[str]) -> str:
    """The dotted prefix all names share (``bert.encoder.layer.``), kept short in tables."""
    if len(names) < 2:
        return ""
    parts = [n.split(".") for n in names]
    common = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    if len(common) >= min(len(p) for p in parts):
        common = common[:-1]  # never swallow a whole name
    return ".".join(common) + "." if common else ""


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


# ----------------------------------------------------------------------------- markdown


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_comparison(comparison: Any, plots: dict[str, str] | None = None, title: str = "stackcomp compare",
                        attribution: bool = True) -> str:
    """Markdown: leaderboard, goals, plots (links to PNG files), attribution."""
    cols = leaderboard_columns(comparison)
    parts = [f"# {title}", "", _subtitle(comparison), ""]
    parts.append(md_table([h for h, _ in cols], [[fn(r) for _, fn in cols] for r in comparison.rows]))
    parts += ["", f"Metrics in %, ranked by {comparison.metric_name or 'n/a'}; Δ pts against the uncompressed "
              "parent (column *vs*); MB = 10^6 bytes; *linear ×*, *model ×* against the fp32 dense bytes of that "
              "parent (removed layers count), *× parent* against its bytes; ★ Pareto-optimal.", ""]
    for note in comparison.notes:
        parts.append(f"- note: {note}")
    for g in goals_text(comparison):
        parts.append(f"- goal {g}")
    v = verdict(comparison)
    if v:
        parts += [f"- **{v}**", ""]
    for axis, link in (plots or {}).items():
        parts += [f"![metric vs {axis}]({link})", ""]
    if comparison.seed_groups:
        cols_s = seed_columns(comparison)
        parts += ["## Over seeds", "", SEED_NOTE, "",
                  md_table([h for h, _ in cols_s], [[fn(g) for _, fn in cols_s] for g in comparison.seed_groups]), ""]
    if attribution:
        parts += ["## Per-stage attribution", ""]
        cols_a = attribution_columns()
        rows = [[_row_name(comparison, r) if i == 0 else "", *[fn(s) for _, fn in cols_a]]
                for r in comparison.rows for i, s in enumerate(r.attribution)]
        parts += [md_table(["leaf", *[h for h, _ in cols_a]], rows), ""]
    return "\n".join(parts) + "\n"


def markdown_report(rep: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    c = rep["comparison"]
    parts = [markdown_comparison(c, plots, title=f"stackcomp report: {c.runs[0].name}")]
    parts.append("## Per-stage analysis\n")
    for st in rep["stages"]:
        blocks = analysis_blocks(st["report"])
        if not blocks:
            continue
        parts.append(f"### {st['stage']} ({st['pass']}, {st['seconds']:.1f}s)\n")
        for b in blocks:
            parts.append(f"**{b['title']}**\n")
            parts.append(md_table(b["columns"], b["rows"]) + "\n")
            if b.get("note"):
                parts.append(f"_{b['note']}_\n")
    parts.append("## Resolved recipe\n\n```yaml\n" + rep["recipe_text"].rstrip() + "\n```\n")
    return "\n".join(parts)


def _subtitle(comparison: Any) -> str:
    runs = ", ".join(f"`{r.label}` ({r.dir})" for r in comparison.runs)
    metrics = ", ".join(comparison.metrics) or "n/a"
    return (f"Task {comparison.task or 'n/a'}, ranked by {comparison.metric_name or 'n/a'} "
            f"(metrics: {metrics}); runs: {runs}.")


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1300px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.3em;margin-top:1.6em;border-bottom:1px solid #ddd}h3{font-size:1.1em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .55em;text-align:right;vertical-align:top}
th{background:#f3f3f3}td.l,th.l{text-align:left}
tr.pareto td{font-weight:600}tr.fail td{color:#888}
.ok{color:#1a7f37;font-weight:600}.bad{color:#b42318;font-weight:600}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em}.note{color:#666;font-size:.9em}
"""
_LEFT = {"run", "leaf", "method", "vs", "Pareto", "goal", "stage", "pass", "compresses", "sizes", "name", "key",
         "value", "field", "A", "B"}


def html_table(headers: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    e = html.escape
    head = "".join(f'<th class="{"l" if h in _LEFT else ""}">{e(h)}</th>' for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        cells = "".join(f'<td class="{"l" if headers[j] in _LEFT else ""}">{e(str(c))}</td>'
                        for j, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _html_comparison(comparison: Any, plots: dict[str, bytes], attribution: bool = True) -> list[str]:
    e = html.escape
    cols = leaderboard_columns(comparison)
    classes = ["fail" if r.meets_goal is False else "pareto" if (r.pareto_bytes or r.pareto_latency) else ""
               for r in comparison.rows]
    out = [f"<p>{e(_subtitle(comparison))}</p>", "<h2>Leaderboard</h2>",
           html_table([h for h, _ in cols], [[fn(r) for _, fn in cols] for r in comparison.rows], classes),
           f'<p class="note">Metrics in %, ranked by {e(comparison.metric_name or "n/a")}; Δ pts against the '
           "uncompressed parent (column <i>vs</i>); MB = 10^6 bytes; <i>linear ×</i>, <i>model ×</i> against the "
           "fp32 dense bytes of that parent (removed layers count), <i>× parent</i> against its bytes; "
           "★ Pareto-optimal (bold rows).</p>"]
    for note in comparison.notes:
        out.append(f'<p class="bad">note: {e(note)}</p>')
    goals = goals_text(comparison)
    if goals:
        out.append("<ul>" + "".join(f"<li>goal {e(g)}</li>" for g in goals) + "</ul>")
        v = verdict(comparison)
        out.append(f'<p class="{"ok" if comparison.any_goal_met else "bad"}">{e(v or "")}</p>')
    if plots:
        out.append("<h2>Trade-offs</h2>")
        for axis, png in plots.items():
            b64 = base64.b64encode(png).decode("ascii")
            out.append(f'<img alt="metric vs {e(axis)}" src="data:image/png;base64,{b64}">')
    if comparison.seed_groups:
        cols_s = seed_columns(comparison)
        out += ["<h2>Over seeds</h2>", f'<p class="note">{e(SEED_NOTE)}</p>',
                html_table([h for h, _ in cols_s], [[fn(g) for _, fn in cols_s] for g in comparison.seed_groups])]
    if attribution:
        cols_a = attribution_columns()
        rows = [[_row_name(comparison, r) if i == 0 else "", *[fn(s) for _, fn in cols_a]]
                for r in comparison.rows for i, s in enumerate(r.attribution)]
        out += ["<h2>Per-stage attribution</h2>",
                '<p class="note">Each stage against the model stage before it on the path; "computed" sizes come '
                "from the stage's saved weights, \"measured\" ones from an evaluate stage.</p>",
                html_table(["leaf", *[h for h, _ in cols_a]], rows)]
    return out


def _html_page(title: str, body: list[str]) -> str:
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class=\"note\">generated by stackcomp on {when}</p>\n" + "\n".join(body) + "\n</body></html>\n")


def html_comparison(comparison: Any, plots: dict[str, bytes]) -> str:
    return _html_page("stackcomp compare", _html_comparison(comparison, plots))


def html_report(rep: dict[str, Any], plots: dict[str, bytes]) -> str:
    e = html.escape
    c = rep["comparison"]
    body = _html_comparison(c, plots)
    body.append("<h2>Per-stage analysis</h2>")
    for st in rep["stages"]:
        blocks = analysis_blocks(st["report"])
        if not blocks:
            continue
        body.append(f"<h3>{e(st['stage'])} <small>({e(st['pass'])}, {st['seconds']:.1f}s)</small></h3>")
        for b in blocks:
            body.append(f"<p><b>{e(b['title'])}</b></p>" + html_table(b["columns"], b["rows"]))
            if b.get("note"):
                body.append(f'<p class="note">{e(b["note"])}</p>')
    body.append("<h2>Resolved recipe</h2><pre>" + e(rep["recipe_text"]) + "</pre>")
    if rep.get("lock"):
        body.append("<h2>Lock</h2><pre>" + e(json.dumps(rep["lock"], indent=2)) + "</pre>")
    return _html_page(f"stackcomp report: {c.runs[0].name}", body)
