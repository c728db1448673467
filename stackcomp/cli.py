"""The ``stackcomp`` command line (typer): run, validate, plan, passes, new-pass.

User mistakes print one clear line and exit with code 2; bugs keep their traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
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


def _run_dir(recipe_name: str, output: Optional[Path]) -> Path:
    if output is not None:
        return output
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in recipe_name)
    return Path(os.environ.get("STACKCOMP_RUNS", "runs")) / safe


@app.command()
@user_errors
def run(
    recipe: Path = typer.Argument(..., help="recipe YAML file"),
    overrides: Optional[list[str]] = OverridesArg,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="run directory (default: runs/<recipe name>)"),
    as_json: bool = typer.Option(False, "--json", help="print the run summary as JSON on stdout"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a recipe: every stage not already cached, then print the summary."""
    from stackcomp.engine import Engine

    _setup_logging(verbose)
    r, plan = _load(recipe, overrides)
    run_dir = _run_dir(r.name, output)
    engine = Engine(plan, run_dir, console=err_console if as_json else console,
                    show_progress=not as_json)
    summary = engine.run()
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")
    else:
        console.print(summary_table(summary))
        console.print(f"[dim]run directory: {run_dir}  ·  summary: {run_dir / 'summary.json'}[/]")


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
) -> None:
    """Draw the stage DAG, marking stages already cached in the run directory."""
    from rich.tree import Tree

    from stackcomp.engine import Engine

    r, plan = _load(recipe, overrides)
    status = Engine(plan, _run_dir(r.name, output)).status()
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
        extra = f" [dim](also after {', '.join(st.parents[1:])})[/]" if len(st.parents) > 1 else ""
        teacher = f" [dim]teacher={st.teacher_stage}[/]" if st.teacher_stage else ""
        label = f"{name} [blue]{st.pass_name}[/] {mark} [dim]{st.key[:10]}[/]{extra}{teacher}"
        parent = nodes.get(st.parents[0]) if st.parents else None
        nodes[name] = (parent or tree).add(label)
    console.print(tree)


@passes_app.command("list")
@user_errors
def passes_list() -> None:
    """The passes installed (built in and from plugins)."""
    from stackcomp.passes.base import available_passes

    table = Table(title="stackcomp passes")
    table.add_column("name", style="bold")
    table.add_column("from")
    table.add_column("what it does")
    for name, cls in available_passes().items():
        doc = (cls.__doc__ or "").strip().splitlines()
        table.add_row(name, cls.__module__.split(".")[0], doc[0] if doc else "")
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
        ann = getattr(field.annotation, "__name__", None) or str(field.annotation).replace("typing.", "")
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


def summary_table(summary: dict[str, Any]) -> Table:
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
        table.add_row(s["stage"], s["pass"], status, f"{s['seconds']:.1f}s" if s["status"] == "ran" else "",
                      metric, mb, ratio, lat)
    return table


def main() -> None:
    app()


if __name__ == "__main__":
    main()
