"""The identity of a run's inputs: sha256 of the task's data files and of the source model's files.

Stage keys (stackcomp.plan) and the run lock (stackcomp.lock) both need it. Each input is
described twice: a *record* (paths, sizes, mtimes and hashes, for lock.json) and its *identity*
(what a key hashes: the content only, never where it lies, so a copy of the same data at
another path shares the cache and a changed byte does not).

Hashing a 300 MB training file or a 400 MB model at every plan would cost seconds, so a file's
sha256 is cached on disk by (real path, size, mtime, ctime): an unchanged file is only
``stat``-ed. The ctime is there because a program can set a file's mtime back after changing
it, but not its ctime; and a file changed in the last two seconds is not cached at all, since a
second change within the file system's timestamp granularity would leave its times equal. The
cache is one JSON file (``$STACKCOMP_HASH_CACHE``, default ``~/.cache/stackcomp/file-hashes.json``),
written atomically and merged with what other processes wrote meanwhile, so concurrent runs at
worst rehash a file.

Inputs that cannot be hashed get a marker instead of a hash: ``"missing"`` (a local file or
model that is not there; the plan-time checks refuse those) or ``"unresolved"`` (a hub model or
dataset not in the local Hugging Face cache, so its revision is unknown before it is
downloaded); :meth:`Inputs.unresolved` says which, for a log line, since such a key cannot tell
two hub revisions apart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stackcomp.rundir import atomic_write_json

log = logging.getLogger("stackcomp.fingerprint")

HASH_CACHE_ENV = "STACKCOMP_HASH_CACHE"
CACHE_SCHEMA = 1
#: a file changed this recently is not cached: a second write within the file system's timestamp
#: granularity would leave size and times equal (git's "racy" files)
RACY_SECONDS = 2.0
MISSING = "missing"
UNRESOLVED = "unresolved"

#: the files of a model folder that loading reads: weights, config, tokenizer, custom code
MODEL_FILE_GLOBS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "config.json",
                    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
                    "sentencepiece.bpe.model", "tokenizer.model", "*.py")


# ----------------------------------------------------------------------------- the hash cache


def default_cache_path() -> Path:
    """``$STACKCOMP_HASH_CACHE``, else ``$XDG_CACHE_HOME/stackcomp/file-hashes.json`` (``~/.cache`` by default)."""
    if os.environ.get(HASH_CACHE_ENV):
        return Path(os.environ[HASH_CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stackcomp" / "file-hashes.json"


def hash_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in full (what the cache spares)."""
    from stackcomp.artifacts import sha256_file

    return sha256_file(Path(path))


class HashCache:
    """sha256 of files by (real path, size, mtime_ns, ctime_ns), kept in a JSON file on disk.

    ``path=None`` uses :func:`default_cache_path`; ``persist=False`` keeps it in memory only.
    An unreadable or corrupt cache file is treated as empty; one that cannot be written is
    skipped with a debug line (hashes are then recomputed next time, never wrong).
    """

    def __init__(self, path: str | os.PathLike | None = None, *, persist: bool = True):
        self.path = Path(path) if path is not None else default_cache_path()
        self.persist = persist
        self._entries: dict[str, list] = self._read() if persist else {}
        self._new: dict[str, list] = {}

    def _read(self) -> dict[str, list]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("schema") != CACHE_SCHEMA or not isinstance(data.get("files"), dict):
            return {}
        return {k: v for k, v in data["files"].items() if isinstance(v, list) and len(v) == 4}

    def record(self, path: str | os.PathLike) -> dict[str, Any]:
        """Path, size, mtime and sha256 of one file (the hash from the cache when the file is unchanged),
        or its path and the error when it cannot be read."""
        path = Path(path)
        try:
            st = path.stat()
            real = str(path.resolve())
        except OSError as e:
            return {"path": str(path), "error": e.strerror or str(e)}
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        known = self._entries.get(real)
        if known is not None and known[:3] == stamp:
            digest = known[3]
        else:
            try:
                digest = hash_file(path)
            except OSError as e:
                return {"path": real, "error": e.strerror or str(e)}
            if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_SECONDS * 1e9:
                self._entries[real] = self._new[real] = [*stamp, digest]
        return {"path": real, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}

    def sha256(self, path: str | os.PathLike) -> str | None:
        """The file's sha256, or None if it cannot be read."""
        return self.record(path).get("sha256")

    def save(self) -> None:
        """Write the hashes computed since loading, merged into what is on disk now (entries of
        files that no longer exist are dropped, so temporary folders do not pile up)."""
        if not (self.persist and self._new):
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = {k: v for k, v in {**self._read(), **self._new}.items() if os.path.exists(k)}
            atomic_write_json(self.path, {"schema": CACHE_SCHEMA, "files": merged})
            self._new = {}
        except OSError as e:
            log.debug("hash cache %s not written: %s", self.path, e)


# ----------------------------------------------------------------------------- data


