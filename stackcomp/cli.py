"""The ``stackcomp`` command line (typer): run, validate, plan, passes, new-pass, compare, report, diff.

User mistakes print one clear line and exit with code 2; bugs keep their traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from stackcomp.errors import StackcompError

app = typer.Typer(
    name="stackcomp",
    help="Stack transformer compression techniques from a YAML recipe, and compare the stacks.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
passes_app = typer.Typer(help="List and describe the installed passes.", no_args_is_help=True)
app.add_typer(passes_app, name="passes")

console = Console(stderr=False)
err_console = Console(stderr=True)

OverridesArg = typer.Argument(None, help="key=value overrides, e.g. stages.ft.params.lr=3e-5; a,b,c sweeps")


def user_errors(fn: Callable) -> Callable:
    """Turn StackcompError into one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except StackcompError as e:
            err_console.print(f"[bold red]error:[/] {one_line(e)}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: finished stages are saved; run the same command again to resume")
            raise typer.Exit(130) from None

    return wrapper


def one_line(e: BaseException) -> str:
    """The message as one printable line, rich markup escaped (user text may hold ``[/]``)."""
    from rich.markup import escape

    text = " ".join(str(e).splitlines())
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates from YAML escapes
    return escape(text)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.INFO
    handler = RichHandler(console=err_console, show_path=False, rich_tracebacks=False, markup=False)
    root = logging.getLogger("stackcomp")
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("bitsandbytes", "accelerate", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(recipe: Path, overrides: Optional[list[str]]):
    from stackcomp.plan import build_plan
    from stackcomp.recipe import load_recipe

    r = load_recipe(recipe, overrides or [])
    return r, build_plan(r)


CacheOpt = typer.Option(
    None, "--cache", envvar="STACKCOMP_CACHE",
    help="artifact folder shared by runs (default: <run dir>/artifacts); recipes with a common prefix "
         "then compute it once",
)


OnlyOpt = typer.Option(
    None, "--only", help="run only these stages (comma list or repeated) with what they need: "
                         "ancestors, teachers, and their evaluate/export children",
)


def _select(plan: Any, only: Optional[list[str]]) -> Any:
    names = [n.strip() for item in (only or []) for n in item.split(",") if n.strip()]
    return plan.select(names) if names else plan


def _run_dir(recipe_name: str, output: Optional[Path]) -> Path:
    from stackcomp.rundir import default_run_dir

    return output if output is not None else default_run_dir(recipe_name)


@app.command()
@user_errors
def run(
    recipe: Path = typer.Argument(..., help="recipe YAML file"),
    overrides: Optional[list[str]] = OverridesArg,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="run directory (default: runs/<recipe name>)"),
    as_json: bool = typer.Option(False, "--json", help="print the run summary as JSON on stdout"),
    cache: Optional[Path] = CacheOpt,
    only: Optional[list[str]] = OnlyOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a recipe: every stage not already cached, then print the summary."""
    from stackcomp.engine import Engine
    from stackcomp.rundir import SUMMARY

    _setup_logging(verbose)
    r, full_plan = _load(recipe, overrides)
    plan = _select(full_plan, only)
    run_dir = _run_dir(r.name, output)
    engine = Engine(plan, run_dir, console=err_console if as_json else console,
                    show_progress=not as_json, cache_dir=cache, full_plan=full_plan)
    summary = engine.run()
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")
    else:
        console.print(summary_table(summary))
        console.print(f"[dim]run directory: {run_dir}  ·  summary: {run_dir / SUMMARY}[/]")


@app.command()
@user_errors
def validate(
    recipe: Path = typer.Argument(..., help="recipe YAML file"),
    overrides: Optional[list[str]] = OverridesArg,
) -> None:
    """Check a recipe and its plan without running anything."""
    r, plan = _load(recipe, overrides)
    console.print(f"[green]ok[/]: {recipe}: recipe {r.name!r}, {len(plan.stages)} stages, "
                  f"{len(plan.leaves())} leaves")


@app.command("plan")
@user_errors
def plan_cmd(
    recipe: Path = typer.Argument(..., help="recipe YAML file"),
    overrides: Optional[list[str]] = OverridesArg,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="run directory to check the cache in"),
    as_json: bool = typer.Option(False, "--json"),
    cache: Optional[Path] = CacheOpt,
    only: Optional[list[str]] = OnlyOpt,
) -> None:
    """Draw the stage DAG, marking stages already cached in the run directory."""
    from rich.markup import escape
    from rich.tree import Tree

    from stackcomp.engine import Engine

    r, plan = _load(recipe, overrides)
    plan = _select(plan, only)
    status = Engine(plan, _run_dir(r.name, output), cache_dir=cache).status()
    if as_json:
        out = [{"stage": n, "pass": plan.stages[n].pass_name, "after": plan.stages[n].parents,
                "key": plan.stages[n].key, "status": status[n]} for n in plan.order]
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
        return
    tree = Tree(f"[bold]{r.name}[/]  [dim]model {r.model} · task {r.task}[/]")
    nodes: dict[str, Any] = {}
    for name in plan.order:
        st = plan.stages[name]
        mark = {"cached": "[green]cached[/]", "todo": "[yellow]to run[/]"}.get(status[name], f"[red]{status[name]}[/]")
        extra = f" [dim](also after {escape(', '.join(st.parents[1:]))})[/]" if len(st.parents) > 1 else ""
        teacher = f" [dim]teacher={escape(st.teacher_stage)}[/]" if st.teacher_stage else ""
        label = f"{escape(name)} [blue]{st.pass_name}[/] {mark} [dim]{st.key[:10]}[/]{extra}{teacher}"
        parent = nodes.get(st.parents[0]) if st.parents else None
        nodes[name] = (parent or tree).add(label)
    console.print(tree)


@passes_app.command("list")
@user_errors
def passes_list() -> None:
    """The passes installed (built in and from plugins)."""
    from rich.markup import escape

    from stackcomp.passes.base import available_passes, broken_passes

    table = Table(title="stackcomp passes")
    table.add_column("name", style="bold")
    table.add_column("from")
    table.add_column("what it does")
    for name, cls in available_passes().items():
        doc = (cls.__doc__ or "").strip().splitlines()
        table.add_row(escape(name), escape(cls.__module__.split(".")[0]), escape(doc[0]) if doc else "")
    for name, why in broken_passes().items():  # installed, but recipes that name them get this reason
        table.add_row(f"[red]{escape(name)}[/]", "[red]unusable[/]", escape(why))
    console.print(table)


@passes_app.command("describe")
@user_errors
def passes_describe(name: str = typer.Argument(..., help="pass name")) -> None:
    """A pass's parameters, their types, defaults and descriptions."""
    from stackcomp.passes.base import get_pass

    cls = get_pass(name)
    console.print(f"[bold]{cls.name}[/] (version {cls.version}) — {cls.__module__}.{cls.__qualname__}")
    if cls.__doc__:
        console.print(cls.__doc__.strip())
    facts = []
    if cls.needs:
        facts.append("needs: " + ", ".join(sorted(cls.needs)))
    if cls.must_be_last:
        facts.append("must be the last pass that changes the model")
    for other, why in cls.forbid_after.items():
        facts.append(f"cannot follow {other}: {why}")
    for f in facts:
        console.print(f"[dim]·[/] {f}")
    table = Table(title="params")
    for col in ("name", "type", "default", "description"):
        table.add_column(col)
    for fname, field in cls.Params.model_fields.items():
        # "stackcomp.data.augment.AugmentOptions | None" -> "AugmentOptions | None"
        ann = getattr(field.annotation, "__name__", None) or re.sub(r"\b(?:\w+\.)+(\w+)", r"\1",
                                                                    str(field.annotation))
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        table.add_row(fname, ann, default, field.description or "")
    console.print(table)


@app.command("new-pass")
@user_errors
def new_pass(
    name: str = typer.Argument(..., help="pass name, e.g. my_prune"),
    output: Path = typer.Option(Path("."), "--output", "-o", help="folder to create the plugin package in"),
) -> None:
    """Write an installable plugin package skeleton for a new pass, with a passing test."""
    from stackcomp.scaffold import write_plugin

    folder = write_plugin(name, output)
    console.print(f"[green]created[/] {folder}\n  pip install -e {folder}\n  pytest {folder}")


def _goal_options(metric_drop: Optional[float], max_bytes: Optional[str], max_latency_ms: Optional[float]):
    if metric_drop is None and max_bytes is None and max_latency_ms is None:
        return None
    from pydantic import ValidationError

    from stackcomp.errors import RecipeError
    from stackcomp.recipe import Goal, _format_validation

    try:
        return Goal(metric_drop=metric_drop, max_bytes=max_bytes, max_latency_ms=max_latency_ms)
    except ValidationError as e:
        raise RecipeError(f"goal option: {_format_validation(e)}") from None


def _write_outputs(kind: str, data: Any, markdown: Optional[Path], html_file: Optional[Path],
                   plot_dir: Optional[Path]) -> None:
    """Plots (PNG files and embedded in HTML), markdown and HTML of a comparison or a run report."""
    from stackcomp import plots as plots_mod
    from stackcomp import render

    comparison = data if kind == "compare" else data["comparison"]
    pngs = plots_mod.all_plots(comparison) if (html_file or plot_dir or markdown) else {}
    links: dict[str, str] = {}
    if plot_dir is not None or markdown is not None:
        folder = plot_dir if plot_dir is not None else markdown.parent
        folder.mkdir(parents=True, exist_ok=True)
        for axis, png in pngs.items():
            path = folder / f"metric_vs_{axis}.png"
            path.write_bytes(png)
            links[axis] = os.path.relpath(path, markdown.parent) if markdown is not None else str(path)
            err_console.print(f"[dim]wrote {path}[/]")
    if markdown is not None:
        text = render.markdown_comparison(data, links) if kind == "compare" else render.markdown_report(data, links)
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(text)
        err_console.print(f"[dim]wrote {markdown}[/]")
    if html_file is not None:
        text = render.html_comparison(data, pngs) if kind == "compare" else render.html_report(data, pngs)
        html_file.parent.mkdir(parents=True, exist_ok=True)
        html_file.write_text(text)
        err_console.print(f"[dim]wrote {html_file}[/]")


@app.command()
@user_errors
def compare(
    targets: list[str] = typer.Argument(..., help="run directories, or recipe files that were run"),
    as_json: bool = typer.Option(False, "--json", help="print the leaderboard as JSON on stdout"),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="write a markdown report (plots beside it)"),
    html_file: Optional[Path] = typer.Option(None, "--html", help="write a self-contained HTML report"),
    plot_dir: Optional[Path] = typer.Option(None, "--plot-dir", help="write metric_vs_bytes/latency.png here"),
    metric_drop: Optional[float] = typer.Option(None, "--metric-drop", help="goal: max metric drop, points"),
    max_bytes: Optional[str] = typer.Option(None, "--max-bytes", help="goal: max model size, e.g. 20MB"),
    max_latency_ms: Optional[float] = typer.Option(None, "--max-latency-ms", help="goal: max CPU ms per batch"),
    no_load: bool = typer.Option(False, "--no-load", help="do not load stage models to size those not measured"),
) -> None:
    """Leaderboard of every leaf of the runs: metric, size, latency, Pareto marks, goals.

    Exits 1 when goals are set (recipe `goal:` or options) and no stack meets them.
    """
    from stackcomp import render
    from stackcomp.report import compare as compare_fn

    _setup_logging(False)
    result = compare_fn(targets, goal=_goal_options(metric_drop, max_bytes, max_latency_ms), load_sizes=not no_load)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2, default=str) + "\n")
    else:
        render.print_comparison(result, console)
    _write_outputs("compare", result, markdown, html_file, plot_dir)
    if result.exit_code:
        err_console.print(f"[red]{render.verdict(result)}[/]")
        raise typer.Exit(result.exit_code)


