"""Kill-and-resume harness: run a 4-stage recipe in a subprocess, SIGKILL it when a chosen event is
seen, re-run, and check that finished stages are kept and the results equal an uninterrupted run's.

Events are observed from outside, without hooks in the code under test: the artifact folder
(``.tmp-<key>-*`` appears when a stage starts, ``model/`` or ``stage.json`` inside it when the
artifact starts being written, ``model/model.safetensors`` while the weights are written,
``CHECKSUMS.json`` just before the rename, the final folder after it) and the
log on stderr ("training N steps" when a stage's training loop starts). Shared by the fast test
(tests/test_kill_resume.py) and the slow one (tests/slow/test_kill_resume.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ["ft", "ds", "ft2", "ev"]
EVENTS = ["started", "training", "write", "weights", "checksums", "committed"]
#: metrics that measure time, not results
TIMING = re.compile(r"seconds|latency_ms|_time")
RUN_TIMEOUT = 600


def recipe_text(model_dir: Path) -> str:
    """finetune -> ds_factorize (STF) -> finetune -> evaluate; dropout on, so seeding matters."""
    return f"""\
name: kill-resume
model: {model_dir}
task: glue/sst2
data: {{max_length: 32}}
stages:
  ft:  {{pass: finetune, params: {{max_steps: 8, batch_size: 16, lr: 1.0e-3, eval_every: 4}}}}
  ds:  {{pass: ds_factorize, after: ft, params: {{block: 16, atoms: 8, nnz: 2, iters: 2,
         train: {{max_steps: 6, batch_size: 16, lr: 1.0e-3}}}}}}
  ft2: {{pass: finetune, after: ds, params: {{max_steps: 4, batch_size: 16, lr: 1.0e-3}}}}
  ev:  {{pass: evaluate, after: ft2, params: {{latency_batches: 1, latency_repeats: 1}}}}
