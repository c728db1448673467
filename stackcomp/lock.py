"""The run lock: what a run depended on, so that two runs can be told apart.

``lock.json`` in a run directory records, for the latest ``stackcomp run`` there: package
versions, Python, every seed in the resolved recipe, sha256 of the data files and of the
source model's files, the passes and where they come from, and the hardware. ``stackcomp
diff`` compares two locks field by field.

Hashing a large model at every run start would cost seconds, so a file whose path, size and
modification time match the previous lock keeps its recorded hash.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata as _md
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from stackcomp.rundir import LOCK, atomic_write_json

LOCK_SCHEMA = 1

#: distributions whose versions change results; plugin packages are added from the passes used
PACKAGES = ("stackcomp", "torch", "transformers", "tokenizers", "datasets", "accelerate", "safetensors",
            "huggingface-hub", "numpy", "scipy", "scikit-learn", "pydantic", "networkx", "bitsandbytes",
            "triton", "matplotlib")
#: environment variables that change threading, devices or data sources
ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "HF_HUB_OFFLINE",
            "HF_DATASETS_OFFLINE", "STACKCOMP_DATA_DIR")
_WEIGHT_GLOBS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")
_META_FILES = ("config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def write_lock(run_dir: str | Path, plan: Any) -> dict[str, Any]:
    """Build the lock of ``plan`` and write it to ``run_dir/lock.json`` atomically."""
    run_dir = Path(run_dir)
    lock = build_lock(plan, previous=read_lock(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / LOCK, lock)
    return lock


def read_lock(run_dir: str | Path) -> dict[str, Any] | None:
    """The lock of a run directory, or None if it has none (or it is unreadable)."""
    import json

    try:
        return json.loads((Path(run_dir) / LOCK).read_text())
    except (OSError, ValueError):
        return None


def build_lock(plan: Any, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    recipe = plan.recipe
    cache = _hash_cache(previous)
    return {
        "schema": LOCK_SCHEMA,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "recipe": {"name": recipe.name, "sha256": hashlib.sha256(recipe.to_yaml().encode()).hexdigest()},
        "stackcomp": {"version": _version("stackcomp"), "git_commit": _git_commit()},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation()},
        "packages": _packages(plan),
        "passes": _passes(plan),
        "seeds": seeds(plan),
        "data": data_files(recipe, cache),
        "model": model_files(recipe.model, cache),
        "teachers": _teachers(plan, cache),
        "hardware": hardware(),
        "env": {k: os.environ.get(k) for k in ENV_VARS},
        "stage_keys": {name: plan.stages[name].key for name in plan.order},
    }


# ----------------------------------------------------------------------------- versions and passes


def _version(dist: str) -> str | None:
    try:
        return _md.version(dist)
    except _md.PackageNotFoundError:
        return None


def _packages(plan: Any) -> dict[str, str | None]:
    out = {name: _version(name) for name in PACKAGES}
    for info in _passes(plan).values():
        if info.get("package") and info["package"] not in out:
            out[info["package"]] = info.get("package_version")
    return out


def _passes(plan: Any) -> dict[str, dict[str, Any]]:
    """Each pass used, by name: its class, version, and the package (and version) it comes from."""
    top_to_dist: dict[str, list[str]] | None = None
    out = {}
    for name in plan.order:
        stage = plan.stages[name]
        cls = stage.pass_cls
        top = cls.__module__.split(".")[0]
        if top == "stackcomp":
            dist = "stackcomp"
        else:  # a plugin: find its distribution (scanning all of them takes a few hundred ms)
            top_to_dist = top_to_dist if top_to_dist is not None else _md.packages_distributions()
            dist = (top_to_dist.get(top) or [None])[0]
        out[stage.pass_name] = {"class": f"{cls.__module__}:{cls.__qualname__}", "version": str(cls.version),
                                "package": dist, "package_version": _version(dist) if dist else None}
    return dict(sorted(out.items()))


def _git_commit() -> str | None:
    """The commit of the stackcomp checkout, if it is one (editable installs); '+dirty' if changed."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "stackcomp"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# ----------------------------------------------------------------------------- seeds


def seeds(plan: Any) -> dict[str, int]:
    """Every seed the run uses: the recipe's, the data options', and each stage's ``*seed`` params."""
    recipe = plan.recipe
    out = {"recipe": recipe.seed, "data": recipe.data_options().seed}
    for name in plan.order:
        params = plan.stages[name].params.model_dump(mode="json")
        for path, value in _find_seeds(params, f"stages.{name}.params"):
            out[path] = value
    return out


def _find_seeds(obj: Any, prefix: str):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str) and k.endswith("seed") and isinstance(v, int) and not isinstance(v, bool):
                yield f"{prefix}.{k}", v
            else:
                yield from _find_seeds(v, f"{prefix}.{k}")


# ----------------------------------------------------------------------------- file hashes


