"""The run lock: what a run depended on, so that two runs can be told apart.

``lock.json`` in a run directory records, for the latest ``stackcomp run`` there: package
versions, Python, every seed in the resolved recipe, sha256 of the data files and of the
source model's files, the passes and where they come from, and the hardware. ``stackcomp
diff`` compares two locks field by field.

File hashes come from stackcomp.fingerprint, the same records stage keys are made from, and
its on-disk cache: a file whose path, size and times are unchanged is not hashed again.
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

from stackcomp.distributed import process_count
from stackcomp.fingerprint import HashCache, data_record, model_record, teacher_model
from stackcomp.rundir import LOCK, atomic_write_json

LOCK_SCHEMA = 1

#: distributions whose versions change results; plugin packages are added from the passes used
PACKAGES = ("stackcomp", "torch", "transformers", "tokenizers", "datasets", "accelerate", "safetensors",
            "huggingface-hub", "numpy", "scipy", "scikit-learn", "pydantic", "networkx", "bitsandbytes",
            "triton", "matplotlib")
#: environment variables that change threading, devices or data sources
ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "HF_HUB_OFFLINE",
            "HF_DATASETS_OFFLINE", "STACKCOMP_DATA_DIR")


def write_lock(run_dir: str | Path, plan: Any) -> dict[str, Any]:
    """Build the lock of ``plan`` and write it to ``run_dir/lock.json`` atomically."""
    run_dir = Path(run_dir)
    lock = build_lock(plan)
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


def build_lock(plan: Any) -> dict[str, Any]:
    recipe = plan.recipe
    cache = HashCache()
    lock = {
        "schema": LOCK_SCHEMA,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "recipe": {"name": recipe.name, "sha256": hashlib.sha256(recipe.to_yaml().encode()).hexdigest()},
        "stackcomp": {"version": _version("stackcomp"), "git_commit": _git_commit()},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation()},
        "packages": _packages(plan),
        "passes": _passes(plan),
        "seeds": seeds(plan),
        "data": data_record(recipe, cache),
        "model": model_record(recipe.model, cache),
        "teachers": _teachers(plan, cache),
        "hardware": hardware(),
        "processes": process_count(),  # > 1 under accelerate launch: training shards over them
        "env": {k: os.environ.get(k) for k in ENV_VARS},
        "stage_keys": {name: plan.stages[name].key for name in plan.order},
    }
    cache.save()
    return lock


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


# ----------------------------------------------------------------------------- inputs


def _teachers(plan: Any, cache: HashCache) -> dict[str, Any]:
    """Teachers named by model id (not by stage) are inputs too."""
    return {name: model_record(spec, cache) for name in plan.order
            if (spec := teacher_model(plan.stages[name]))}


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
