"""What a search leaves in its folder, read from the study: ``search.json`` (every trial), the
Pareto set as runnable recipes (``pareto/*.yaml``), the leaderboard of the completed trials
through ``compare``'s renderers (``leaderboard.md`` with ``img/*.png``, ``leaderboard.html``), and
the verdict: the best stack meeting the goal, or that none did with the nearest trials.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from stackcomp.rundir import atomic_write_json
from stackcomp.search.space import SearchSpace
from stackcomp.search.study import COMPLETE, INTERRUPTED, SearchPaths, outcome

#: nearest trials listed when none meets the goal
NEAREST = 3


@dataclass
class SearchOutcome:
    """The study summarised: every trial, the Pareto set, the best trial or the nearest ones."""

    trials: list[dict[str, Any]]
    pareto: list[int]
    best: int | None
    nearest: list[int] = field(default_factory=list)
    verdict: str = ""
    comparison: Any = None
    #: False when no trial met the goal and ``pareto`` is the front of all completed trials
    pareto_meets_goal: bool = True
    #: completed enqueued trial -> the searched (not enqueued) completed trials that dominate it
    beaten_by: dict[int, list[int]] = field(default_factory=dict)
    #: with three or more objectives, the same per pair of them ("metric+bytes" -> enqueued trial ->
    #: the searched trials that dominate it on those two): a win on accuracy and bytes that is slower
    beaten_on: dict[str, dict[int, list[int]]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"trials": self.trials, "pareto": self.pareto, "pareto_meets_goal": self.pareto_meets_goal,
                "best": self.best, "nearest": self.nearest, "verdict": self.verdict,
                "beaten_by": {str(k): v for k, v in self.beaten_by.items()},
                "beaten_on": {pair: {str(k): v for k, v in by.items()} for pair, by in self.beaten_on.items()}}

    def versus_enqueued(self) -> list[str]:
        """One line per enqueued stack that completed: which searched trials beat it, if any, on all
        the objectives and on each pair of them."""
        chains = {r["number"]: _record_chain(r) for r in self.trials}
        lines = []
        for n, by in self.beaten_by.items():
            line = f"enqueued trial {n} ({chains[n]}): " + (f"dominated by searched trial(s) {', '.join(map(str, by))}"
                                                             if by else "no searched trial dominates it")
            pairs = [f"{pair}: {', '.join(map(str, on[n]))}" for pair, on in self.beaten_on.items() if on.get(n)]
            if pairs and not by:
                line += "; on two objectives: " + "; ".join(pairs)
            lines.append(line)
        return lines


def trial_record(t: Any, paths: SearchPaths, retries: dict[int, int]) -> dict[str, Any]:
    """One trial for ``search.json``; ``retries``: trial number -> the trial that retried it."""
    a = t.user_attrs
    kind = a.get("outcome") or (INTERRUPTED if t.state.name == "FAIL" else t.state.name.lower())
    reason = a.get("reason")
    if kind == INTERRUPTED and t.number in retries:
        reason = (f"{reason}; " if reason else "the search was stopped while it ran; ") + \
            f"retried as trial {retries[t.number]}"
    rec = {
        "number": t.number, "state": t.state.name, "outcome": kind,
        "chain": [f"{c['slot']}={c['pass']}" for c in a.get("chain") or []],
        "stages": a.get("chain") or [], "params": dict(t.params), "values": t.values,
        "objectives": a.get("objectives"), "metric_name": a.get("metric_name"),
        "delta_points": a.get("delta_points"), "meets_goal": a.get("meets_goal"),
        "goal_failures": a.get("goal_failures"), "reason": reason, "retry_of": a.get("retry_of"),
        "enqueued": a.get("enqueued"),
    }
    if paths.trial_recipe(t.number).exists():
        rec["recipe"] = str(paths.trial_recipe(t.number))
        rec["run_dir"] = str(paths.run_dir(t.number))
    return rec


def summarize(space: SearchSpace, study: Any, paths: SearchPaths) -> SearchOutcome:
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    retries = {t.user_attrs["retry_of"]: t.number for t in trials if t.user_attrs.get("retry_of") is not None}
    records = [trial_record(t, paths, retries) for t in trials]
    done = [t for t in trials if outcome(t) == COMPLETE]
    # a repeated trial carries its earlier trial's values: the earlier one stands for both
    pareto = sorted(t.number for t in study.best_trials if outcome(t) == COMPLETE) if done else []
    pareto_meets_goal = True
    if done and not pareto:  # Optuna's front holds feasible trials only: none met the goal
        pareto = front(done, study.directions)
        pareto_meets_goal = False
    goal = space.goal
    best, nearest = None, []
    if not done:
        verdict = "no trial completed"
    elif goal is None:
        verdict = f"no goal set: the {len(pareto)} Pareto-optimal trial(s) are the answer (pareto/)"
    else:
        met = [t for t in done if t.user_attrs.get("meets_goal")]
        if met:
            best_t = max(met, key=lambda t: t.user_attrs["objectives"]["metric"] or -math.inf)
            best = best_t.number
            verdict = f"best stack meeting the goal: trial {best} ({_chain_text(best_t)})"
        else:
            near = sorted(done, key=lambda t: sum(max(c, 0.0) for c in (t.user_attrs.get("constraints") or {}).values()))
            nearest = [t.number for t in near[:NEAREST]]
            verdict = f"no trial meets the goal; nearest: {', '.join(_near_text(t) for t in near[:NEAREST])}"
            if pareto:
                verdict += f"; pareto/ holds the {len(pareto)} Pareto-optimal trial(s) of all, the goal aside"
    return SearchOutcome(records, pareto, best, nearest, verdict, pareto_meets_goal=pareto_meets_goal,
                         beaten_by=beaten_by(done, study.directions),
                         beaten_on=beaten_on_pairs(done, study.directions, space.spec.objectives))


def front(trials: list[Any], directions: list[Any]) -> list[int]:
    """The trials no other one dominates (equal values: the first stands for them)."""
    out = []
    for t in trials:
        if any(dominates(o.values, t.values, directions) for o in trials):
            continue
        if any(list(o.values) == list(t.values) and o.number < t.number for o in trials):
            continue
        out.append(t.number)
    return sorted(out)


def dominates(a: list[float], b: list[float], directions: list[Any]) -> bool:
    """``a`` is at least as good as ``b`` on every objective and better on one."""
    sign = [1.0 if str(getattr(d, "name", d)).lower() == "maximize" else -1.0 for d in directions]
    better_or_equal = all(s * x >= s * y for s, x, y in zip(sign, a, b))
    return better_or_equal and any(s * x > s * y for s, x, y in zip(sign, a, b))


def beaten_by(done: list[Any], directions: list[Any], on: tuple[int, ...] | None = None) -> dict[int, list[int]]:
    """For each completed enqueued trial (a hand-written stack), the completed searched trials
    that dominate it on the study's objectives (``on``: only those objectives, by index): did the
    search beat what its user wrote?"""
    idx = on if on is not None else tuple(range(len(directions)))
    dirs = [directions[i] for i in idx]

    def vals(t: Any) -> list[float]:
        return [t.values[i] for i in idx]

    enqueued = [t for t in done if t.user_attrs.get("enqueued") is not None]
    searched = [t for t in done if t.user_attrs.get("enqueued") is None]
    return {e.number: [t.number for t in searched if dominates(vals(t), vals(e), dirs)] for e in enqueued}


def beaten_on_pairs(done: list[Any], directions: list[Any], names: list[str]) -> dict[str, dict[int, list[int]]]:
    """:func:`beaten_by` on each pair of three or more objectives, keyed ``"metric+bytes"``: a
    searched stack can beat a hand-written one on accuracy and bytes and still be slower."""
    if len(names) < 3:
        return {}
    return {f"{names[i]}+{names[j]}": beaten_by(done, directions, on=(i, j))
            for i, j in combinations(range(len(names)), 2)}


def _record_chain(r: dict[str, Any]) -> str:
    """A search.json record's chain as text: its passes in order."""
    return " -> ".join(c.split("=", 1)[1] for c in r["chain"]) or "prefix only"