def _hash_cache(previous: dict[str, Any] | None) -> dict[tuple, str]:
    """(path, size, mtime_ns) -> sha256 from the previous lock's file entries."""
    cache: dict[tuple, str] = {}

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            if {"path", "bytes", "mtime_ns", "sha256"} <= obj.keys() and obj["sha256"]:
                cache[(obj["path"], obj["bytes"], obj["mtime_ns"])] = obj["sha256"]
            for v in obj.values():
                walk(v)

    walk(previous or {})
    return cache


def file_entry(path: Path, cache: dict[tuple, str] | None = None) -> dict[str, Any]:
    """Path, size, mtime and sha256 of one file (the hash reused from ``cache`` when unchanged)."""
    from stackcomp.artifacts import sha256_file

    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        return {"path": str(path), "error": e.strerror or str(e)}
    real = str(path.resolve())
    key = (real, st.st_size, st.st_mtime_ns)
    digest = (cache or {}).get(key)
    if digest is None:
        try:
            digest = sha256_file(path)
        except OSError as e:
            return {"path": real, "error": e.strerror or str(e)}
    return {"path": real, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}


def data_files(recipe: Any, cache: dict[tuple, str] | None = None) -> dict[str, Any]:
    """sha256 of the task's local TSVs (train and the evaluation split), or the hub dataset's identity."""
    if not recipe.task:
        return {"task": None}
    from stackcomp.data.glue import DATA_DIR_ENV, default_data_dir, get_task, local_path
    from stackcomp.errors import StackcompError

    try:
        task = get_task(recipe.task)
    except StackcompError as e:
        return {"task": recipe.task, "error": str(e)}
    opts = recipe.data_options()
    data_dir = opts.data_dir or default_data_dir()
    out: dict[str, Any] = {"task": task.name, "max_train_samples": opts.max_train_samples,
                           "max_eval_samples": opts.max_eval_samples, "max_length": opts.max_length}
    if data_dir is None:
        out.update({"source": "hub", "dataset": task.hub[0], "config": task.hub[1],
                    "note": f"loaded from the hub; set {DATA_DIR_ENV} to lock local files by hash"})
        return out
    out["source"] = "local"
    out["data_dir"] = str(Path(data_dir).expanduser().resolve())
    files = {}
    for split in ("train", opts.eval_split or "dev"):
        try:
            path = local_path(task, split, data_dir)
        except StackcompError as e:
            files[split] = {"error": str(e)}
            continue
        files[split] = file_entry(path, cache)
    out["files"] = files
    return out


def model_files(spec: str, cache: dict[tuple, str] | None = None) -> dict[str, Any]:
    """sha256 of a model's weight and config files (local folder, alias, or the hub cache)."""
    from stackcomp.errors import StackcompError
    from stackcomp.models import resolve_model_path

    out: dict[str, Any] = {"spec": spec}
    try:
        path = resolve_model_path(spec)
    except StackcompError as e:
        out["error"] = str(e)
        return out
    folder = Path(path)
    if folder.is_dir():
        out["source"] = "local"
    else:
        folder = _hub_snapshot(spec)
        out["source"] = "hub"
        if folder is None:
            out["note"] = "not in the local Hugging Face cache at run start; files not hashed"
            return out
        out["revision"] = folder.name
    out["path"] = str(folder.resolve())
    names = sorted({p.name for g in _WEIGHT_GLOBS for p in folder.glob(g)} |
                   {n for n in _META_FILES if (folder / n).is_file()})
    files = {n: file_entry(folder / n, cache) for n in names}
    out["files"] = files
    combined = hashlib.sha256()
    for n in names:
        combined.update(f"{n}\0{files[n].get('sha256')}\n".encode())
    out["sha256"] = combined.hexdigest() if names else None
    return out


def _hub_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the hub library refuses (e.g. a path that does not exist)
        return None
    return Path(found).parent if isinstance(found, str) else None


def _teachers(plan: Any, cache: dict[tuple, str]) -> dict[str, Any]:
    """Teachers named by model id (not by stage) are inputs too."""
    out = {}
    for name in plan.order:
        stage = plan.stages[name]
        param = stage.pass_cls.teacher_param
        teacher = getattr(stage.params, param, None) if param else None
        if isinstance(teacher, str) and teacher and not stage.teacher_stage:
            out[name] = model_files(teacher, cache)
    return out


# ----------------------------------------------------------------------------- hardware


def hardware() -> dict[str, Any]:
    """CPU model, cores, memory, torch threads, GPUs."""
    import torch

    out: dict[str, Any] = {
        "platform": platform.platform(), "machine": platform.machine(), "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_gb": _memory_gb(),
        "cuda": torch.version.cuda, "gpus": [],
    }
    if hasattr(os, "sched_getaffinity"):
        out["usable_cores"] = len(os.sched_getaffinity(0))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["gpus"].append({"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
                                "capability": f"{p.major}.{p.minor}"})
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None
