"""Trade-off plots for ``stackcomp compare``: task metric against size and against latency.

One marker and colour per method, the Pareto front drawn as a dashed staircase, the goal's
limits as dotted lines, the legend outside the data. PNG bytes come back so the HTML report
can embed them; the same bytes are written to files when asked. Matplotlib runs headless (Agg).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "8")
#: (row attribute, axis label, scale to display units, goal field)
AXES = {
    "bytes": ("model_bytes", "whole-model size (MB)", 1e-6, "max_bytes"),
    "latency": ("cpu_latency_ms", "CPU latency per batch (ms)", 1.0, "max_latency_ms"),
}
LABEL_ALL_UP_TO = 12  # with more points, only the Pareto-optimal ones get a text label


def metric_label(comparison: Any) -> str:
    metric = (comparison.metric_name or "metric").replace("_", " ")
    task = comparison.task or ""
    try:
        from stackcomp.tasks import get_task

        task = get_task(task).short_name if task else ""
    except Exception:  # a task this stackcomp does not know: show its name as given
        task = task.split("/")[-1]
    return f"{task} dev {metric} (%)" if task else f"{metric} (%)"


def tradeoff_png(comparison: Any, axis: str = "bytes") -> bytes | None:
    """The plot as PNG bytes, or None if no row has both the metric and the x quantity."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    attr, xlabel, scale, goal_field = AXES[axis]
    pareto_attr = "pareto_bytes" if axis == "bytes" else "pareto_latency"
    rows = [r for r in comparison.rows if r.metric is not None and getattr(r, attr) is not None]
    if not rows:
        return None
    if axis == "latency":
        sizes = {r.latency_batch_size for r in rows if r.latency_batch_size}
        if len(sizes) == 1:
            xlabel = f"CPU latency per batch of {int(next(iter(sizes)))} sequences (ms)"
    methods = list(dict.fromkeys(r.method for r in sorted(rows, key=lambda r: (r.method != "uncompressed", r.method))))
    style = {"font.size": 12, "axes.labelsize": 13, "axes.titlesize": 14, "legend.fontsize": 11,
             "xtick.labelsize": 11, "ytick.labelsize": 11}
    with plt.rc_context(style):
        fig, ax = plt.subplots(figsize=(10, 6), dpi=120)
        cmap = plt.get_cmap("tab10")
        for i, method in enumerate(methods):
            pts = [r for r in rows if r.method == method]
            uncompressed = method == "uncompressed"
            ax.scatter([getattr(r, attr) * scale for r in pts], [r.metric * 100 for r in pts],
                       marker="*" if uncompressed else MARKERS[i % len(MARKERS)],
                       s=260 if uncompressed else 90, color="black" if uncompressed else cmap(i % 10),
                       edgecolors="white", linewidths=0.8, zorder=3, label=method)
        front = sorted((r for r in rows if getattr(r, pareto_attr)), key=lambda r: getattr(r, attr))
        xs_all = [getattr(r, attr) * scale for r in rows]
        log_x = min(xs_all) > 0 and max(xs_all) / min(xs_all) > 20
        if log_x:
            ax.set_xscale("log")
        ax.margins(x=0.12, y=0.12)
        limits = sorted({r.goal[goal_field] for r in comparison.rows if r.goal and r.goal.get(goal_field)})
        unit = "MB" if axis == "bytes" else "ms"
        lo, hi = ax.get_xlim()
        for limit in limits:
            x = limit * scale
            if lo <= x <= hi:
                ax.axvline(x, color="tab:red", linestyle=":", linewidth=1.5, label=f"goal: ≤ {x:g} {unit}")
            else:  # keep the axis on the data; say where the limit lies
                side = "all points inside" if x > hi else "beyond every point"
                ax.plot([], [], " ", label=f"goal: ≤ {x:g} {unit} ({side})")
        if front:  # the staircase of the front, carried to the right edge (what it dominates lies below it)
            xs = [getattr(r, attr) * scale for r in front] + [hi]
            ys = [r.metric * 100 for r in front] + [front[-1].metric * 100]
            ax.step(xs, ys, where="post", linestyle="--", color="0.35", linewidth=1.5, zorder=2,
                    label="Pareto front")
        ax.set_xlim(lo, hi)
        label_rows = rows if len(rows) <= LABEL_ALL_UP_TO else front
        multi_run = len({r.run for r in rows}) > 1
        _label_points(fig, ax, [(getattr(r, attr) * scale, r.metric * 100, f"{r.run}/{r.leaf}" if multi_run
                                 else r.leaf) for r in label_rows])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric_label(comparison))
        what = "size" if axis == "bytes" else "latency"
        ax.set_title(f"{metric_label(comparison).split(' (')[0]} vs {what} — upper left is better")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, title="method",
                  frameon=False)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        plt.close(fig)
    return buf.getvalue()


def _label_points(fig: Any, ax: Any, points: list[tuple[float, float, str]]) -> None:
    """Text labels beside points, moved up in steps where they would overlap an earlier label."""
    fig.canvas.draw()
    placed: list[tuple[float, float]] = []  # label anchors in display pixels
    px_per_pt = fig.dpi / 72.0
    for x, y, text in sorted(points, key=lambda p: (p[1], p[0])):
        px, py = ax.transData.transform((x, y))
        dy = 6
        while any(abs(px - qx) < 90 * px_per_pt and abs(py + dy * px_per_pt - qy) < 12 * px_per_pt
                  for qx, qy in placed):
            dy += 12
        placed.append((px, py + dy * px_per_pt))
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(7, dy), fontsize=10, color="0.2",
                    arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6} if dy > 6 else None)


def write_plots(comparison: Any, folder: str | Path) -> dict[str, Path]:
    """``metric_vs_bytes.png`` and ``metric_vs_latency.png`` in ``folder`` (those with data)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for axis, png in all_plots(comparison).items():
        path = folder / f"metric_vs_{axis}.png"
        path.write_bytes(png)
        out[axis] = path
    return out


def all_plots(comparison: Any) -> dict[str, bytes]:
    out = {}
    for axis in AXES:
        png = tradeoff_png(comparison, axis)
        if png is not None:
            out[axis] = png
    return out