def _chain_text(t: Any) -> str:
    return " -> ".join(c["pass"] for c in t.user_attrs.get("chain") or []) or "prefix only"


def _near_text(t: Any) -> str:
    fails = t.user_attrs.get("goal_failures") or []
    return f"trial {t.number} ({_chain_text(t)}: {'; '.join(fails) or 'unknown'})"


def write_outputs(space: SearchSpace, study: Any, paths: SearchPaths, *, leaderboard: bool = True) -> SearchOutcome:
    """``search.json``, ``pareto/``, and (``leaderboard``) the compare board of the completed trials."""
    result = summarize(space, study, paths)
    if leaderboard:
        result.comparison = _leaderboard(space, paths, [r["number"] for r in result.trials
                                                        if r["outcome"] == COMPLETE])
    if paths.pareto.exists():
        shutil.rmtree(paths.pareto)
    paths.pareto.mkdir(parents=True)
    for n in result.pareto:
        shutil.copyfile(paths.trial_recipe(n), paths.pareto / f"trial-{n}.yaml")
    atomic_write_json(paths.search_json, {
        "space": space.source, "objectives": space.spec.objectives,
        "goal": space.goal.model_dump(exclude_none=True) if space.goal else None, **result.to_json()})
    return result


def _leaderboard(space: SearchSpace, paths: SearchPaths, numbers: list[int]) -> Any:
    """``compare`` over the completed trials' runs, written as markdown (plots in ``img/``) and HTML."""
    if not numbers:
        return None
    from stackcomp import plots, render
    from stackcomp.report import compare

    comparison = compare([paths.run_dir(n) for n in numbers], goal=space.goal, load_sizes=False,
                         metric=space.spec.metric)
    pngs = plots.all_plots(comparison)
    links = {}
    img = paths.root / "img"
    img.mkdir(parents=True, exist_ok=True)
    for axis, png in pngs.items():
        (img / f"metric_vs_{axis}.png").write_bytes(png)
        links[axis] = f"img/metric_vs_{axis}.png"
    title = f"stackcomp search: {space.name}"
    (paths.root / "leaderboard.md").write_text(render.markdown_comparison(comparison, links, title=title))
    (paths.root / "leaderboard.html").write_text(render.html_comparison(comparison, pngs))
    return comparison


