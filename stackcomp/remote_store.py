"""Artifact stores given as a URL: :func:`open_store` (a folder, ``file://``, or object storage
such as ``s3://bucket/prefix`` through fsspec, with local copies: :class:`RemoteStore`).

The engine, the executors and the view read an artifact's files from a local folder
(``store.path(key)``), so this store keeps a *mirror* — the run directory's ``artifacts/`` — and
downloads an artifact into it the first time a process asks for it. The object store is the
truth; the mirror is a checked copy.

Layout under the store's URL, one prefix per key::

    <key>/data-<digest>/stage.json, metrics.json, model/...   the artifact's files
    <key>/CHECKSUMS.json                                      the commit marker

The marker is the artifact's ``CHECKSUMS.json`` (sha256 and size of every file) and ``<digest>``
is the first 16 hex digits of the marker's own sha256, so a marker names exactly one set of files.

Commit (atomic on every backend): the artifact is written and checksummed in a local temporary
folder and verified (:func:`~stackcomp.artifacts.verify_folder`); its files are uploaded under
``data-<digest>/``; then the marker is written in one request that succeeds only if no marker
exists (``If-None-Match: *`` on S3; fsspec's ``pipe_file(mode="create")``). A reader looks at
the marker first, so it sees either no artifact or a complete one: a writer killed during the
upload leaves files without a marker, which is not an artifact (the stage is recomputed; the
orphaned upload is removed by a later run). Two writers of one key upload to their own
``data-<digest>/`` (the same one when their bytes are the same) and one marker wins; the other
writer finds it done and removes its own upload. Nothing is ever overwritten in place, so there
are never two half-artifacts, and no lock or lease is needed. A server that ignores conditional
writes makes the last marker win; each marker still names complete files.

Every download is checked against the marker (sizes, sha256) before it enters the mirror, so a
damaged object is reported, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from stackcomp.artifacts import (
    ArtifactStore,
    _well_formed,
    apply_umask,
    verify_folder,
    write_checksums,
)
from stackcomp.errors import ArtifactError, StackcompError
from stackcomp.rundir import CHECKSUMS, STAGE, STAGE_KIND, read_json

__all__ = ["STALE_UPLOAD_SECONDS", "RemoteStore", "open_store"]

#: an upload without its marker this old is a dead writer's and is removed at the next run's start
STALE_UPLOAD_SECONDS = 3600
DATA_PREFIX = "data-"
#: how many times a marker write that S3 answered with a write conflict (409) is tried
MARKER_RETRIES = 5
#: fsspec protocols whose first path component is a bucket that must exist
BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs"})


def open_store(location: str | Path | None, local_dir: str | Path) -> ArtifactStore | RemoteStore:
    """The artifact store at ``location`` (``--cache``, ``STACKCOMP_CACHE``): none, the folder
    ``local_dir`` (a run's ``artifacts/``); a path or ``file://`` URL, that folder; another URL
    (``s3://bucket/prefix``), object storage through fsspec with local copies in ``local_dir``."""
    if location is None:
        return ArtifactStore(local_dir, artifacts_dir=local_dir)
    text = str(location)
    if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):
        return ArtifactStore(local_dir, artifacts_dir=Path(text).expanduser())
    url = urlsplit(text)
    if url.scheme == "file":
        if url.netloc not in ("", "localhost") or not url.path:
            raise ArtifactError(f"artifact store {text}: a file:// URL names a folder of this machine "
                                "(file:///abs/path); mount a network folder and give its path")
        return ArtifactStore(local_dir, artifacts_dir=Path(unquote(url.path)))
    return RemoteStore(text, local_dir)


class RemoteStore:
    """Artifacts addressed by key in object storage at ``url``, mirrored into ``local_dir``.

    It has :class:`~stackcomp.artifacts.ArtifactStore`'s interface: ``root`` and ``path(key)``
    are local (the mirror), ``is_complete``/``verify``/``commit``/``discard`` act on the object
    store. Credentials and the endpoint come from the places s3fs (botocore) reads them:
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or ``~/.aws``, ``AWS_ENDPOINT_URL`` for an
    S3-compatible server (MinIO, Ceph...).
    """

    def __init__(self, url: str, local_dir: str | Path):
        self.url = url.rstrip("/")
        self.fs, self._base = _filesystem(self.url)
        self._base = self._base.rstrip("/")
        self.mirror = ArtifactStore(local_dir, artifacts_dir=local_dir)
        self.root = self.mirror.root
        self._fresh: set[str] = set()  # keys whose mirror copy this process matched to the marker

    def __repr__(self) -> str:
        return f"RemoteStore({self.url!r}, mirror={str(self.root)!r})"

    # ------------------------------------------------------------------ reading

    def path(self, key: str) -> Path:
        """The local copy of ``key``'s artifact, downloaded if the mirror lacks it or holds another
        version (and the artifact it keeps its model in, ``model_from``). A key the store does not
        hold gives the mirror's folder as it is (usually absent)."""
        problem = self._sync(key)
        if problem:
            raise ArtifactError(f"artifact {key} in {self.url} is corrupt: {problem}; "
                                "run the recipe again to recompute it")
        return self.mirror.path(key)

    def is_complete(self, key: str) -> bool:
        with self._remote(f"looking up artifact {key}"):
            return bool(self.fs.exists(self._marker_path(key)))

    def verify(self, key: str) -> str | None:
        """None if ``key``'s artifact is intact (its files match the marker's sizes and sha256 and
        its stage.json records ``key``), else a sentence saying what is wrong. Downloads it."""
        problem = self._sync(key)
        if problem is None:
            problem = verify_folder(self.mirror.path(key), STAGE_KIND, key=key)
            if problem is not None:  # the local copy was damaged, not necessarily the store's: fetch again
                self.mirror.discard(key)
                self._fresh.discard(key)
                problem = self._sync(key) or verify_folder(self.mirror.path(key), STAGE_KIND, key=key)
        return problem

    def read(self, key: str, name: str) -> Any:
        return read_json(self.path(key) / name)

    def fetch(self, keys: Iterable[str]) -> None:
        """Local copies of these artifacts (a run's finished stages: ``compare``, ``report`` and
        ``stackcomp.load`` then read the run directory as after a local run)."""
        for key in keys:
            self.path(key)

    # ------------------------------------------------------------------ writing

    def begin(self, key: str) -> Path:
        """A fresh local temporary folder to write an artifact into."""
        return self.mirror.begin(key)

    def commit(self, key: str, tmp: Path) -> Path:
        """Checksum and verify ``tmp``, upload its files, then publish the marker unless another
        writer did first (then its artifact stands and ``tmp`` is dropped). Returns the local copy."""
        try:
            write_checksums(tmp)
            problem = verify_folder(tmp, STAGE_KIND, key=key)
            if problem:
                raise ArtifactError(f"the artifact written for {key} is not intact ({problem}); not published")
            apply_umask(tmp)
            marker = (tmp / CHECKSUMS).read_bytes()
            data = self._data_path(key, marker)
            uploaded = False
            with self._remote(f"publishing artifact {key}"):
                current = self._marker(key)
                if current is None:
                    files = sorted(f for f in tmp.rglob("*") if f.is_file() and f != tmp / CHECKSUMS)
                    self.fs.put([str(f) for f in files], [f"{data}/{f.relative_to(tmp).as_posix()}" for f in files])
                    uploaded = True
                    current = self._create_marker(key, marker)
                if current != marker and uploaded and (current is None or self._data_path(key, current) != data):
                    self.fs.rm(data, recursive=True)  # nobody reads this upload: the marker names another
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if current != marker:
            shutil.rmtree(tmp, ignore_errors=True)
            return self.path(key)
        if _read_bytes(self.mirror.path(key) / CHECKSUMS) != marker:
            self.mirror.discard(key)  # a copy of another version of this key
        self.mirror.publish(key, tmp)
        self._fresh.add(key)
        return self.mirror.path(key)

    def _create_marker(self, key: str, marker: bytes) -> bytes | None:
        """Write ``key``'s marker unless it exists; return the marker that stands (ours, or the
        writer's who published first). S3 answers ``409 ConditionalRequestConflict`` while another
        conditional write of the same object is in flight: then look again and retry, as AWS
        advises, instead of failing the stage."""
        for attempt in range(MARKER_RETRIES):
            try:
                self.fs.pipe_file(self._marker_path(key), marker, mode="create")
                return marker
            except FileExistsError:  # another writer published first
                return self._marker(key)
            except Exception as e:  # noqa: BLE001 - the conflict arrives as the backend's own error type
                if not _is_write_conflict(e) or attempt == MARKER_RETRIES - 1:
                    raise
            time.sleep(0.1 * 2 ** attempt)
            if (current := self._marker(key)) is not None:  # the other write went through
                return current
        return None  # not reached

    def discard(self, key: str) -> None:
        """Remove ``key``'s artifact: the marker first (it stops being an artifact), then its files."""
        with self._remote(f"removing artifact {key}"):
            if self.fs.exists(self._marker_path(key)):
                self.fs.rm(self._marker_path(key))
            if self.fs.exists(self._key_path(key)):
                self.fs.rm(self._key_path(key), recursive=True)
        self.mirror.discard(key)
        self._fresh.discard(key)

    def clean_temporaries(self) -> int:
        """Remove the mirror's half-written folders and, in the store, uploads no marker names that
        are older than :data:`STALE_UPLOAD_SECONDS` (a younger one may be a live writer's)."""
        n = self.mirror.clean_temporaries()
        with self._remote("listing the store"):
            self._check_bucket()
            objects = self.fs.find(self._base, detail=True) if self.fs.exists(self._base) else {}
            uploads: dict[str, dict[str, float]] = {}  # key -> data prefix -> newest object's time
            marked: set[str] = set()
            for name, info in objects.items():
                parts = name[len(self._base) + 1:].split("/")
                if len(parts) == 2 and parts[1] == CHECKSUMS:
                    marked.add(parts[0])
                elif len(parts) > 2 and parts[1].startswith(DATA_PREFIX):
                    newest = uploads.setdefault(parts[0], {})
                    newest[parts[1]] = max(newest.get(parts[1], 0.0), _modified(info))
            now = time.time()
            for key, prefixes in uploads.items():
                if key in marked and len(prefixes) == 1:
                    continue  # the artifact's own files
                marker = self._marker(key) if key in marked else None
                keep = self._data_path(key, marker).rsplit("/", 1)[1] if marker is not None else None
                for prefix, modified in prefixes.items():
                    if prefix != keep and now - modified > STALE_UPLOAD_SECONDS:
                        self.fs.rm(f"{self._key_path(key)}/{prefix}", recursive=True)
                        n += 1
        return n

    def _check_bucket(self) -> None:
        """A missing bucket is one clear error at the run's start, not a failure of every stage."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        bucket = self._base.split("/", 1)[0]
        if set(protocols) & BUCKET_PROTOCOLS and not self.fs.exists(bucket):
            raise ArtifactError(f"artifact store {self.url}: bucket {bucket!r} does not exist or these credentials "
                                f"cannot see it; create it (e.g. `aws s3 mb s3://{bucket}`) or check the "
                                "credentials and AWS_ENDPOINT_URL (docs/cluster.md)")

    # ------------------------------------------------------------------ the mirror

    def _sync(self, key: str) -> str | None:
        """Make the mirror's copy of ``key`` the store's (downloading it if needed), once per
        process; None, or what is wrong with the store's artifact."""
        if key in self._fresh:
            return None
        marker = self._marker(key)
        if marker is None:
            return None
        if _read_bytes(self.mirror.path(key) / CHECKSUMS) != marker:
            problem = self._download(key, marker)
            if problem:
                return problem
        self._fresh.add(key)
        info = _read_stage(self.mirror.path(key))
        model_from = info.get("model_from") if isinstance(info, dict) else None
        if isinstance(model_from, str) and model_from:  # the model is read from that artifact's folder
            return self._sync(model_from)
        return None

    def _download(self, key: str, marker: bytes) -> str | None:
        """The files ``marker`` lists into the mirror, verified before they appear there."""
        try:
            sums = json.loads(marker)
        except (json.JSONDecodeError, UnicodeDecodeError):
            sums = None
        if not _well_formed(sums) or CHECKSUMS in sums:
            return f"{CHECKSUMS} is corrupt (not a map of relative paths to [sha256, size])"
        data = self._data_path(key, marker)
        tmp = self.mirror.begin(key)
        try:
            local = [tmp / rel for rel in sums]
            for f in local:
                f.parent.mkdir(parents=True, exist_ok=True)
            with self._remote(f"downloading artifact {key}"):
                try:
                    self.fs.get([f"{data}/{rel}" for rel in sums], [str(f) for f in local])
                except FileNotFoundError:
                    missing = [rel for rel in sums if not self.fs.exists(f"{data}/{rel}")]
                    return f"file {missing[0] if missing else '?'} is missing from {self.url}/{key}"
            (tmp / CHECKSUMS).write_bytes(marker)
            problem = verify_folder(tmp, STAGE_KIND, key=key)
            if problem:
                return problem
            apply_umask(tmp)
            if _read_bytes(self.mirror.path(key) / CHECKSUMS) != marker:  # not copied meanwhile by another process
                self.mirror.discard(key)  # another version's copy, or a damaged one
                self.mirror.publish(key, tmp)
            return None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------ names in the store

    def _key_path(self, key: str) -> str:
        return f"{self._base}/{key}"

    def _marker_path(self, key: str) -> str:
        return f"{self._base}/{key}/{CHECKSUMS}"

    def _data_path(self, key: str, marker: bytes) -> str:
        return f"{self._base}/{key}/{DATA_PREFIX}{hashlib.sha256(marker).hexdigest()[:16]}"

    def _marker(self, key: str) -> bytes | None:
        with self._remote(f"reading artifact {key}"):
            try:
                return self.fs.cat_file(self._marker_path(key))
            except FileNotFoundError:
                return None

    @contextmanager
    def _remote(self, what: str) -> Iterator[None]:
        """Failures of the object store as one ArtifactError naming the store and what to check."""
        try:
            yield
        except (StackcompError, FileExistsError):
            raise
        except Exception as e:  # noqa: BLE001 - botocore, aiohttp and fsspec errors alike
            raise ArtifactError(f"artifact store {self.url}: {what} failed: {_first_line(e)}; check the URL, "
                                "the credentials and AWS_ENDPOINT_URL for an S3-compatible server "
                                "(docs/cluster.md)") from None


def _is_write_conflict(error: BaseException) -> bool:
    """S3's 409 for two conditional writes of one object in flight at once."""
    text = f"{type(error).__name__}: {error}"
    return "ConditionalRequestConflict" in text or ("409" in text and "onflict" in text)


def _filesystem(url: str) -> tuple[Any, str]:
    """fsspec's filesystem for ``url`` (uncached: another process's writes are seen at once)."""
    try:
        import fsspec
    except ImportError:
        raise StackcompError(f"an artifact store at {url} needs fsspec: pip install 'stackcomp[cluster]'") from None
    try:
        return fsspec.core.url_to_fs(url, skip_instance_cache=True, use_listings_cache=False)
    except ImportError as e:
        raise StackcompError(f"an artifact store at {url} needs the fsspec backend for it ({_first_line(e)}); "
                             "for s3:// URLs: pip install 'stackcomp[cluster]'") from None
    except ValueError as e:
        raise StackcompError(f"artifact store {url}: {_first_line(e)}; give a folder, a file:// or an s3:// URL") \
            from None


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _read_stage(folder: Path) -> Any:
    try:
        return json.loads((folder / STAGE).read_text())
    except (OSError, ValueError):
        return None


def _modified(info: dict[str, Any]) -> float:
    """An object's last-modified time (epoch seconds) from an fsspec listing entry; now if it has
    none (never taken for a stale upload)."""
    for field in ("LastModified", "mtime", "last_modified", "created"):
        value = info.get(field)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return time.time()


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__
