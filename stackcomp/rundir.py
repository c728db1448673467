"""Run directories on disk: their file names, atomic writes, and finding one from a CLI argument.

A run directory (``runs/<recipe name>`` unless ``-o`` says otherwise) holds::

    recipe.resolved.yaml   the recipe after includes, overrides and sweeps
    lock.json              what the run depended on (stackcomp.lock)
    summary.json           every stage: key, parents, pass, status, metrics; failed and skipped
                           stages; written last, also when a stage failed
    logs/<stage>.log       what a stage logged; a failed stage's traceback
    artifacts/<key>/       one folder per stage (stackcomp.artifacts), or in a shared cache

This is the lowest layer: it imports only the standard library and ``stackcomp.errors``, so the
engine that writes runs and the reports that read them share one set of names without
importing each other.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from stackcomp.errors import ArtifactError, RecipeError

# ----------------------------------------------------------------------------- file names

#: in a run directory
SUMMARY = "summary.json"
RESOLVED_RECIPE = "recipe.resolved.yaml"
LOCK = "lock.json"
ARTIFACTS = "artifacts"
LOGS = "logs"
#: in a stage artifact (``artifacts/<key>/``)
STAGE = "stage.json"
METRICS = "metrics.json"
REPORT = "report.json"
TIMINGS = "timings.json"
CHECKSUMS = "CHECKSUMS.json"
MODEL_DIR = "model"
#: in a model folder (an artifact's ``model/``, or an export)
WEIGHTS = "model.safetensors"
MANIFEST = "stackcomp_manifest.json"
MODEL_CONFIG = "config.json"

#: kinds of folder stackcomp writes, and the files each must hold. Its ``CHECKSUMS.json`` lists
#: every one of them and every other file in the folder (tokenizer files, a pass's own files):
#: a required file not listed, a listed file missing or changed, a file not listed, or a
#: symbolic link anywhere makes the folder corrupt (stackcomp.artifacts.verify_folder)
STAGE_KIND = "stage"  # artifacts/<key>/; which of the two below, its stage.json says
STAGE_WITH_MODEL = "stage with model"  # a stage that saved its model in model/
STAGE_WITHOUT_MODEL = "stage without model"  # a stage that kept its parent's (stage.json: model_from)
EXPORT_KIND = "export"  # a model folder written by the export pass or stackcomp.save
MODEL_FILES = (WEIGHTS, MODEL_CONFIG, MANIFEST)
REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    STAGE_WITH_MODEL: (STAGE, METRICS, REPORT, TIMINGS, *(f"{MODEL_DIR}/{f}" for f in MODEL_FILES)),
    STAGE_WITHOUT_MODEL: (STAGE, METRICS, REPORT, TIMINGS),
    EXPORT_KIND: MODEL_FILES,
}

#: where ``stackcomp run`` puts runs without ``-o``
RUNS_ENV = "STACKCOMP_RUNS"
RECIPE_SUFFIXES = (".yaml", ".yml")


# ----------------------------------------------------------------------------- JSON and atomic writes


def json_default(o: Any) -> Any:
    """JSON for tensors, numpy scalars, paths and pydantic models (torch is not imported for it)."""
    torch = sys.modules.get("torch")  # no tensor can exist unless torch was imported
    if torch is not None and isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def dumps(obj: Any) -> str:
    """The JSON text stackcomp writes: indented, NaN allowed, one trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=False, default=json_default, allow_nan=True) + "\n"


def write_json(path: Path, obj: Any) -> None:
    """Plain write, for files inside a temporary artifact folder (renamed into place as a whole)."""
    Path(path).write_text(dumps(obj))


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"missing file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write, fsync, rename: after a kill ``path`` holds the old text or the new, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, dumps(obj))


# ----------------------------------------------------------------------------- one run directory


