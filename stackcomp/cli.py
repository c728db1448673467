"""The ``stackcomp`` command line (typer): run, validate, plan, passes, new-pass, compare, report, diff, search.

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
    help="artifact store shared by runs: a folder, file:///path or s3://bucket/prefix (object storage through "
         "s3fs; AWS_ENDPOINT_URL for MinIO and other S3-compatible servers; docs/cluster.md). Default: <run "
         "dir>/artifacts. Recipes with a common prefix then compute it once",
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
    cache: Optional[str] = CacheOpt,
    only: Optional[list[str]] = OnlyOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    debug: bool = typer.Option(False, "--debug", help="print the traceback of a failed stage (it is always in "
                                                      "<run dir>/logs/<stage>.log)"),
    executor: Optional[str] = typer.Option(None, "--executor", help="local (one stage at a time, the default) or "
                                           "ray (every ready stage at once on a Ray cluster; docs/cluster.md); "
                                           "default: the recipe's executor.kind"),
    address: Optional[str] = typer.Option(None, "--address", help="the Ray cluster: auto, ray://host:port or "
                                          "host:port (default: the recipe's executor.address, else a local Ray)"),
) -> None:
    """Run a recipe: every stage not already cached, then print the summary.

    A stage that fails is reported on one line (the traceback goes to its log file) and the stages
    that do not depend on it still run; the exit code is then 1, and a re-run retries only the
    failed and skipped stages. Exit code 2: the run could not start (or a disk filled up).
    """
    from stackcomp.api import run as run_recipe
    from stackcomp.distributed import is_main_process
    from stackcomp.rundir import SUMMARY

    _setup_logging(verbose)
    main = is_main_process()  # under accelerate launch only the main process shows and prints
    result = run_recipe(recipe, overrides or [], output, cache=cache, only=only or [],
                        progress=main and not as_json, console=console, executor=executor, address=address)
    summary = result.raw
    if not main:
        raise typer.Exit(1 if summary["failed"] else 0)
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")
    else:
        console.print(summary_table(summary, result.task))
        console.print(f"[dim]run directory: {result.run_dir}  ·  summary: {result.run_dir / SUMMARY}[/]",
                      highlight=False)
    if summary["failed"]:
        _report_failures(summary, debug)
        raise typer.Exit(1)


def _report_failures(summary: dict[str, Any], debug: bool) -> None:
    """One red line per failed stage (and the tracebacks with --debug); how many were skipped."""
    from rich.markup import escape

    for f in summary["failed"]:
        if debug and f.get("log"):
            try:
                err_console.print(escape(Path(f["log"]).read_text(encoding="utf-8", errors="replace")),
                                  highlight=False)
            except OSError:
                pass
        where = f"; traceback in {f['log']}" if f.get("log") else ""
        err_console.print(f"[bold red]error:[/] stage {one_line(repr(f['stage']))} ({one_line(f['pass'])}) failed: "
                          f"{one_line(f['error'])}{escape(where)}", highlight=False, soft_wrap=True)
    skipped = summary.get("skipped") or []
    if skipped:
        err_console.print(f"[yellow]{len(skipped)} stage(s) skipped[/]: {escape(', '.join(s['stage'] for s in skipped))}"
                          " (they need a failed stage); fix it and run the same command to retry them",
                          highlight=False, soft_wrap=True)


@app.command()
@user_errors
def validate(
    recipe: Path = typer.Argument(..., help="recipe YAML file"),
    overrides: Optional[list[str]] = OverridesArg,
) -> None:
    """Check a recipe, its plan and its inputs (task, data, model) without running anything."""
    from stackcomp.plan import check_inputs

    r, plan = _load(recipe, overrides)
    check_inputs(plan)
    console.print(f"[green]ok[/]: {recipe}: recipe {r.name!r}, {len(plan.stages)} stages, "
                  f"{len(plan.leaves())} leaves")


@app.command("plan")
@user_errors
def plan_cmd(
    recipe: Path = typer.Argument(..., help="recipe YAML file"),
    overrides: Optional[list[str]] = OverridesArg,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="run directory to check the cache in"),
    as_json: bool = typer.Option(False, "--json"),
    cache: Optional[str] = CacheOpt,
    only: Optional[list[str]] = OnlyOpt,
) -> None:
    """Draw the stage DAG, marking stages already cached in the run directory."""
    from rich.markup import escape
    from rich.tree import Tree

    from stackcomp.engine import Engine
    from stackcomp.plan import check_inputs

    r, plan = _load(recipe, overrides)
    plan = _select(plan, only)
    check_inputs(plan)
    status = Engine(plan, _run_dir(r.name, output), cache_dir=cache).status()
    if as_json:
        out = [{"stage": n, "pass": plan.stages[n].pass_name, "after": plan.stages[n].parents,
                "key": plan.stages[n].key, "status": status[n]} for n in plan.order]
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
        return
    tree = Tree(f"[bold]{escape(r.name)}[/]  [dim]model {escape(r.model)} · task {escape(str(r.task))}[/]")
    nodes: dict[str, Any] = {}
    for name in plan.order:
        st = plan.stages[name]
        mark = {"cached": "[green]cached[/]", "todo": "[yellow]to run[/]"}.get(status[name], f"[red]{status[name]}[/]")
        extra = f" [dim](also after {escape(', '.join(st.parents[1:]))})[/]" if len(st.parents) > 1 else ""
        teacher = f" [dim]teacher={escape(st.teacher_stage)}[/]" if st.teacher_stage else ""
        label = f"{escape(name)} [blue]{escape(st.pass_name)}[/] {mark} [dim]{st.key[:10]}[/]{extra}{teacher}"
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
    from pydantic import BaseModel
    from rich.markup import escape

    def rows(model: type[BaseModel], prefix: str, defaults: BaseModel | None) -> None:
        for fname, info in model.model_fields.items():
            # "stackcomp.data.augment.AugmentOptions | None" -> "AugmentOptions | None"
            ann = getattr(info.annotation, "__name__", None) or re.sub(r"\b(?:\w+\.)+(\w+)", r"\1",
                                                                       str(info.annotation))
            if defaults is not None:
                default_value = getattr(defaults, fname)
            else:
                default_value = None if info.is_required() else info.get_default(call_default_factory=True)
            nested = info.annotation if isinstance(info.annotation, type) else None
            if nested is not None and issubclass(nested, BaseModel) and isinstance(default_value, BaseModel):
                # a nested config (`train:`): one row per field, with the pass's own defaults
                table.add_row(escape(prefix + fname), ann, "", escape(info.description or ""))
                rows(nested, f"{prefix}{fname}.", default_value)
                continue
            default = "required" if defaults is None and info.is_required() else repr(default_value)
            table.add_row(escape(prefix + fname), escape(ann), escape(default), escape(info.description or ""))

    rows(cls.Params, "", None)
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
        raise RecipeError(f"goal option: {_format_validation(e, model=Goal)}") from None


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


MetricOpt = typer.Option(
    None, "--metric", help="the task metric that ranks the board and decides goals and Pareto fronts "
                           "(default: the task's main metric), e.g. f1, accuracy, spearmanr",
)


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
    metric: Optional[str] = MetricOpt,
) -> None:
    """Leaderboard of every leaf of the runs: metrics, size, latency, Pareto marks, goals.

    Exits 1 when goals are set (recipe `goal:` or options) and no stack meets them.
    """
    from stackcomp import render
    from stackcomp.report import compare as compare_fn

    _setup_logging(False)
    result = compare_fn(targets, goal=_goal_options(metric_drop, max_bytes, max_latency_ms), load_sizes=not no_load,
                        metric=metric)
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
    metric: Optional[str] = MetricOpt,
) -> None:
    """One run in depth: leaderboard, attribution, every pass's per-layer analysis, the resolved recipe."""
    from rich.syntax import Syntax

    from stackcomp import render
    from stackcomp.report import run_report

    _setup_logging(False)
    rep = run_report(target, load_sizes=not no_load, metric=metric)
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