def rich_table(result: SearchOutcome, space: SearchSpace) -> Any:
    """Every trial: outcome, chain, objectives, goal, Pareto mark, reason."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"stackcomp search: {escape(space.name)} — {len(result.trials)} trials")
    latency = any(isinstance((r["objectives"] or {}).get("latency"), (int, float)) for r in result.trials)
    for col in ("#", "outcome", "chain", "metric", "MB", *(["latency ms"] if latency else []), "goal", "Pareto",
                "reason"):
        table.add_column(col, justify="right" if col in ("#", "metric", "MB", "latency ms") else "left")
    colors = {"complete": "green", "pruned": "yellow", "failed": "red", "rejected": "magenta", "interrupted": "dim",
              "repeated": "dim"}
    for r in result.trials:
        o = r["objectives"] or {}
        goal = "" if r["meets_goal"] is None else ("[green]met[/]" if r["meets_goal"] else "[red]missed[/]")
        mark = "★" if r["number"] in result.pareto else ""
        if r["number"] == result.best:
            mark += " best"
        table.add_row(
            str(r["number"]), f"[{colors.get(r['outcome'], 'white')}]{r['outcome']}[/]",
            escape(_record_chain(r))
            + ("" if r.get("enqueued") is None else f" [dim](enqueued {r['enqueued']})[/]"),
            f"{o['metric'] * 100:.2f}" if isinstance(o.get("metric"), (int, float)) else "",
            f"{o['bytes'] / 1e6:.2f}" if isinstance(o.get("bytes"), (int, float)) else "",
            *([f"{o['latency']:.1f}" if isinstance(o.get("latency"), (int, float)) else ""] if latency else []),
            goal, mark, escape(r["reason"] or "; ".join(r["goal_failures"] or [])))
    return table
