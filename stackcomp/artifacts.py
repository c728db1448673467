"""Stage artifacts on disk: written atomically, checked by checksum, loaded by key.

One artifact is a folder ``<run>/artifacts/<key>/``::

    stage.json        who made it: stage, pass, params, key, parents, versions
    metrics.json      what the stage measured (may be empty)
    report.json       what ``analyze`` found, and what the pass reported
    timings.json      seconds spent in analyze / transform / finetune
    model/            model.safetensors, config.json, stackcomp_manifest.json, tokenizer files
                      (absent when the stage kept its parent's model: stage.json's model_from)
    CHECKSUMS.json    sha256 and size of every file above; written last

Everything is written into a temporary sibling folder and renamed into place, so a kill at
any moment leaves either no artifact or a complete one. An artifact is trusted only if it is
what :func:`verify_folder` calls intact: the files its kind requires (``rundir.REQUIRED_FILES``)
and every file present are listed in ``CHECKSUMS.json`` and match it, nothing in it is a
symbolic link, and its ``stage.json`` records its own key; otherwise the stage is recomputed.
An export folder (``export_model``) holds its own ``CHECKSUMS.json``; :func:`load_model`
verifies an artifact or export the same way before reading anything from it.

A model folder is the Hugging Face layout plus a layer manifest: the base architecture is
rebuilt from ``config.json``, compressed layers are put back from the manifest, then the
weights come from safetensors. No pickle anywhere.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stackcomp.errors import ArtifactError, ModelError
from stackcomp.hf_integration import (
    FORMAT_VERSION,
    guard_folder,
    hook_save_pretrained,
    manifest_layers,
    mark_config,
    quantization_layers,
)
from stackcomp.rundir import (
    ARTIFACTS,
    CHECKSUMS,
    EXPORT_KIND,
    MANIFEST,
    MODEL_DIR,
    REQUIRED_FILES,
    STAGE,
    STAGE_KIND,
    STAGE_WITH_MODEL,
    STAGE_WITHOUT_MODEL,
    WEIGHTS,
    read_json,
    write_json,
)

MODEL_CARD = "README.md"
MANIFEST_SCHEMA = FORMAT_VERSION  # config.json's quantization_config carries the same layer manifest


# ----------------------------------------------------------------------------- file hashes


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- integrity


def write_checksums(folder: Path) -> dict[str, list]:
    """List every file of ``folder`` in its ``CHECKSUMS.json`` (sha256, size), fsynced; written last."""
    sums = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            rel = f.relative_to(folder).as_posix()
            sums[rel] = [sha256_file(f), f.stat().st_size]
            _fsync(f)
    write_json(folder / CHECKSUMS, sums)
    _fsync(folder / CHECKSUMS)
    return sums


def verify_folder(folder: str | Path, kind: str, key: str | None = None) -> str | None:
    """None if ``folder`` is an intact folder of ``kind`` (rundir.REQUIRED_FILES), else one sentence
    naming the file at fault.

    Intact: no symbolic link in it (the folder included), a ``CHECKSUMS.json`` listing every file
    the kind requires and every file present, each with its size and sha256. A stage's kind
    (with or without ``model/``) is read from its ``stage.json`` once that file verifies; with
    ``key``, the key recorded there must be ``key`` (an intact artifact of another stage is not
    this one).
    """
    folder = Path(folder)
    if folder.is_symlink():
        return "the folder is a symbolic link, not the folder stackcomp wrote"
    if not folder.is_dir():
        return "the folder is missing"
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
    except FileNotFoundError:
        return f"incomplete (no {CHECKSUMS})"
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return f"{CHECKSUMS} is corrupt or unreadable"
    if not _well_formed(sums) or CHECKSUMS in sums:
        return f"{CHECKSUMS} is corrupt (not a map of relative paths to [sha256, size])"
    if kind == STAGE_KIND:
        if STAGE not in sums:
            return f"{CHECKSUMS} does not list {STAGE}"
        problem = _check_file(folder, STAGE, *sums[STAGE])
        if problem:
            return problem
        try:
            info = json.loads((folder / STAGE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            info = None
        if not isinstance(info, dict):
            return f"file {STAGE} is not a stage record"
        if key is not None and info.get("key") != key:
            return f"file {STAGE} records key {info.get('key')!r}: this is another stage's artifact, not {key}"
        kind = STAGE_WITHOUT_MODEL if info.get("model_from") else STAGE_WITH_MODEL
        if kind == STAGE_WITHOUT_MODEL and any(rel.startswith(f"{MODEL_DIR}/") for rel in sums):
            return f"file {STAGE} says the model is kept in artifact {info['model_from']} but {MODEL_DIR}/ is listed"
    if kind not in REQUIRED_FILES:
        raise ValueError(f"unknown folder kind {kind!r}")
    for required in REQUIRED_FILES[kind]:
        if required not in sums:
            return f"{CHECKSUMS} does not list {required}"
    problem = _unlisted(folder, sums)
    if problem:
        return problem
    for rel, (digest, size) in sums.items():
        problem = _check_file(folder, rel, digest, size)
        if problem:
            return problem
    return None


def _check_file(folder: Path, rel: str, digest: str, size: int) -> str | None:
    f = folder / rel
    try:
        if f.is_symlink():
            return f"file {rel} is a symbolic link"
        if not f.is_file():
            return f"file {rel} is missing"
        if f.stat().st_size != size:
            return f"file {rel} has {f.stat().st_size} bytes, expected {size}"
        if sha256_file(f) != digest:
            return f"file {rel} fails its checksum"
    except OSError as e:
        return f"file {rel} cannot be read ({e.strerror or e})"
    return None


def _unlisted(folder: Path, sums: dict[str, Any]) -> str | None:
    """The first symbolic link, or file or folder ``CHECKSUMS.json`` does not account for."""
    listed_dirs = {p.as_posix() for rel in sums for p in Path(rel).parents}
    for dirpath, dirnames, filenames in os.walk(folder):  # does not follow links: they are reported
        base = Path(dirpath)
        for name in sorted(dirnames) + sorted(filenames):
            path = base / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                return f"{rel} is a symbolic link"
            if rel == CHECKSUMS or rel in sums:
                continue  # a listed file, checked next (a folder in its place is reported there)
            if name in dirnames and rel in listed_dirs:
                continue
            return f"{'folder' if name in dirnames else 'file'} {rel} is not listed in {CHECKSUMS}"
    return None


# ----------------------------------------------------------------------------- model folders


def save_model(model: nn.Module, folder: str | Path, tokenizer: Any = None) -> Path:
    """Save a (possibly compressed) Hugging Face model as safetensors + config + layer manifest."""
    from safetensors.torch import save_model as st_save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = manifest_layers(model)
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "producer": "stackcomp",
        "model_class": type(model).__name__,
        "layers": layers,
    }
    config = getattr(model, "config", None)
    if config is None:
        raise ArtifactError(f"cannot save {type(model).__name__}: stackcomp saves Hugging Face models (with .config)")
    # config.json as transformers reads it: the head class, and for a compressed model the
    # quantization_config stackcomp's quantizer rebuilds it from (hf_integration)
    mark_config(copy.deepcopy(config), model, layers).save_pretrained(folder)
    guard_folder(folder)
    for p in model.parameters():
        if not torch.isfinite(p).all():
            from stackcomp.errors import NumericalError

            bad = next(n for n, q in model.named_parameters() if not torch.isfinite(q).all())
            raise NumericalError(f"refusing to save: parameter {bad} holds NaN or Inf")
    # one metadata key: safetensors writes the metadata map in hash order, so two keys make the
    # same weights give different bytes from run to run (the manifest says who produced the folder)
    try:
        st_save_model(model, str(folder / WEIGHTS), metadata={"format": "pt"})
    except Exception as e:  # safetensors reports a failed write (disk full...) as SafetensorError
        raise _as_os_error(e, folder / WEIGHTS) from None
    write_json(folder / MANIFEST, manifest)
    if tokenizer is not None:
        try:
            tokenizer.save_pretrained(folder)
        except Exception as e:  # the Rust tokenizer reports a failed write as a plain Exception
            raise _as_os_error(e, folder / "tokenizer.json") from None
    return folder


def _as_os_error(e: Exception, path: Path) -> Exception:
    """safetensors' ``I/O error: ... (os error N)`` (SafetensorError) and the Rust tokenizers' plain
    ``Exception("... (os error N)")`` as the OSError they were, so callers see errno N."""
    import re

    m = re.search(r"os error (\d+)", str(e))
    if (type(e).__name__ == "SafetensorError" or type(e) is Exception) and m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code), str(path))
    return e


def export_model(model: nn.Module, folder: str | Path, tokenizer: Any = None, card: str | None = None,
                 extra_files: Callable[[Path], Any] | None = None) -> Path:
    """:func:`save_model` into a checksummed folder (an export) that replaces ``folder`` in one step,
    with a model card (``README.md``: ``card``, else one with the model's sizes and how to load it).
    ``extra_files(folder)`` adds files before the checksums are taken (a task kind's layout for
    other tools, e.g. sentence-transformers' ``modules.json``).
    Its folders and files get the permissions the umask gives (not the 0700 of a temporary folder)."""
    dest = Path(folder).expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        save_model(model, tmp, tokenizer=tokenizer)
        if extra_files is not None:
            extra_files(tmp)
        if card is None:
            from stackcomp.evaluate import size_report
            from stackcomp.model_card import render_card

            card = render_card(model, dest.name, dense=not manifest_layers(model), sizes=size_report(model))
        (tmp / MODEL_CARD).write_text(card, encoding="utf-8")
        write_checksums(tmp)
        apply_umask(tmp)  # before the rename: the folder never appears with a temporary folder's 0700
        if dest.exists() or dest.is_symlink():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(dest.parent)
    return dest


def current_umask() -> int:
    """The process umask, read from /proc where the kernel reports it (Linux), so it is never
    changed; elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Folders 0o777 and files 0o666 less the umask under ``root`` (itself included), as a plain
    ``mkdir``/``open`` would have made them: ``tempfile`` makes folders 0700 and files 0600."""
    mask = current_umask()
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def model_folder(path: str | Path, *, verify: bool = True) -> Path:
    """The folder holding the model files of ``path``: a stage artifact (following ``model_from``),
    an artifact's ``model/``, or an export. With ``verify``, the artifact or export is checked first
    (:func:`verify_folder`) and ArtifactError names what failed; nothing is loaded from it."""
    path = Path(path)
    seen: set[Path] = set()
    while True:
        if path.name == MODEL_DIR and (path.parent / STAGE).exists():  # <artifact>/model
            root, kind = path.parent, STAGE_KIND
        elif (path / STAGE).exists() or (path / MODEL_DIR).is_dir():
            root, kind = path, STAGE_KIND
        else:
            root, kind = path, EXPORT_KIND
        if verify:
            _verify_for_load(root, kind, key=root.name if seen else None)
        if kind == EXPORT_KIND:
            return root
        info = read_json(root / STAGE) if (root / STAGE).is_file() else {}
        model_from = info.get("model_from") if isinstance(info, dict) else None
        if not model_from:
            return root / MODEL_DIR
        seen.add(root)  # a stage that kept its parent's model: load (and check) the parent's artifact
        path = root.parent / str(model_from)
        if path in seen:
            raise ArtifactError(f"{root / STAGE}: model_from {model_from} leads back to itself")
        if not path.exists() and not path.is_symlink():
            raise ArtifactError(f"{root} keeps its model in artifact {model_from}, which is missing from {root.parent}")


def _verify_for_load(root: Path, kind: str, key: str | None) -> None:
    if kind == EXPORT_KIND and not root.is_symlink() and not (root / CHECKSUMS).exists():
        if not (root / MANIFEST).exists():
            return  # no folder, or not a stackcomp one: load_model says so
        raise ArtifactError(f"{root} has no {CHECKSUMS}, so its files cannot be verified: write it with the export "
                            "pass or stackcomp.save, or load it unverified with stackcomp.load(path, verify=False)")
    problem = verify_folder(root, kind, key=key)
    if problem:
        what = "export folder" if kind == EXPORT_KIND else "artifact"
        raise ArtifactError(f"{what} {root} is corrupt: {problem}; not loaded "
                            "(stackcomp.load(path, verify=False) loads it anyway)")


def load_model(folder: str | Path, device: str | torch.device = "cpu", *, verify: bool = True) -> nn.Module:
    """Rebuild a model saved by :func:`save_model` (or any stage artifact / export folder).

    The artifact or export is verified against its checksums first; ``verify=False`` skips that
    (for a folder stackcomp wrote without checksums, e.g. by :func:`save_model` alone).
    """
    import transformers
    from safetensors.torch import load_model as st_load_model

    from stackcomp.nn.base import layer_class, link_layers
    from stackcomp.nn.pruning import restore_pruned_shapes
    from stackcomp.targets import set_module

    folder = model_folder(folder, verify=verify)
    has_manifest = (folder / MANIFEST).exists()
    if has_manifest:
        manifest = read_json(folder / MANIFEST)
        if manifest.get("schema") != MANIFEST_SCHEMA:
            raise ArtifactError(f"{folder / MANIFEST}: schema {manifest.get('schema')} is not {MANIFEST_SCHEMA}")
    if not (folder / "config.json").is_file():
        if not has_manifest:
            raise ModelError(f"{folder} is not a stackcomp model folder (no {MANIFEST})")
        raise ModelError(f"{folder / 'config.json'} is missing: the model folder is incomplete")
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ModelError(f"{folder / 'config.json'} cannot be read: {_first_line(e)}") from None
    if not has_manifest:  # written by save_pretrained: the layer manifest is config.json's quantization_config
        found = quantization_layers(config)
        if found is None:
            raise ModelError(f"{folder} is not a stackcomp model folder (no {MANIFEST}, no stackcomp "
                             "quantization_config in config.json); use transformers' from_pretrained for plain "
                             "Hugging Face folders")
        manifest = {"model_class": found[0], "layers": found[1]}
    model_cls = getattr(transformers, manifest["model_class"], None)
    if model_cls is None:
        raise ArtifactError(f"{folder}: unknown model class {manifest['model_class']!r} in the manifest")
    model = model_cls(config)
    restore_pruned_shapes(model, folder / WEIGHTS, manifest["layers"])  # heads and neurons prune_structured removed
    for name, entry in manifest["layers"].items():
        entry = dict(entry)
        cls = layer_class(entry.pop("type"))
        set_module(model, name, cls.from_manifest(entry))
    link_layers(model)
    if not (folder / WEIGHTS).is_file():
        raise ArtifactError(f"{folder / WEIGHTS} is missing: the model folder is incomplete")
    try:
        missing, unexpected = st_load_model(model, str(folder / WEIGHTS), strict=False)
    except Exception as e:  # SafetensorError (truncated, bad header), OSError, shape mismatches
        raise ArtifactError(f"{folder / WEIGHTS} cannot be loaded (truncated or damaged?): {_first_line(e)}") from None
    missing = [m for m in missing if not _is_tied_copy(model, m)]
    if missing or unexpected:
        raise ArtifactError(f"{folder / WEIGHTS}: weights do not match the manifest "
                            f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    mark_config(model.config, model, manifest["layers"])  # so its save_pretrained folder loads again,
    hook_save_pretrained(model)  # and is refused by transformers without stackcomp
    return model.to(device).eval()


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


def _is_tied_copy(model: nn.Module, name: str) -> bool:
    """safetensors drops tied duplicates (e.g. decoder weights tied to embeddings)."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return name in tied if not isinstance(tied, dict) else name in tied.keys()


def load_tokenizer(folder: str | Path) -> Any:
    from transformers import AutoTokenizer

    folder = Path(folder)
    if (folder / MODEL_DIR).is_dir():
        folder = folder / MODEL_DIR
    return AutoTokenizer.from_pretrained(folder)


# ----------------------------------------------------------------------------- stage artifacts


class ArtifactStore:
    """Stage artifacts addressed by key: ``<run dir>/artifacts`` or a cache folder shared by runs.

    Keys hash everything a stage's result depends on, so recipes that share a prefix (same
    model, task, data and stages) may share one cache and compute that prefix once.
    """

    def __init__(self, root: str | Path, *, artifacts_dir: str | Path | None = None):
        self.root = Path(artifacts_dir) if artifacts_dir is not None else Path(root) / ARTIFACTS

    def path(self, key: str) -> Path:
        return self.root / key

    def is_complete(self, key: str) -> bool:
        return (self.path(key) / CHECKSUMS).exists()

    def verify(self, key: str) -> str | None:
        """None if the artifact is intact and is the one of ``key``, else a sentence saying what is wrong."""
        return verify_folder(self.path(key), STAGE_KIND, key=key)

    def begin(self, key: str) -> Path:
        """A fresh temporary folder to write an artifact into."""
        self.root.mkdir(parents=True, exist_ok=True)
        # the writer's pid in the name: a run sharing the cache never removes a live writer's folder
        return Path(tempfile.mkdtemp(prefix=f".tmp-{key}-{os.getpid()}-", dir=self.root))

    def commit(self, key: str, tmp: Path) -> Path:
        """Checksum everything in ``tmp``, then rename it into place in one step.

        Another process sharing the cache may commit the same key at the same time (the same
        work): whoever renames first wins, and the other finds that intact artifact, discards its
        own copy and returns the winner's folder; it never replaces an intact artifact."""
        write_checksums(tmp)
        apply_umask(tmp)  # a cache shared by several users is readable as their umask allows
        return self.publish(key, tmp)

    def publish(self, key: str, tmp: Path) -> Path:
        """Rename ``tmp`` (checksummed already) into place, as :meth:`commit` says."""
        final = self.path(key)
        for _ in range(3):
            if (final.exists() or final.is_symlink()) and self._taken_by_another_writer(key, tmp):
                return final
            if final.exists() or final.is_symlink():  # a corrupt or stale artifact (or a link) under the same key
                trash = Path(tempfile.mkdtemp(prefix=f".old-{key}-", dir=self.root))
                try:
                    os.replace(final, trash / "old")
                except FileNotFoundError:  # another writer moved it first
                    pass
                shutil.rmtree(trash, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                continue  # another writer renamed its copy in between: look at it again
            _fsync_dir(self.root)
            return final
        if self._taken_by_another_writer(key, tmp):
            return final
        raise ArtifactError(f"{final}: other processes keep writing this artifact; run again")

    def _taken_by_another_writer(self, key: str, tmp: Path) -> bool:
        """True (and ``tmp`` removed) when ``key`` already holds an intact artifact."""
        if self.verify(key) is not None:
            return False
        shutil.rmtree(tmp, ignore_errors=True)
        return True

    def discard(self, key: str) -> None:
        final = self.path(key)
        if final.is_symlink() or final.is_file():  # rmtree refuses a link: it would stay "cached"
            final.unlink(missing_ok=True)
        elif final.exists():
            shutil.rmtree(final, ignore_errors=True)

    def clean_temporaries(self) -> int:
        """Remove half-written folders left by killed runs (not those of a run still writing)."""
        n = 0
        if self.root.exists():
            for d in self.root.iterdir():
                if d.name.startswith((".tmp-", ".old-")) and not _writer_alive(d.name):
                    shutil.rmtree(d, ignore_errors=True)
                    n += 1
        return n

    def read(self, key: str, name: str) -> Any:
        return read_json(self.path(key) / name)

    @property
    def url(self) -> str:
        """Where another process (a Ray worker) opens this store (``remote_store.open_store``)."""
        return str(self.root.resolve())

    def fetch(self, keys: Iterable[str]) -> None:
        """Nothing to do: the artifacts are local (a remote store downloads them here)."""


def _writer_alive(name: str) -> bool:
    """True if a ``.tmp-<key>-<pid>-…`` folder belongs to another live process."""
    parts = name.split("-")
    if not name.startswith(".tmp-") or len(parts) < 4 or not parts[2].isdigit():
        return False
    pid = int(parts[2])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _well_formed(sums: Any) -> bool:
    """CHECKSUMS.json as written by ``commit``: relative paths inside the folder -> [hex digest, size]."""
    if not isinstance(sums, dict):
        return False
    for rel, entry in sums.items():
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts:
            return False
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], int) and not isinstance(entry[1], bool)):
            return False
    return True


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _fsync_dir(path: Path) -> None:
    _fsync(path)