"""


def child_env(data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(STACKCOMP_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONUNBUFFERED="1")
    return env


@dataclass
class KillPoint:
    event: str  # one of EVENTS
    stage: str
    delay: float = 0.0  # seconds after the event

    def __str__(self) -> str:
        return f"{self.event}:{self.stage}+{self.delay:.2f}s"


@dataclass
class Outcome:
    returncode: int
    killed: bool
    stderr: str
    summary: dict | None = None
    #: where the kill landed: complete stages, and the files of half-written artifact folders
    complete: list[str] = field(default_factory=list)
    half_written: dict[str, list[str]] = field(default_factory=dict)
    training_seen: int = 0


class Run:
    """One recipe in one run directory, with the stage keys computed in this process."""

    def __init__(self, recipe: Path, run_dir: Path, env: dict[str, str]):
        from unittest import mock

        from stackcomp.plan import build_plan
        from stackcomp.recipe import load_recipe

        self.recipe, self.run_dir, self.env = recipe, run_dir, env
        # keys cover the data files: compute them on the data the child runs on
        with mock.patch.dict(os.environ, {"STACKCOMP_DATA_DIR": env["STACKCOMP_DATA_DIR"]}):
            plan = build_plan(load_recipe(recipe))
        assert [n for n in plan.order] == STAGES, plan.order
        self.keys = {n: plan.stages[n].key for n in STAGES}
        self.artifacts = run_dir / "artifacts"

    # ------------------------------------------------------------------ observation

    def tmp_dirs(self, stage: str) -> list[Path]:
        if not self.artifacts.exists():
            return []
        return [p for p in self.artifacts.iterdir() if p.name.startswith(f".tmp-{self.keys[stage]}-")]

    def complete(self) -> list[str]:
        return [s for s in STAGES if (self.artifacts / self.keys[s] / "CHECKSUMS.json").exists()]

    def stamps(self) -> dict[str, tuple[int, int]]:
        """(inode, mtime) of each complete artifact's checksum file: changes if the stage is rewritten."""
        out = {}
        for s in self.complete():
            st = (self.artifacts / self.keys[s] / "CHECKSUMS.json").stat()
            out[s] = (st.st_ino, st.st_mtime_ns)
        return out

    def digests(self) -> dict[str, str]:
        """sha256 of every stage's weights, from its CHECKSUMS.json."""
        out = {}
        for s in self.complete():
            sums = json.loads((self.artifacts / self.keys[s] / "CHECKSUMS.json").read_text())
            if "model/model.safetensors" in sums:
                out[s] = sums["model/model.safetensors"][0]
        return out

    def _fired(self, kp: KillPoint, lines: list[str], training_before: list[int]) -> bool:
        tmp = self.tmp_dirs(kp.stage)
        if kp.event == "committed":
            return (self.artifacts / self.keys[kp.stage] / "CHECKSUMS.json").exists()
        if not tmp:
            return False
        if kp.event == "started":
            return True
        if kp.event == "training":
            n = sum("training " in ln and " steps" in ln for ln in lines)
            if not training_before:
                training_before.append(n)  # training lines seen before this stage started
            return n > training_before[0]
        if kp.event == "write":
            return any((t / "model").exists() or (t / "stage.json").exists() for t in tmp)
        if kp.event == "weights":
            return any((t / "model" / "model.safetensors").exists() for t in tmp)
        if kp.event == "checksums":
            return any((t / "CHECKSUMS.json").exists() for t in tmp)
        raise ValueError(kp.event)

    # ------------------------------------------------------------------ running

    def run(self, kill: KillPoint | None = None) -> Outcome:
        cmd = [sys.executable, "-m", "stackcomp.cli", "run", str(self.recipe), "-o", str(self.run_dir), "--json"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env)
        lines: list[str] = []
        out: list[str] = []
        readers = [threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True),
                   threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)]
        for t in readers:
            t.start()
        killed = False
        training_before: list[int] = []
        deadline = time.monotonic() + RUN_TIMEOUT
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise AssertionError(f"run did not finish within {RUN_TIMEOUT} s:\n{''.join(lines)[-3000:]}")
                if kill is not None and not killed and self._fired(kill, lines, training_before):
                    if kill.delay:
                        time.sleep(kill.delay)
                    if proc.poll() is None:
                        os.kill(proc.pid, signal.SIGKILL)
                        killed = True
                    break
                time.sleep(0.001)
            proc.wait(timeout=RUN_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for t in readers:
            t.join(timeout=10)
        outcome = Outcome(returncode=proc.returncode, killed=killed, stderr="".join(lines),
                          complete=self.complete(),
                          training_seen=sum("training " in ln and " steps" in ln for ln in lines))
        for s in STAGES:
            for t in self.tmp_dirs(s):
                outcome.half_written[s] = sorted(p.relative_to(t).as_posix() for p in t.rglob("*") if p.is_file())
        if not killed and proc.returncode == 0:
            text = "".join(out)
            outcome.summary = json.loads(text[text.index("{"):])
        return outcome


def comparable(summary: dict) -> dict[str, dict]:
    """Every stage's metrics without the timings."""
    return {s["stage"]: {k: v for k, v in s["metrics"].items() if not TIMING.search(k)} for s in summary["stages"]}


def kill_chain(run: Run, points: list[KillPoint], reference: dict, ref_digests: dict[str, str]) -> list[str]:
    """Kill at each point in turn (each run resuming the last), then run to the end and check.

    Returns one line per kill saying where it landed.
    """
    landed = []
    stamps_before: dict[str, tuple[int, int]] = {}
    for kp in points:
        o = run.run(kill=kp)
        assert o.returncode in (0, -signal.SIGKILL), f"{kp}: exit {o.returncode}\n{o.stderr[-3000:]}"
        # finished stages were not recomputed: their artifacts are the very same files
        stamps = run.stamps()
        for s, st in stamps_before.items():
            assert stamps.get(s) == st, f"{kp}: the finished stage {s!r} was rewritten or lost"
        stamps_before = stamps
        where = "finished before the event" if not o.killed else (
            f"complete {o.complete}, half-written {o.half_written or '{}'}")
        landed.append(f"{kp}: {where}")
        if not o.killed:
            break
    final = run.run()
    assert final.returncode == 0 and final.summary is not None, f"resume failed:\n{final.stderr[-3000:]}"
    ran = final.summary["ran"]
    assert ran == [s for s in STAGES if s not in stamps_before], (ran, stamps_before, landed)
    for s in stamps_before:
        assert run.stamps()[s] == stamps_before[s], f"the finished stage {s!r} was rewritten by the resume"
    statuses = {s["stage"]: s["status"] for s in final.summary["stages"]}
    assert all(statuses[s] == "cached" for s in stamps_before), statuses
    leftovers = [p.name for p in run.artifacts.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    assert leftovers == [], leftovers
    assert comparable(final.summary) == reference, (landed, comparable(final.summary), reference)
    assert run.digests() == ref_digests, landed
    return landed
