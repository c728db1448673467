"""Fuzzed recipes: every malformed or adversarial recipe gives a valid plan, or one clear error line
with exit code 2 — never a traceback, never a hang.

Recipes are generated as a valid base recipe, then broken by structural mutations (wrong types,
unknown keys, cycles, self-parents, huge/negative/non-finite numbers, unicode, deep nesting) and
text mutations (YAML anchors and alias bombs, object-building tags, merge keys, truncation,
garbage bytes), with random ``key=value`` overrides and sweeps. Each one goes through the real CLI
(``stackcomp validate`` / ``stackcomp plan --json``) in-process, under a wall-clock alarm.

Profiles: ``stackcomp-fast`` (100 examples, the default) and ``stackcomp-slow`` (1,000), chosen by
``--runslow`` or ``STACKCOMP_FUZZ_PROFILE=slow``.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from stackcomp.cli import app
from stackcomp.plan import build_plan
from stackcomp.recipe import load_recipe

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("stackcomp-fast", max_examples=100, **_COMMON)
settings.register_profile("stackcomp-slow", max_examples=1000, **_COMMON)

#: seconds one recipe may take through the CLI before the test calls it a hang
TIME_LIMIT = 20.0

runner = CliRunner()


class Hang(BaseException):
    """Raised by the alarm; a BaseException so that CliRunner does not swallow it."""


def _profile(config) -> settings:
    slow = config.getoption("--runslow") or os.environ.get("STACKCOMP_FUZZ_PROFILE") == "slow"
    return settings.get_profile("stackcomp-slow" if slow else "stackcomp-fast")


# ----------------------------------------------------------------------------- generators

PASSES = ["finetune", "evaluate", "ds_factorize", "export"]
NAMES = ["ft", "ds", "ev", "out", "a", "b.c", "x-1", "r[1]"]
WEIRD_TEXT = st.text(
    alphabet=st.one_of(st.characters(codec="utf-8"),
                       st.sampled_from(list("[]{}:,&*!|>'\"#%@`\\/\n\t\r\x00\x85\u2028"))),
    max_size=24,
)
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63), 1e308, -1e308, 5e-324, 10**30]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, WEIRD_TEXT)
JUNK = st.recursive(
    SCALARS,
    lambda kids: st.one_of(st.lists(kids, max_size=4),
                           st.dictionaries(st.one_of(WEIRD_TEXT, st.integers()), kids, max_size=4)),
    max_leaves=12)


@st.composite
def valid_params(draw, pass_name: str) -> dict:
    if pass_name == "finetune":
        keys = draw(st.sets(st.sampled_from(["epochs", "max_steps", "lr", "batch_size", "grad_accum", "seed"])))
        gen = {"epochs": st.floats(0.01, 5), "max_steps": st.integers(1, 10**6), "lr": st.floats(1e-7, 1.0),
               "batch_size": st.integers(1, 512), "grad_accum": st.integers(1, 8), "seed": st.integers(0, 2**31)}
        return {k: draw(gen[k]) for k in keys}
    if pass_name == "evaluate":
        return {"latency": draw(st.booleans()), "batch_size": draw(st.integers(1, 1024))}
    if pass_name == "ds_factorize":
        if draw(st.booleans()):
            return {"ratio": draw(st.floats(1.01, 100))}
        atoms = draw(st.integers(1, 256))
        return {"block": draw(st.sampled_from([8, 16, 32, 64])), "atoms": atoms, "nnz": draw(st.integers(1, atoms)),
                "train": {"epochs": 0}}
    return {"path": draw(st.sampled_from(["out", "/tmp/x", "ü/ñ"]))}


@st.composite
def base_recipe(draw) -> dict:
    """A valid recipe: a chain with optional branches, from the built-in passes."""
    n = draw(st.integers(1, 5))
    stages: dict = {}
    names = draw(st.lists(st.sampled_from(NAMES), min_size=n, max_size=n, unique=True))
    for i, name in enumerate(names):
        if i == 0:
            p = draw(st.sampled_from(["finetune", "ds_factorize"]))
            spec = {"pass": p}
        else:
            p = draw(st.sampled_from(PASSES))
            parents = [s for s in names[:i] if stages[s]["pass"] in ("finetune", "ds_factorize")]
            if not parents:
                p, parents = "finetune", names[:1]
            spec = {"pass": p, "after": draw(st.sampled_from(parents))}
        if draw(st.booleans()):
            spec["params"] = draw(valid_params(p))
        stages[name] = spec
    recipe = {"name": draw(st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=30)),
              "model": draw(st.sampled_from(["minilm-l6", "some/hub-id", "./local", "ünï/cödé"])),
              "task": "glue/sst2", "stages": stages}
    if draw(st.booleans()):
        recipe["data"] = {"max_length": draw(st.integers(2, 512)), "max_train_samples": draw(st.integers(1, 10**9))}
    if draw(st.booleans()):
        recipe["seed"] = draw(st.integers(0, 2**32 - 1))
    return recipe


def _stage(recipe: dict, draw) -> tuple[str, dict]:
    name = draw(st.sampled_from(list(recipe["stages"])))
    return name, recipe["stages"][name]


@st.composite
def mutated(draw, recipe: dict) -> dict:
    """Apply 0-3 structural mutations."""
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from([
            "wrong_type", "unknown_key", "unknown_param", "self_parent", "cycle", "missing_parent", "bad_number",
            "unicode_name", "deep", "drop_required", "bad_pass", "plugin_path", "junk_value", "after_list",
            "no_task", "stage_junk", "teacher_self",
        ]))
        stages = recipe.get("stages")
        if not isinstance(stages, dict) or not stages:
            recipe["stages"] = draw(JUNK)
            continue
        name, spec = _stage(recipe, draw)
        if not isinstance(spec, dict):
            continue
        if kind == "wrong_type":
            field = draw(st.sampled_from(["name", "model", "task", "seed", "data", "stages", "device", "goal",
                                          "allow_plugins", "trust_remote_code", "evaluate_leaves"]))
            recipe[field] = draw(JUNK)
        elif kind == "unknown_key":
            target = draw(st.sampled_from(["top", "stage", "data"]))
            key = draw(WEIRD_TEXT)
            {"top": recipe, "stage": spec, "data": recipe.setdefault("data", {})}[target][key] = draw(JUNK)
        elif kind == "unknown_param":
            spec.setdefault("params", {})[draw(WEIRD_TEXT)] = draw(JUNK)
        elif kind == "self_parent":
            spec["after"] = name
        elif kind == "cycle":
            other, ospec = _stage(recipe, draw)
            if isinstance(ospec, dict):
                ospec["after"] = name
                spec["after"] = other
        elif kind == "missing_parent":
            spec["after"] = draw(st.one_of(WEIRD_TEXT, st.just("nope")))
        elif kind == "bad_number":
            key = draw(st.sampled_from(["lr", "epochs", "max_steps", "batch_size", "block", "atoms", "nnz", "ratio",
                                        "grad_accum", "seed", "warmup_ratio"]))
            spec.setdefault("params", {})[key] = draw(NUMBERS)
        elif kind == "unicode_name":
            new = draw(WEIRD_TEXT)
            recipe["stages"] = {(new if k == name else k): v for k, v in stages.items()}
        elif kind == "deep":
            value: object = draw(SCALARS)
            for _ in range(draw(st.integers(1, 200))):
                value = [value] if draw(st.booleans()) else {"k": value}
            spec["params"] = value if draw(st.booleans()) else {"lr": value}
        elif kind == "drop_required":
            recipe.pop(draw(st.sampled_from(["name", "model", "stages", "task"])), None)
        elif kind == "bad_pass":
            spec["pass"] = draw(st.one_of(WEIRD_TEXT, JUNK))
        elif kind == "plugin_path":
            path = draw(st.sampled_from(["os:system", "subprocess:Popen", "stackcomp.cli:main", ":", "..x:Y",
                                         "nope_mod_xyz:P", "stackcomp.passes.finetune:FinetunePass", "a:b\n",
                                         "builtins:object"]))
            spec["pass"] = path
            if draw(st.booleans()):
                recipe["allow_plugins"] = [path]
        elif kind == "junk_value":
            spec[draw(st.sampled_from(["pass", "after", "params"]))] = draw(JUNK)
        elif kind == "after_list":
            spec["after"] = draw(st.lists(st.one_of(st.sampled_from(list(stages)), WEIRD_TEXT), max_size=4))
        elif kind == "no_task":
            recipe.pop("task", None)
        elif kind == "stage_junk":
            stages[name] = draw(JUNK)
        elif kind == "teacher_self":
            spec.setdefault("params", {})["teacher"] = name
    return recipe


def _bomb(depth: int, width: int, prefix: str) -> tuple[str, str]:
    """Billion laughs: ``depth`` anchored lists each holding ``width`` aliases of the previous one."""
    lines = [f"x-{prefix}0: &{prefix}0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, depth):
        lines.append(f"x-{prefix}{i}: &{prefix}{i} [{', '.join([f'*{prefix}{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n", f"*{prefix}{depth - 1}"


TAGS = ["!!python/object/apply:os.system ['echo pwned']", "!!python/name:os.system", "!!python/object/new:dict []",
        "!!python/module:os", "!custom 1", "!!binary aGVsbG8=", "!!set {a, b}", "!!timestamp 2001-12-14",
        "!!omap [a: 1]", "!!float nan", "!!int 99999999999999999999999", "!!str 1", "!<tag:x> 1"]


@st.composite
def recipe_text(draw) -> bytes:
    """YAML bytes: a (possibly mutated) recipe, then (maybe) a text-level attack."""
    recipe = draw(mutated(draw(base_recipe())))
    text = yaml_dump(recipe)
    attack = draw(st.sampled_from(["none", "none", "bomb", "tag", "deep_text", "recursive", "merge", "truncate",
                                   "garbage", "bom", "flow_junk", "dup_key", "include"]))
    if attack == "bomb":
        head, ref = _bomb(draw(st.integers(2, 14)), draw(st.integers(2, 12)), "l")
        where = draw(st.sampled_from(["x", "params", "after", "name", "data", "unknown"]))
        tail = {"x": "", "params": f"\nstages: {{a: {{pass: finetune, params: {ref}}}}}",
                "after": f"\nstages: {{a: {{pass: finetune}}, b: {{pass: evaluate, after: {ref}}}}}",
                "name": f"\nname: {ref}", "data": f"\ndata: {{max_length: {ref}}}",
                "unknown": f"\nlaughs: {ref}"}[where]
        text = head + _drop_keys(text, tail) + tail + "\n"
    elif attack == "tag":
        key = draw(st.sampled_from(["name", "model", "task", "seed", "stages", "extra"]))
        text = _drop_keys(text, f"\n{key}:") + f"{key}: {draw(st.sampled_from(TAGS))}\n"
    elif attack == "deep_text":
        n = draw(st.integers(10, 3000))
        opener, closer = draw(st.sampled_from([("[", "]"), ("{a: ", "}"), ("- ", "")]))
        if opener == "- ":
            nested = "".join("  " * i + "-\n" for i in range(min(n, 400)))
            text = _drop_keys(text, "\nname:") + "name:\n" + textwrap.indent(nested, "  ")
        else:
            text = _drop_keys(text, "\nname:") + "name: " + opener * n + "1" + closer * n + "\n"
    elif attack == "recursive":
        text = "x-r: &r [*r]\n" + text if draw(st.booleans()) else _drop_keys(text, "\nstages:") + \
            "stages: &s {a: {pass: finetune, params: *s}}\n"
    elif attack == "merge":
        text = "x-base: &base {pass: finetune, params: {lr: 0.001}}\n" + _drop_keys(text, "\nstages:") + \
            f"stages: {{m: {{<<: {draw(st.sampled_from(['*base', '[*base]', '1', '[1, *base]']))}}}}}\n"
    elif attack == "truncate":
        text = text[: draw(st.integers(0, max(0, len(text) - 1)))]
    elif attack == "flow_junk":
        text = text + draw(st.sampled_from(["]", "}", ": :", "? [a]\n: 1", "&", "*nope", "%YAML 1.1\n---",
                                            "---\nname: second\n", "\t", "'", '"\\ud800"', "key: \"\\x00\"\n"]))
    elif attack == "dup_key":
        text = text + text.splitlines()[0] + "\n" if text else text
    elif attack == "include":
        text = draw(st.sampled_from(["include: r.yaml\n", "include: /dev/zero\n", "include: /\n", "include: [1, 2]\n",
                                     "include: missing.yaml\n", "include: \"\\0\"\n"])) + text
    data = text.encode("utf-8", "surrogatepass")
    if attack == "garbage":
        data = draw(st.binary(max_size=200)) + data[: draw(st.integers(0, len(data)))]
    elif attack == "bom":
        data = b"\xef\xbb\xbf" + data
    return data


def yaml_dump(obj: object) -> str:
    import yaml

    try:
        return yaml.safe_dump(obj, allow_unicode=True, sort_keys=False, width=10**6)
    except (yaml.YAMLError, RecursionError, ValueError):
        return json.dumps(obj, default=str)  # JSON is YAML; NaN becomes the plain scalar NaN


def _drop_keys(text: str, tail: str) -> str:
    """Remove top-level lines whose key the attack redefines (so it does not trip duplicate-key errors)."""
    keys = {line.split(":")[0].strip() for line in tail.strip().splitlines()
            if ":" in line and not line.startswith(" ")}
    out, skipping = [], False
    for line in text.splitlines():
        top = line and not line[0].isspace() and not line.startswith("-")
        if top:
            skipping = line.split(":")[0].strip() in keys
        if not skipping:
            out.append(line)
    return "\n".join(out) + "\n"


OVERRIDES = st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={v}",
              st.sampled_from(["seed", "name", "model", "task", "stages.ft.params.lr", "stages.ds.params.nnz",
                               "stages.a.params.epochs", "stages.ft.after", "data.max_length", "stages.zz.params.x",
                               "stages", "x..y", "", "stages.ft", "stages.ft.params.lr.deeper"]),
              st.one_of(st.sampled_from(["1", "1,2", "1,2,3", "[1,2]", "{a: 1}", "!!python/name:os.system", "&a [*a]",
                                         "null", "-1", "1e999", ".nan", "3e-5", "[", "a,b", "1,1"]),
                        WEIRD_TEXT)),
    WEIRD_TEXT,
), max_size=3)


# ----------------------------------------------------------------------------- the check


def _alarm(signum, frame):  # noqa: ARG001
    raise Hang(f"no answer within {TIME_LIMIT} s")


def check_cli(folder, data: bytes, overrides: list[str], command: str, outcomes: Counter) -> None:
    path = folder / "r.yaml"
    path.write_bytes(data)
    args = (["validate", str(path)] if command == "validate"
            else ["plan", str(path), "--json", "-o", str(folder / "run")])
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT)
    try:
        result = runner.invoke(app, [*args, "--", *overrides] if overrides else args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    shown = f"recipe {data[:300]!r} overrides {overrides!r}\noutput: {result.output!r}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{type(result.exception).__name__}: {result.exception}\n{shown}") from result.exception
    assert result.exit_code in (0, 2), shown
    assert "Traceback" not in result.output, shown
    if result.exit_code == 2:
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), shown
        assert len(lines[0]) > len("error: ") + 10, shown  # says something
        outcomes["error"] += 1
        return
    # a valid plan: the same recipe builds a DAG whose parents all exist, every stage keyed
    plan = build_plan(load_recipe(path, overrides))
    assert plan.order and set(plan.order) == set(plan.stages)
    for name, stage in plan.stages.items():
        assert all(p in plan.stages and plan.order.index(p) < plan.order.index(name) for p in stage.parents)
    assert all(len(s.key) == 20 and int(s.key, 16) >= 0 for s in plan.stages.values())  # equal work, equal key
    if command == "plan":
        listed = json.loads(result.stdout)
        assert [s["stage"] for s in listed] == plan.order
    outcomes["valid"] += 1


def test_fuzzed_recipes_give_a_plan_or_one_error_line(tmp_path, pytestconfig, data_env):  # validate checks the data
    outcomes: Counter = Counter()

    @_profile(pytestconfig)
    @given(data=recipe_text(), overrides=OVERRIDES, command=st.sampled_from(["validate", "validate", "plan"]))
    def run(data, overrides, command):
        check_cli(tmp_path, data, overrides, command, outcomes)

    run()
    print(f"fuzzed recipes: {dict(outcomes)}")
    # the generator reaches both sides: plans that validate, and errors
    assert outcomes["valid"] >= 3 and outcomes["error"] >= 10, outcomes


# ----------------------------------------------------------------------------- fixed adversarial cases

CASES = {
    "billion_laughs_9x9": _bomb(9, 9, "l")[0] + "name: x\nmodel: m\nstages: {a: {pass: finetune, params: *l8}}\n",
    "billion_laughs_in_after": _bomb(12, 10, "l")[0] + "name: x\nmodel: m\ntask: glue/sst2\n"
                               "stages: {a: {pass: finetune}, b: {pass: evaluate, after: *l11}}\n",
    "python_object_tag": "name: !!python/object/apply:os.system ['echo pwned']\nmodel: m\nstages: {}\n",
    "python_name_tag": "name: x\nmodel: !!python/name:os.system\nstages: {}\n",
    "self_parent": "name: x\nmodel: m\ntask: glue/sst2\nstages: {a: {pass: finetune, after: a}}\n",
    "cycle": "name: x\nmodel: m\ntask: glue/sst2\n"
             "stages: {a: {pass: finetune, after: b}, b: {pass: finetune, after: a}}\n",
    "markup_in_name": "name: x\nmodel: m\nstages: {a: {pass: '[/]'}}\n",
    "relative_plugin": "name: x\nmodel: m\nallow_plugins: ['..x:Y']\nstages: {a: {pass: '..x:Y'}}\n",
    "empty_plugin": "name: x\nmodel: m\nallow_plugins: [':']\nstages: {a: {pass: ':'}}\n",
    "duplicate_stage": "name: x\nmodel: m\ntask: glue/sst2\nstages:\n  a: {pass: finetune}\n  a: {pass: evaluate}\n",
    "unhashable_key": "name: x\nmodel: m\n? [a]\n: 1\nstages: {}\n",
    "recursive_alias": "name: x\nmodel: m\ntask: glue/sst2\nstages: &s {a: {pass: finetune, params: *s}}\n",
    "deep_nesting": "name: x\nmodel: m\nstages: " + "[" * 5000 + "]" * 5000 + "\n",
    "infinite_lr": "name: x\nmodel: m\ntask: glue/sst2\nstages: {a: {pass: finetune, params: {lr: .inf}}}\n",
    "huge_int": "name: x\nmodel: m\ntask: glue/sst2\nstages: {a: {pass: finetune, params: {batch_size: 1e400}}}\n",
    "include_device": "include: /dev/zero\nname: x\n",
    "non_utf8": "name: x\nmodel: m\n",
}


OVERRIDE_CASES = {  # found by the fuzzer: TypeErrors while writing the error message
    "int_stage_key": ("name: x\nmodel: m\nstages: {0: null}\n", ["stages.ft.params.lr=1"]),
    "int_after_swept": ("name: x\nmodel: m\nstages: {a: {pass: evaluate, after: 5}}\n", ["stages.a.params.x=1,2"]),
}


@pytest.mark.parametrize("name", sorted(CASES) + sorted(OVERRIDE_CASES))
def test_adversarial_recipe_is_refused_in_one_line(tmp_path, name):
    text, overrides = OVERRIDE_CASES.get(name, (CASES.get(name), []))
    data = text.encode() if name != "non_utf8" else b"name: \xff\xfe\nmodel: m\n"
    outcomes: Counter = Counter()
    check_cli(tmp_path, data, overrides, "validate", outcomes)
    assert outcomes == Counter(error=1)


def test_tags_are_refused_with_how_to(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: !!python/object/apply:os.system ['touch " + str(tmp_path / "pwned") + "']\nmodel: m\n")
    r = runner.invoke(app, ["validate", str(p)])
    assert r.exit_code == 2 and "tag refused" in r.stderr and "without the !tag" in r.stderr
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("overrides,needle", [
    (["stages.ft.params.lr=1e-4,2e-4", "stages.ds.params.batch_size=4,8"], None),  # upstream swept first
    (["stages.ds.params.batch_size=4,8", "stages.ds.params.latency=true,false"], None),  # one stage, two keys
    (["stages.ft.params.lr=1,2", "stages.ft.params.lr=3,4"], "swept twice"),
    (["stages.ft.params.lr=1,1"], "would exist twice"),
])
def test_sweeps_compose(tmp_path, overrides, needle, data_env):
    p = tmp_path / "r.yaml"  # a model and data that exist: validate checks the inputs too
    p.write_text("name: s\nmodel: minilm-l6\ntask: glue/sst2\nstages:\n  ft: {pass: finetune}\n"
                 "  ds: {pass: evaluate, after: ft}\n  ev: {pass: evaluate, after: ds}\n")
    r = runner.invoke(app, ["validate", str(p), *overrides])
    if needle is None:
        assert r.exit_code == 0, r.output
        plan = build_plan(load_recipe(p, overrides))
        assert len([n for n in plan.stages if n.startswith("ev[")]) == 4
    else:
        assert r.exit_code == 2 and needle in r.stderr, r.output


def test_real_process_prints_markup_and_surrogates_safely(tmp_path):
    import subprocess
    import sys

    p = tmp_path / "r.yaml"
    p.write_text('include: "\\ud800[/].yaml"\nname: x\n')
    proc = subprocess.run([sys.executable, "-m", "stackcomp.cli", "validate", str(p)], capture_output=True,
                          timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and "[/]" in err
