"""Kernel builds after a kill: a build killed while holding torch's lock file no longer blocks
every later build (the stale lock is removed with a warning), a live builder is waited for with a
message and a bound, and a finished build is loaded without running ninja, so switching the
ninja on PATH does not rebuild it.

A tiny C++ extension (no torch headers: it compiles in about a second) goes through the same
:func:`stackcomp.kernels.ds_cpu.load_extension` as the DS kernel, in a temporary
TORCH_EXTENSIONS_DIR; the tests skip without a compiler or ninja."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from stackcomp.kernels import ds_cpu
from stackcomp.kernels.reference import KernelError

pytestmark = pytest.mark.skipif(shutil.which("c++") is None or shutil.which("ninja") is None,
                                reason="needs a C++ compiler and ninja")

TINY = textwrap.dedent("""\
    #include <Python.h>
    #define STR2(x) #x
    #define STR(x) STR2(x)
    #define CAT2(a, b) a##b
    #define CAT(a, b) CAT2(a, b)
    static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(42); }
    static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, nullptr}, {nullptr, nullptr, 0, nullptr}};
    static PyModuleDef def = {PyModuleDef_HEAD_INIT, STR(TORCH_EXTENSION_NAME), nullptr, -1, methods};
    PyMODINIT_FUNC CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&def); }
""")


@pytest.fixture
def tiny(tmp_path, monkeypatch, request):
    """(name, source, build directory) of a tiny extension built in a private extensions folder."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    src = tmp_path / "tiny.cpp"
    src.write_text(TINY)
    name = f"stackcomp_test_tiny_{request.node.name[5:25].replace('[', '_').replace(']', '')}_{os.getpid()}"
    return name, src, tmp_path / "ext" / name


def _load(name, src, **kw):
    return ds_cpu.load_extension(name, [src], ["-O0"], [], **kw)


def _hold_in_child(code: str) -> subprocess.Popen:
    """A child that takes a lock, says 'ready', and holds it."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _hold_build_lock(build_dir, seconds: float) -> subprocess.Popen:
    """A child that holds stackcomp's build lock for ``seconds``, as a live builder does."""
    return _hold_in_child(textwrap.dedent(f"""\
        import time
        from filelock import FileLock
        lock = FileLock({str(build_dir / ds_cpu.BUILD_LOCK)!r})
        lock.acquire()
        print("ready", flush=True)
        time.sleep({seconds})
        lock.release()
    """))


def test_stale_torch_lock_from_a_killed_build_is_removed_with_a_warning(tiny, caplog):
    name, src, build_dir = tiny
    build_dir.mkdir(parents=True)
    # a build SIGKILLed while holding torch's baton: the file stays behind
    proc = _hold_in_child(textwrap.dedent(f"""\
        import time
        from torch.utils.file_baton import FileBaton
        assert FileBaton({str(build_dir / 'lock')!r}).try_acquire()
        print("ready", flush=True)
        time.sleep(600)
    """))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (build_dir / "lock").exists()
    with caplog.at_level(logging.WARNING, logger="stackcomp.kernels"):
        t = time.time()
        module = _load(name, src, wait_s=60)
    assert module.answer() == 42 and time.time() - t < 120
    assert "stale build lock" in caplog.text and "interrupted kernel build" in caplog.text
    assert not (build_dir / "lock").exists()


def test_a_live_builder_is_waited_for_with_a_message(tiny, caplog):
    name, src, build_dir = tiny
    build_dir.mkdir(parents=True)
    proc = _hold_build_lock(build_dir, seconds=2)
    try:
        with caplog.at_level(logging.WARNING, logger="stackcomp.kernels"):
            module = _load(name, src, wait_s=120)
    finally:
        proc.wait(timeout=60)
    assert module.answer() == 42
    assert "waiting for another process that is building the kernel" in caplog.text


def test_waiting_is_bounded(tiny):
    name, src, build_dir = tiny
    build_dir.mkdir(parents=True)
    proc = _hold_build_lock(build_dir, seconds=600)
    try:
        with pytest.raises(KernelError, match="held the kernel build lock .* for more than 1 s"):
            _load(name, src, wait_s=1)
    finally:
        proc.kill()
        proc.wait()
    assert _load(name, src, wait_s=60).answer() == 42  # the holder died: its lock went with it


def test_a_killed_holder_of_the_build_lock_does_not_block(tiny):
    name, src, build_dir = tiny
    build_dir.mkdir(parents=True)
    proc = _hold_in_child(textwrap.dedent(f"""\
        import time
        from filelock import FileLock
        from torch.utils.file_baton import FileBaton
        lock = FileLock({str(build_dir / ds_cpu.BUILD_LOCK)!r})
        lock.acquire()
        FileBaton({str(build_dir / 'lock')!r}).try_acquire()
        print("ready", flush=True)
        time.sleep(600)
    """))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _load(name, src, wait_s=5).answer() == 42


def test_a_finished_build_loads_without_ninja(tiny):
    """Another ninja on PATH (or none at all) does not rebuild a finished build."""
    name, src, build_dir = tiny
    assert _load(name, src).answer() == 42
    library = next(build_dir.glob(f"{name}.*so"))
    before = library.stat().st_mtime_ns, (build_dir / "tiny.o").stat().st_mtime_ns
    code = textwrap.dedent(f"""\
        from pathlib import Path
        from stackcomp.kernels import ds_cpu
        m = ds_cpu.load_extension({name!r}, [Path({str(src)!r})], ["-O0"], [])
        print(m.answer())
    """)
    for path in ("/usr/bin:/bin", str(build_dir)):  # the system's ninja first; then no ninja at all
        env = {**os.environ, "PATH": path}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                             check=False)
        assert out.returncode == 0 and out.stdout.strip() == "42", out.stderr[-2000:]
    assert (library.stat().st_mtime_ns, (build_dir / "tiny.o").stat().st_mtime_ns) == before


def test_a_damaged_finished_build_is_built_again(tiny):
    name, src, build_dir = tiny
    assert _load(name, src).answer() == 42
    library = next(build_dir.glob(f"{name}.*so"))
    library.unlink()  # (a new file: this process has the old one mapped)
    library.write_bytes(b"not a library")
    (build_dir / "tiny.o").unlink()  # so that ninja rebuilds what was damaged
    code = textwrap.dedent(f"""\
        import logging
        from pathlib import Path
        from stackcomp.kernels import ds_cpu
        logging.basicConfig(level=logging.WARNING)
        print(ds_cpu.load_extension({name!r}, [Path({str(src)!r})], ["-O0"], []).answer())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "42", out.stderr[-2000:]
    assert "cannot be loaded" in out.stderr and "building it again" in out.stderr