@app.command()
@user_errors
def search(
    space_file: Path = typer.Argument(..., help="search space YAML: a recipe prefix plus a `search:` section"),
    trials: int = typer.Option(20, "--trials", "-n", min=0, help="trials to run to an outcome (complete, pruned or "
                               "failed), counting those of an earlier call in the same folder; 0: check the space only"),
    timeout: Optional[str] = typer.Option(None, "--timeout", help="stop starting trials after this long, e.g. 2h, "
                                          "90m (a running trial finishes)"),
    executor: str = typer.Option("local", "--executor", help="where trials run: local (in this process) or ray "
                                 "(each trial's stages on a Ray cluster, trials side by side; docs/cluster.md)"),
    address: Optional[str] = typer.Option(None, "--address", help="with --executor ray: auto, ray://host:port or "
                                          "host:port (default: a Ray started in this process)"),
    parallel: Optional[int] = typer.Option(None, "--parallel", "-j", min=1, help="trials at once (default: 1 "
                                           "locally, the cluster's CPUs on Ray)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="search folder (default: runs/search-<name>)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="sample --trials chains and check them with the planner; "
                                 "run nothing, write nothing"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Search for the best stack of passes under a goal (Optuna, multi-objective).

    Each trial is an ordinary recipe (DIR/trials/N.yaml) run in DIR/runs/N with the shared cache
    DIR/artifacts; DIR/study.db makes a killed search resume (run the same command again).
    Writes DIR/search.json, DIR/pareto/*.yaml, DIR/leaderboard.md and .html. See docs/search.md.
    """
    from rich.markup import escape

    from stackcomp.search import SearchPaths, load_space, parse_duration, run_search
    from stackcomp.search import dry_run as sample_only
    from stackcomp.search.output import rich_table, write_outputs

    if executor not in ("local", "ray"):
        raise StackcompError(f"--executor {executor!r}: expected local or ray")
    if address is not None and executor != "ray":
        raise StackcompError("--address is the Ray cluster's: give it with --executor ray")
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise StackcompError("stackcomp search needs Optuna: pip install 'stackcomp[search]'") from None
    _setup_logging(verbose)
    space = load_space(space_file)
    timeout_s = parse_duration(timeout)
    if dry_run or trials == 0:
        from stackcomp.plan import build_plan, check_inputs

        check_inputs(build_plan(space.recipe).select([space.spec.after]))
        samples = sample_only(space, trials) if dry_run else []
        table = Table(title=f"{escape(space.name)}: {len(samples)} sampled chains (nothing run)")
        for col in ("#", "chain", "params", "planner"):
            table.add_column(col)
        for s in samples:
            table.add_row(str(s.number), escape(" -> ".join(p for _, p, _ in s.chain) or "prefix only"),
                          escape("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in s.params.items())),
                          f"[red]rejected[/]: {escape(s.rejected)}" if s.rejected else "[green]ok[/]")
        if samples:
            console.print(table)
        valid = sum(s.rejected is None for s in samples)
        console.print(f"[green]ok[/]: {escape(str(space_file))}: {len(space.spec.slots)} slots, objectives "
                      f"{', '.join(space.spec.objectives)}" + (f"; {valid} of {len(samples)} sampled chains valid"
                                                               if samples else ""), highlight=False)
        return
    out = _run_dir(f"search-{space.name}", output)
    run = run_search(space, out, trials=trials, timeout_s=timeout_s, console=console,  # search.json after each trial
                     on_trial=lambda study: write_outputs(space, study, SearchPaths(out), leaderboard=False),
                     executor={"kind": "ray", "address": address} if executor == "ray" else None, parallel=parallel)
    result = write_outputs(space, run.study, run.paths)
    console.print(rich_table(result, space))
    if run.stopped:
        err_console.print(f"[yellow]stopped[/]: {escape(run.stopped)}", highlight=False)
    color = "green" if result.best is not None or space.goal is None else "red"
    console.print(f"[{color}]{escape(result.verdict)}[/]", highlight=False, soft_wrap=True)
    for line in result.versus_enqueued():
        console.print(escape(line), highlight=False, soft_wrap=True)
    console.print(f"[dim]search folder: {escape(str(out))} · search.json, pareto/, leaderboard.md, "
                  "leaderboard.html[/]", highlight=False)


def summary_metric_names(summary: dict[str, Any], task: Optional[str] = None) -> list[str]:
    """The task's metrics for the summary's columns: the main metric the stages recorded first."""
    from stackcomp.report import task_metrics

    mains = [(s.get("metrics") or {}).get("main_metric") for s in summary["stages"]]
    mains = list(dict.fromkeys(m for m in mains if isinstance(m, str)))
    return sorted(dict.fromkeys([*mains, *task_metrics(task)]), key=lambda n: n not in mains)


def summary_table(summary: dict[str, Any], task: Optional[str] = None) -> Table:
    """The run's stages with every metric of ``task`` (a column each), size, ratio and latency."""
    from rich.markup import escape

    names = summary_metric_names(summary, task)
    table = Table(title=f"{escape(str(summary['recipe']))} — {summary['seconds']:.1f}s")
    for col in ("stage", "pass", "status", "time", *(names or ["metric"]), "model MB", "linear ×", "latency ms"):
        table.add_column(escape(col), justify="right" if col not in ("stage", "pass", "status") else "left")
    for s in summary["stages"]:
        m = s["metrics"] or {}
        metric = [f"{m[n]:.4f}" if isinstance(m.get(n), (int, float)) else "" for n in names] or [""]
        mb = f"{m['model_bytes'] / 1e6:.2f}" if m.get("model_bytes") else ""
        ratio = f"{m['linear_ratio_bytes']:.2f}" if m.get("linear_ratio_bytes") else ""
        lat = f"{m['latency_ms_per_batch']:.1f}" if m.get("latency_ms_per_batch") else ""
        status = "[green]ran[/]" if s["status"] == "ran" else "[dim]cached[/]"
        table.add_row(escape(s["stage"]), escape(s["pass"]), status,
                      f"{s['seconds']:.1f}s" if s["status"] == "ran" else "", *metric, mb, ratio, lat)
    for f in summary.get("failed") or []:
        table.add_row(escape(f["stage"]), escape(f["pass"]), "[bold red]failed[/]", f"{f.get('seconds', 0):.1f}s",
                      f"[red]{escape(f['error'] or '')}[/]", "", "", "")
    for s in summary.get("skipped") or []:
        table.add_row(escape(s["stage"]), escape(s["pass"]), "[yellow]skipped[/]", "", escape(s["reason"] or ""),
                      "", "", "")
    return table


def main() -> None:
    app()


if __name__ == "__main__":
    main()