def data_record(recipe: Any, cache: HashCache) -> dict[str, Any]:
    """The task's data as lock.json records it: local files (train and the evaluation split, as
    the task kind names them) with their hashes, or the hub dataset with its cached revision.
    No task: ``{"task": None}``."""
    if not recipe.task:
        return {"task": None}
    from stackcomp.data.glue import DATA_DIR_ENV, default_data_dir, hub_dataset_revision
    from stackcomp.errors import StackcompError
    from stackcomp.tasks import get_task

    opts = recipe.data_options()
    try:
        task = get_task(recipe.task)
        local = task.data_files(["train", opts.eval_split or "dev"], opts.data_dir)
    except StackcompError as e:
        return {"task": recipe.task, "error": str(e)}
    out: dict[str, Any] = {"task": task.name, "max_train_samples": opts.max_train_samples,
                           "max_eval_samples": opts.max_eval_samples, "max_length": opts.max_length}
    if opts.unlabeled:  # distillation's extra text: always local files, hashed like the task's
        from stackcomp.data.unlabeled import unlabeled_files

        try:
            out["unlabeled"] = [cache.record(path) for path in unlabeled_files(opts.unlabeled, opts.data_dir)]
        except StackcompError as e:
            return {"task": recipe.task, "error": str(e)}
    if local is None:
        dataset, config = task.hub_source()
        out.update({"source": "hub", "dataset": dataset, "config": config,
                    "revision": hub_dataset_revision(dataset),
                    "note": f"loaded from the hub; set {DATA_DIR_ENV} to lock local files by hash"})
        return out
    out["source"] = "local"
    data_dir = opts.data_dir or default_data_dir()
    out["data_dir"] = str(Path(data_dir).expanduser().resolve()) if data_dir else None
    # several splits may live in one file (SQuAD offline: train and dev are articles of one file)
    out["files"] = {split: cache.record(Path(path)) for split, path in local.items()}
    return out


def data_identity(record: dict[str, Any]) -> dict[str, Any] | None:
    """What a stage key hashes of a :func:`data_record`: the canonical task and the content
    (file hashes, or hub dataset and revision), not the data dir's path."""
    if not record.get("task"):
        return None
    if "error" in record:
        return {"task": record["task"], "error": MISSING}
    if record["source"] == "hub":
        out = {"task": record["task"], "source": "hub", "dataset": record["dataset"], "config": record["config"],
               "revision": record["revision"] or UNRESOLVED}
    else:
        out = {"task": record["task"], "source": "local",
               "files": {split: f.get("sha256") or MISSING for split, f in record["files"].items()}}
    if record.get("unlabeled"):  # in order: the corpus is their concatenation
        out["unlabeled"] = [f.get("sha256") or MISSING for f in record["unlabeled"]]
    return out


# ----------------------------------------------------------------------------- models


def model_record(spec: str, cache: HashCache) -> dict[str, Any]:
    """A model's files as lock.json records them: the folder (local, alias, or the hub cache's
    snapshot), each file's hash, and one combined sha256; a hub model not cached has none."""
    from stackcomp.errors import StackcompError
    from stackcomp.models import hub_snapshot, resolve_model_path

    out: dict[str, Any] = {"spec": spec}
    try:
        path = resolve_model_path(spec)
    except StackcompError as e:
        out["error"] = str(e)
        return out
    folder: Path | None = Path(path)
    if folder.is_dir():
        out["source"] = "local"
    else:
        folder = hub_snapshot(spec)
        out["source"] = "hub"
        if folder is None:
            out["note"] = "not in the local Hugging Face cache at plan time; files not hashed"
            return out
        out["revision"] = folder.name
    out["path"] = str(folder.resolve())
    names = sorted({p.name for g in MODEL_FILE_GLOBS for p in folder.glob(g) if p.is_file()})
    files = {n: cache.record(folder / n) for n in names}
    out["files"] = files
    combined = hashlib.sha256()
    for n in names:
        combined.update(f"{n}\0{files[n].get('sha256')}\n".encode())
    out["sha256"] = combined.hexdigest() if names else None
    return out


def model_identity(record: dict[str, Any]) -> dict[str, Any]:
    """What a key hashes of a :func:`model_record`: the combined hash of the files for a folder,
    the commit for a cached hub model, else the spec with a marker."""
    if "error" in record:
        return {"spec": record["spec"], "sha256": MISSING}
    if record.get("source") == "hub" and "revision" not in record:
        return {"spec": record["spec"], "revision": UNRESOLVED}
    if record.get("source") == "hub":
        return {"spec": record["spec"], "revision": record["revision"]}
    return {"sha256": record.get("sha256") or MISSING}


# ----------------------------------------------------------------------------- a recipe's inputs


@dataclass
class Inputs:
    """The identities of what a recipe's stages read: the source model, the task data (None
    without a task) and teachers named by model id (by spec)."""

    model: dict[str, Any]
    data: dict[str, Any] | None
    teachers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def unresolved(self) -> list[str]:
        """A sentence for each input whose identity is only a hub id (not in the local cache)."""
        out = [f"model {ident['spec']!r} is not a local folder and not in the local Hugging Face cache"
               for ident in (self.model, *self.teachers.values()) if ident.get("revision") == UNRESOLVED]
        if self.data and self.data.get("revision") == UNRESOLVED:
            out.append(f"{self.data['task']}: the hub dataset {self.data['dataset']} is not in the local Hugging "
                       "Face cache (set STACKCOMP_DATA_DIR to use local files)")
        return [f"{what}, so its revision is unknown: stage keys use {UNRESOLVED!r} for it and cannot tell two "
                "hub revisions apart" for what in out]


def teacher_model(stage: Any) -> str | None:
    """The model id a stage's teacher param names, when it names no stage (a plan's Stage): an
    input of the stage as much as the source model is."""
    param = stage.pass_cls.teacher_param
    teacher = getattr(stage.params, param, None) if param else None
    return teacher if isinstance(teacher, str) and teacher and not stage.teacher_stage else None


def identify_inputs(recipe: Any, teacher_specs: list[str] = (), cache: HashCache | None = None) -> Inputs:
    """Hash (or look up) the recipe's model, data and the given teacher models; saves the cache."""
    cache = cache if cache is not None else HashCache()
    try:
        return Inputs(model=model_identity(model_record(recipe.model, cache)),
                      data=data_identity(data_record(recipe, cache)),
                      teachers={t: model_identity(model_record(t, cache)) for t in sorted(set(teacher_specs))})
    finally:
        cache.save()
