"""Resource errors: a full disk (patched writes, and a real per-process file-size limit) and an
output directory that cannot be written end with one clear line and exit code 2, leave nothing
half-written that a later run could trust, and keep the stages that finished."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from stackcomp.artifacts import ArtifactStore
from stackcomp.cli import app
from stackcomp.passes.base import Pass, register_pass
from stackcomp.plan import build_plan
from stackcomp.recipe import load_recipe

runner = CliRunner()
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@register_pass
class _Halve(Pass):
    """Test pass: halves the classifier weight."""

    name = "_halve"

    def transform(self, model, ctx):
        with torch.no_grad():
            model.classifier.weight.mul_(0.5)
        ctx.metrics["norm"] = float(model.classifier.weight.detach().norm())
        return model


@pytest.fixture
def recipe(tmp_path, tiny_model_dirs):
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(f"""\
        name: res
        model: {tiny_model_dirs['bert']}
        evaluate_leaves: false
        stages:
          a: {{pass: _halve}}
          b: {{pass: _halve, after: a}}
    """))
    return p


def _keys(recipe):
    plan = build_plan(load_recipe(recipe))
    return {n: plan.stages[n].key for n in plan.order}


def _check_failed_cleanly(result, run, recipe, failed, kept=()):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]  # (transformers may draw a progress bar before)
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    store = ArtifactStore(run)
    keys = _keys(recipe)
    leftovers = [p.name for p in store.root.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    assert leftovers == [], leftovers  # the failed stage's temporary folder is gone
    assert not store.path(keys[failed]).exists()  # and nothing under its key
    for s in kept:
        assert store.verify(keys[s]) is None
    return errors[0]


def _resume(recipe, run, expect_ran):
    r = runner.invoke(app, ["run", str(recipe), "-o", str(run), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout[r.stdout.index("{"):])["ran"] == expect_ran


def test_disk_full_while_writing_weights(tmp_path, recipe, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_model
    calls = []

    def full_disk(model, filename, metadata=None, **kw):
        calls.append(filename)
        if len(calls) == 2:  # stage b: half the file, then the disk is full
            with open(filename, "wb") as f:
                f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real(model, filename, metadata=metadata, **kw)

    monkeypatch.setattr(safetensors.torch, "save_model", full_disk)
    run = tmp_path / "run"
    r = runner.invoke(app, ["run", str(recipe), "-o", str(run)])
    line = _check_failed_cleanly(r, run, recipe, failed="b", kept=["a"])
    assert "stage 'b' (_halve)" in line and "No space left on device (disk full)" in line
    assert "model.safetensors" in line and "resume" in line
    monkeypatch.setattr(safetensors.torch, "save_model", real)
    _resume(recipe, run, ["b"])


def test_disk_full_while_writing_metrics(tmp_path, recipe, monkeypatch):
    import stackcomp.executor as executor

    real = executor.write_json

    def full(path, obj):
        if path.name == "metrics.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, obj)

    monkeypatch.setattr(executor, "write_json", full)
    run = tmp_path / "run"
    r = runner.invoke(app, ["run", str(recipe), "-o", str(run)])
    line = _check_failed_cleanly(r, run, recipe, failed="a")
    assert "stage 'a'" in line and "metrics.json" in line and "disk full" in line
    monkeypatch.setattr(executor, "write_json", real)
    _resume(recipe, run, ["a", "b"])


def test_disk_full_at_the_final_rename(tmp_path, recipe, monkeypatch):
    real = os.replace

    def full(src, dst, *a, **kw):
        if ".tmp-" in os.fspath(src) and "artifacts" in os.fspath(dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", full)
    run = tmp_path / "run"
    r = runner.invoke(app, ["run", str(recipe), "-o", str(run)])
    _check_failed_cleanly(r, run, recipe, failed="a")
    monkeypatch.setattr(os, "replace", real)
    _resume(recipe, run, ["a", "b"])


def test_disk_full_writing_the_summary_keeps_every_stage(tmp_path, recipe, monkeypatch):
    import stackcomp.rundir as rundir

    real = rundir.atomic_write_text

    def full(path, text):
        if path.name == "summary.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, text)

    monkeypatch.setattr(rundir, "atomic_write_text", full)
    run = tmp_path / "run"
    r = runner.invoke(app, ["run", str(recipe), "-o", str(run)])
    assert r.exit_code == 2 and "every stage finished and is saved" in r.stderr, r.output
    monkeypatch.setattr(rundir, "atomic_write_text", real)
    _resume(recipe, run, [])


def test_real_file_size_limit_in_a_subprocess(tmp_path, recipe):
    """No patching: the kernel refuses writes past 1 MB (RLIMIT_FSIZE), as a full disk would."""
    run = tmp_path / "run"
    code = textwrap.dedent("""\
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
        from stackcomp.passes.base import Pass, register_pass

        @register_pass
        class Halve(Pass):
            name = "_halve"

        from stackcomp.cli import main
        sys.argv = ["stackcomp", *sys.argv[1:]]
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", code, "run", str(recipe), "-o", str(run)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "File too large" in proc.stderr and "stage 'a'" in proc.stderr
    store = ArtifactStore(run)
    assert [p.name for p in store.root.iterdir()] == []  # nothing half-written, nothing trusted
    _resume(recipe, run, ["a", "b"])


def test_output_dir_under_a_file(tmp_path, recipe):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = runner.invoke(app, ["run", str(recipe), "-o", str(blocker / "run")])
    assert r.exit_code == 2 and "cannot write the run directory" in r.stderr and "--output" in r.stderr, r.output
    assert "Traceback" not in r.output


def test_missing_output_dir_is_created(tmp_path, recipe):
    run = tmp_path / "does" / "not" / "exist"
    _resume(recipe, run, ["a", "b"])


def test_read_only_output_dir(tmp_path, recipe, monkeypatch):
    """A read-only disk (EROFS) for the run directory; simulated, since root may write anywhere."""
    import tempfile

    run = tmp_path / "ro"
    run.mkdir()
    real = tempfile.mkstemp

    def read_only(*a, dir=None, **kw):
        if dir is not None and str(dir).startswith(str(run)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(*a, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    r = runner.invoke(app, ["run", str(recipe), "-o", str(run)])
    assert r.exit_code == 2 and "Read-only file system" in r.stderr and "choose another --output" in r.stderr
    assert "Traceback" not in r.output
    assert not (run / "artifacts").exists() or not any((run / "artifacts").iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod; see test_read_only_output_dir")
def test_read_only_output_dir_for_real(tmp_path, recipe):
    run = tmp_path / "ro"
    run.mkdir()
    run.chmod(0o500)
    try:
        r = runner.invoke(app, ["run", str(recipe), "-o", str(run)])
        assert r.exit_code == 2 and "Permission denied" in r.stderr and "Traceback" not in r.output
    finally:
        run.chmod(0o700)