class RunDir:
    """The files of one run directory; ``artifacts_dir`` is a shared cache used instead of ``artifacts/``."""

    def __init__(self, path: str | Path, artifacts_dir: str | Path | None = None):
        self.path = Path(path)
        self.artifacts = Path(artifacts_dir) if artifacts_dir is not None else self.path / ARTIFACTS

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def resolved_recipe_path(self) -> Path:
        return self.path / RESOLVED_RECIPE

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK

    def stage_log_path(self, stage: str) -> Path:
        """``logs/<stage>.log``: the stage's log lines and, if it failed, its traceback."""
        return self.path / LOGS / f"{safe_file_name(stage)}.log"

    def has_summary(self) -> bool:
        return self.summary_path.is_file()

    def read_summary(self) -> dict[str, Any]:
        return read_json(self.summary_path)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.summary_path, summary)

    def write_resolved_recipe(self, text: str) -> None:
        atomic_write_text(self.resolved_recipe_path, text)

    def read_resolved_recipe(self) -> str:
        """The resolved recipe's text, or '' when the run has none (or it is unreadable)."""
        try:
            return self.resolved_recipe_path.read_text()
        except OSError:
            return ""

    def find_artifact(self, key: str, summary: dict[str, Any] | None = None) -> Path:
        """``<run>/artifacts/<key>``, or in the shared cache the run used (the summary's ``artifacts_dir``)."""
        roots = [self.artifacts]
        if summary and summary.get("artifacts_dir"):
            roots.append(Path(summary["artifacts_dir"]).expanduser())
        for root in roots:
            if (root / key).is_dir():
                return root / key
        return roots[-1] / key


# ----------------------------------------------------------------------------- finding a run


def safe_file_name(name: str) -> str:
    """``name`` as one file name: letters, digits and ``-_.`` kept, anything else ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def default_run_dir(recipe_name: str) -> Path:
    """Where ``stackcomp run`` puts a recipe's run without ``-o``: ``$STACKCOMP_RUNS/<name>``, always
    one folder inside it (a name like ``..`` would otherwise put the run outside)."""
    safe = safe_file_name(recipe_name)
    if not safe.strip("."):
        raise RecipeError(f"recipe name {recipe_name!r} cannot name a run folder inside "
                          f"{os.environ.get(RUNS_ENV, 'runs')}/; rename the recipe or give -o")
    return Path(os.environ.get(RUNS_ENV, "runs")) / safe


def recipe_name(path: str | Path, _depth: int = 0) -> str:
    """The ``name:`` of a recipe file, following ``include:`` as the recipe loader merges it
    (the file's own name wins, else the last included file's). Reads YAML only; plans nothing."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as e:
        raise RecipeError(f"cannot read recipe {path}: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with name, model, stages; got {type(data).__name__}")
    name = data.get("name")
    if isinstance(name, str) and name:
        return name
    includes = data.get("include")
    includes = [includes] if isinstance(includes, str) else includes if isinstance(includes, list) else []
    if _depth < 8:
        for inc in reversed([i for i in includes if isinstance(i, str)]):
            inc_path = Path(inc) if Path(inc).is_absolute() else path.parent / inc
            if inc_path.is_file():
                try:
                    return recipe_name(inc_path, _depth + 1)
                except RecipeError:
                    continue
    raise RecipeError(f"{path}: the recipe has no name")


def resolve_run_dir(target: str | Path) -> Path:
    """A run directory from a run directory, its ``summary.json``, or a recipe file that was run."""
    path = Path(target).expanduser()
    if path.is_file() and path.name == SUMMARY:
        path = path.parent
    if path.is_dir():
        if (path / SUMMARY).is_file():
            return path
        if (path / RESOLVED_RECIPE).exists() or (path / ARTIFACTS).exists():
            raise ArtifactError(f"{path} has no {SUMMARY}: its run did not finish; "
                                "run the recipe again to resume, then compare")
        raise ArtifactError(f"{path} is not a run directory (no {SUMMARY}); give a run directory "
                            "(runs/<recipe name>) or a recipe file that was run")
    if path.is_file():
        if path.suffix.lower() not in RECIPE_SUFFIXES:
            raise RecipeError(f"{path}: expected a run directory or a recipe (.yaml) file")
        name = recipe_name(path)
        run_dir = default_run_dir(name)
        if not (run_dir / SUMMARY).is_file():
            raise ArtifactError(f"recipe {path} (name {name!r}) has no finished run at {run_dir}; "
                                f"run it first: stackcomp run {path}  (or pass the run directory if it ran "
                                "elsewhere with -o)")
        return run_dir
    raise ArtifactError(f"no run directory or recipe file at {path}")