@app.command()
@user_errors
def report(
    target: str = typer.Argument(..., help="run directory, or a recipe file that was run"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON on stdout"),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="write a markdown report (plots beside it)"),
    html_file: Optional[Path] = typer.Option(None, "--html", help="write a self-contained HTML report"),
    plot_dir: Optional[Path] = typer.Option(None, "--plot-dir", help="write metric_vs_bytes/latency.png here"),
    no_load: bool = typer.Option(False, "--no-load", help="do not load stage models to size those not measured"),
) -> None:
    """One run in depth: leaderboard, attribution, every pass's per-layer analysis, the resolved recipe."""
    from rich.syntax import Syntax

    from stackcomp import render
    from stackcomp.report import run_report

    _setup_logging(False)
    rep = run_report(target, load_sizes=not no_load)
    if as_json:
        from stackcomp.report import _clean

        out = _clean({**rep, "comparison": rep["comparison"].to_json()})
        sys.stdout.write(json.dumps(out, indent=2, default=str) + "\n")
    else:
        render.print_comparison(rep["comparison"], console)
        render.print_stage_analysis(rep["stages"], console)
        console.rule("[bold]resolved recipe[/]")
        console.print(Syntax(rep["recipe_text"], "yaml", theme="ansi_dark"))
    _write_outputs("report", rep, markdown, html_file, plot_dir)


@app.command()
@user_errors
def diff(
    run_a: str = typer.Argument(..., help="run directory (or recipe file that was run) A"),
    run_b: str = typer.Argument(..., help="run directory (or recipe file that was run) B"),
    as_json: bool = typer.Option(False, "--json", help="print the differences as JSON on stdout"),
    no_load: bool = typer.Option(False, "--no-load", help="do not load stage models to size those not measured"),
) -> None:
    """What differs between two runs: environment and inputs (lock.json), recipe, results."""
    from stackcomp import render
    from stackcomp.report import diff_runs

    _setup_logging(False)
    d = diff_runs(run_a, run_b, load_sizes=not no_load)
    if as_json:
        sys.stdout.write(json.dumps(d, indent=2, default=str) + "\n")
        return
    console.print(f"[bold]A[/] {d['a']['run_dir']} ({d['a']['recipe']})\n[bold]B[/] {d['b']['run_dir']} ({d['b']['recipe']})")
    for note in d["notes"]:
        console.print(f"[yellow]note[/]: {note}")
    for table in render.rich_diff(d):
        console.print(table)


def summary_table(summary: dict[str, Any]) -> Table:
    from rich.markup import escape

    table = Table(title=f"{summary['recipe']} — {summary['seconds']:.1f}s")
    for col in ("stage", "pass", "status", "time", "metric", "model MB", "linear ×", "latency ms"):
        table.add_column(col, justify="right" if col not in ("stage", "pass", "status") else "left")
    for s in summary["stages"]:
        m = s["metrics"] or {}
        main = m.get("main_metric")
        metric = f"{main}={m[main]:.4f}" if main and isinstance(m.get(main), (int, float)) else ""
        mb = f"{m['model_bytes'] / 1e6:.2f}" if m.get("model_bytes") else ""
        ratio = f"{m['linear_ratio_bytes']:.2f}" if m.get("linear_ratio_bytes") else ""
        lat = f"{m['latency_ms_per_batch']:.1f}" if m.get("latency_ms_per_batch") else ""
        status = "[green]ran[/]" if s["status"] == "ran" else "[dim]cached[/]"
        table.add_row(escape(s["stage"]), s["pass"], status, f"{s['seconds']:.1f}s" if s["status"] == "ran" else "",
                      metric, mb, ratio, lat)
    return table


def main() -> None:
    app()


if __name__ == "__main__":
    main()
