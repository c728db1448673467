"""Exports load through transformers' ``from_pretrained`` right, or not at all (issue 22, item 1).

For every compressed layer kind: export a tiny model, then in fresh processes
``AutoModelForSequenceClassification.from_pretrained`` gives exactly ``stackcomp.load``'s logits
when ``import stackcomp`` came first, and raises when stackcomp cannot be imported; the folders
``save_pretrained`` writes behave the same. A ``dense: true`` export loads in plain transformers
and computes what the compressed model does.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import stackcomp
from stackcomp.hf_integration import GUARD_WEIGHTS
from stackcomp.nn.ds_linear import DSLinear
from stackcomp.nn.half import HalfLinear
from stackcomp.nn.lowrank import (
    BlockLowRankLinear,
    DoubleSparseLinear,
    LowRankLinear,
    SparseLowRankLinear,
)
from stackcomp.nn.packed import PackedDSLinear, Sparse24Linear
from stackcomp.nn.quantized import (
    Int4Embedding,
    Int8DSLinear,
    Int8Embedding,
    Int8Linear,
    Int8LowRankLinear,
)
from stackcomp.nn.remapped import RemappedEmbedding, RemappedInt8Embedding
from stackcomp.nn.unpadded import apply_unpadding
from stackcomp.passes.base import PassContext, run_pass
from stackcomp.passes.export import ExportPass
from stackcomp.targets import set_module
from tests.conftest import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
IDS = [[101, 2023, 2003, 1037, 3231, 1012, 102, 0], [101, 7592, 2088, 102, 0, 0, 0, 0]]


def _ds(linear):
    return DSLinear.from_linear(linear, block=16, atoms=8, nnz=3)


def _sparse24(linear):
    """The 2:4 layer of ``linear`` with the 2 largest of every 4 input weights kept."""
    w = linear.weight.detach().view(linear.out_features, -1, 4)
    keep = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, w.abs().topk(2, dim=-1).indices, True)
    with torch.no_grad():
        linear.weight.mul_(keep.view_as(linear.weight))
    return Sparse24Linear.from_linear(linear)


#: layer kind -> what replaces each encoder linear; "embedding" kinds replace the word embeddings
LINEAR_KINDS = {
    "int8": Int8Linear.from_linear,
    "ds": _ds,
    "int8_ds": lambda m: Int8DSLinear.from_ds(_ds(m)),
    # the torch kernel: the same stored layout as the compiled one, without compiling it here
    "ds_int8_packed": lambda m: PackedDSLinear.from_ds(Int8DSLinear.from_ds(_ds(m)), kernel="torch"),
    "lowrank": lambda m: LowRankLinear.from_linear(m, rank=4),
    "int8_lowrank": lambda m: Int8LowRankLinear.from_lowrank(LowRankLinear.from_linear(m, rank=4)),
    "blocklr": lambda m: BlockLowRankLinear.from_linear(m, grid=(2, 2), rank=3),
    "losparse": lambda m: SparseLowRankLinear.from_linear(m, rank=4),
    "dsf": lambda m: DoubleSparseLinear.from_linear(m, density=0.5),
    "sparse24": _sparse24,
    "half": HalfLinear.from_linear,
}
def _vocab_pruned(emb):
    return RemappedEmbedding.from_embedding(emb, torch.arange(0, emb.num_embeddings, 3), unseen="mean")


EMBEDDING_KINDS = {
    "int8_embedding": Int8Embedding.from_embedding,
    "int4_embedding": lambda e: Int4Embedding.from_embedding(e, group_size=16),
    "vocab_pruned": _vocab_pruned,
    "vocab_pruned_int8": lambda e: RemappedInt8Embedding.from_remapped(_vocab_pruned(e)),
}
#: kinds built from another kind's model: every attention block's int8 q/k/v fused (FusedInt8QKV + parts);
#: every block output's residual add + LayerNorm fused around its int8 dense (FusedResidualNorm);
#: the int8 model run unpadded (stackcomp.nn.unpadded: a config flag, hooks applied again on load)
FUSED_KINDS = {"int8_fused_qkv": "int8", "int8_fused_norm": "int8", "int8_unpad": "int8"}
KINDS = [*LINEAR_KINDS, *EMBEDDING_KINDS, *FUSED_KINDS]
#: kinds whose forward is the float product of what to_dense() returns (int8 layers quantize activations)
EXACT_DENSE = {"half", "ds", "ds_int8_packed", "lowrank", "blocklr", "losparse", "dsf", "sparse24", "int8_embedding",
               "int4_embedding", "vocab_pruned", "vocab_pruned_int8"}


def compressed_model(kind: str, seed: int = 0):
    if kind in FUSED_KINDS:
        from stackcomp.nn.fused_norm import find_residual_norms, residual_norm_module
        from stackcomp.nn.fused_qkv import find_qkvs, fused_qkv_modules

        model = compressed_model(FUSED_KINDS[kind], seed)
        if kind == "int8_unpad":
            return apply_unpadding(model)
        if kind == "int8_fused_norm":
            for site in find_residual_norms(model):
                set_module(model, site.name, residual_norm_module(model, site))
            return model
        for site in find_qkvs(model):
            for name, new in fused_qkv_modules(model, site).items():
                set_module(model, name, new)
        return model
    model = make_tiny_model("bert", seed=seed)
    if kind in EMBEDDING_KINDS:
        emb = model.bert.embeddings.word_embeddings
        set_module(model, "bert.embeddings.word_embeddings", EMBEDDING_KINDS[kind](emb))
    else:
        for name, m in list(model.named_modules()):
            if isinstance(m, torch.nn.Linear) and ".encoder." in f".{name}":
                set_module(model, name, LINEAR_KINDS[kind](m))
    return model.eval()


def run_python(code: str) -> dict:
    """``code`` in a fresh interpreter (stackcomp importable from the repo unless the code blocks it);
    its last stdout line is JSON."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO,
                       env=env, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


WITH_STACKCOMP = """
    import json, sys, torch
    import stackcomp  # first: registers the quantizer
    from transformers import AutoModelForSequenceClassification
    torch.set_num_threads(1)
    folders, ids = json.loads(sys.argv[1]) if len(sys.argv) > 1 else ({folders}, {ids})
    ids = torch.tensor(ids)
    mask = (ids != 0).long()
    def logits(m):
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=mask).logits
    out = {{}}
    for kind, path in folders.items():
        ref = logits(stackcomp.load(path))
        hf = AutoModelForSequenceClassification.from_pretrained(path)
        res = {{"equal": bool(torch.equal(logits(hf), ref)), "layers": sorted({{type(m).__name__ for m in hf.modules()}}),
               "attn": hf.config._attn_implementation}}
        for how, model in (("hf", hf), ("stackcomp", stackcomp.load(path))):
            again = f"{{path}}-resaved-from-{{how}}"
            model.save_pretrained(again)
            res[f"resaved_from_{{how}}"] = {{
                "hf": bool(torch.equal(logits(AutoModelForSequenceClassification.from_pretrained(again)), ref)),
                "stackcomp": bool(torch.equal(logits(stackcomp.load(again)), ref))}}
        res["ref"] = ref.tolist()
        out[kind] = res
    print(json.dumps(out))
"""

WITHOUT_STACKCOMP = """
    import json, sys, torch
    sys.modules["stackcomp"] = None  # stackcomp cannot be imported in this process
    try:
        import stackcomp
        blocked = False
    except ImportError:
        blocked = True
    from transformers import AutoModelForSequenceClassification
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    torch.set_num_threads(1)
    ids = torch.tensor({ids})
    out = {{"blocked": blocked, "registered": "stackcomp" in AUTO_QUANTIZER_MAPPING, "folders": {{}}}}
    for name, path in {folders}.items():
        try:
            m = AutoModelForSequenceClassification.from_pretrained(path)
        except Exception as e:
            out["folders"][name] = {{"raised": type(e).__name__, "message": str(e)}}
        else:
            with torch.no_grad():
                y = m(input_ids=ids, attention_mask=(ids != 0).long()).logits
            out["folders"][name] = {{"logits": y.tolist(), "dtype": str(next(m.parameters()).dtype),
                                    "layers": sorted({{type(x).__name__ for x in m.modules()}})}}
    print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every kind exported (stackcomp.save) and as a dense export (the export pass, dense: true)."""
    root = tmp_path_factory.mktemp("hf-exports")
    folders, dense = {}, {}
    for kind in KINDS:
        model = compressed_model(kind)
        folders[kind] = str(stackcomp.save(model, root / kind))
        ctx = PassContext(stage="out", work_dir=root / f"work-{kind}")
        run_pass(ExportPass({"path": str(root / f"{kind}-dense"), "dense": True}), model, ctx)
        dense[kind] = str(root / f"{kind}-dense")
    run_pass(ExportPass({"path": str(root / "dense-fp16"), "dense": True, "dtype": "float16"}),
             compressed_model("ds"), PassContext(stage="out", work_dir=root / "work-fp16"))
    dense["fp16"] = str(root / "dense-fp16")
    return folders, dense


@pytest.fixture(scope="module")
def with_stackcomp(exports):
    folders, _ = exports
    return run_python(WITH_STACKCOMP.format(folders=folders, ids=IDS))


@pytest.fixture(scope="module")
def without_stackcomp(exports, with_stackcomp):
    """Plain transformers on every export, every folder save_pretrained wrote, and the dense exports."""
    folders, dense = exports
    tried = dict(folders)
    for kind, path in folders.items():
        for how in ("hf", "stackcomp"):
            tried[f"{kind}-resaved-from-{how}"] = f"{path}-resaved-from-{how}"
    tried.update({f"dense-{k}": v for k, v in dense.items()})
    return run_python(WITHOUT_STACKCOMP.format(folders=tried, ids=IDS))


@pytest.mark.parametrize("kind", KINDS)
def test_from_pretrained_builds_the_compressed_layers_after_import_stackcomp(kind, with_stackcomp, exports):
    res = with_stackcomp[kind]
    assert res["equal"], f"{kind}: from_pretrained logits differ from stackcomp.load's"
    assert res["attn"] == ("stackcomp_unpadded" if kind == "int8_unpad" else "sdpa")  # unpadded again on load
    manifest = json.loads((Path(exports[0][kind]) / "stackcomp_manifest.json").read_text())
    assert {e["type"] for e in manifest["layers"].values()} <= set(res["layers"])  # the compressed classes, not dense
    # and they are the model's logits before export
    model = compressed_model(kind)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
    torch.testing.assert_close(torch.tensor(res["ref"]), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_round_trips(kind, with_stackcomp):
    res = with_stackcomp[kind]
    assert res["resaved_from_hf"] == {"hf": True, "stackcomp": True}
    assert res["resaved_from_stackcomp"] == {"hf": True, "stackcomp": True}


def test_without_stackcomp_every_compressed_folder_is_refused(without_stackcomp, exports):
    assert without_stackcomp["blocked"] and not without_stackcomp["registered"]
    compressed = {name: r for name, r in without_stackcomp["folders"].items() if not name.startswith("dense-")}
    assert len(compressed) == 3 * len(KINDS)
    for name, r in compressed.items():
        assert "raised" in r, f"{name}: plain transformers loaded a compressed folder ({r['layers']})"
        assert GUARD_WEIGHTS in r["message"], f"{name}: raised {r['raised']}: {r['message'][:300]}"


@pytest.mark.parametrize("kind", KINDS)
def test_dense_export_loads_in_plain_transformers(kind, without_stackcomp, with_stackcomp, exports):
    r = without_stackcomp["folders"][f"dense-{kind}"]
    assert "logits" in r, f"dense {kind}: {r.get('raised')}: {r.get('message', '')[:300]}"
    config = json.loads((Path(exports[1][kind]) / "config.json").read_text())
    assert "quantization_config" not in config and "transformers_weights" not in config
    ref = torch.tensor(with_stackcomp[kind]["ref"])
    got = torch.tensor(r["logits"])
    scale = float(ref.abs().max())
    # int8 layers also quantize their activations: the dense model is close, not equal
    tol = 1e-5 if kind in EXACT_DENSE else 0.05
    assert float((got - ref).abs().max()) <= tol * scale, (kind, got, ref)
    assert stackcomp.load(exports[1][kind])  # checksummed and loadable by stackcomp too


def test_dense_export_in_float16(without_stackcomp, with_stackcomp, exports):
    from safetensors import safe_open

    folder = Path(exports[1]["fp16"])
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = f.keys()
        assert {f.get_slice(k).get_dtype() for k in names if "weight" in k} == {"F16"}
    r = without_stackcomp["folders"]["dense-fp16"]
    ref = torch.tensor(with_stackcomp["ds"]["ref"])
    assert float((torch.tensor(r["logits"]) - ref).abs().max()) <= 0.02 * float(ref.abs().max())


def test_export_refuses_dtype_without_dense():
    with pytest.raises(ValueError, match="dense: true"):
        ExportPass({"path": "x", "dtype": "float16"})


def test_a_missing_compressed_tensor_is_refused_not_initialised(exports, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification

    from stackcomp.errors import ArtifactError

    broken = tmp_path / "broken"
    shutil.copytree(exports[0]["lowrank"], broken)
    tensors = load_file(str(broken / "model.safetensors"))
    dropped = next(k for k in tensors if k.endswith(".U"))
    del tensors[dropped]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match=f"lacks {dropped}"):
        AutoModelForSequenceClassification.from_pretrained(broken)
    tensors = load_file(str(exports[0]["int8"]) + "/model.safetensors")
    scale = next(k for k in tensors if k.endswith(".weight_scale"))
    tensors[scale] = tensors[scale].half()  # a scale stored at another width is not cast on load
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(Path(exports[0]["int8"]) / "config.json", broken / "config.json")
    with pytest.raises(ArtifactError, match=f"holds {scale} as F16"):
        AutoModelForSequenceClassification.from_pretrained(broken)


def test_a_pruned_and_compressed_model_loads_with_its_pruned_shapes(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from stackcomp.nn.pruning import remove_units

    model = remove_units(make_tiny_model("bert"), [[0], [1]], [list(range(0, 64, 2)), list(range(10, 40))])
    for name, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear) and ".encoder." in f".{name}":
            set_module(model, name, Int8Linear.from_linear(m))
    out = stackcomp.save(model, tmp_path / "pruned")
    ids = torch.tensor(IDS)
    with torch.no_grad():
        ref = stackcomp.load(out)(input_ids=ids).logits
        got = AutoModelForSequenceClassification.from_pretrained(out)(input_ids=ids).logits
    assert torch.equal(got, ref)


def test_config_names_the_head_class_and_the_quantization_config(tmp_path):
    model = compressed_model("int8")
    model.config.architectures = ["BertModel"]  # what a base checkpoint's config says
    out = stackcomp.save(model, tmp_path / "e")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    qc = config["quantization_config"]
    assert qc["quant_method"] == "stackcomp" and qc["format_version"] == 1
    assert qc["layers"] == json.loads((out / "stackcomp_manifest.json").read_text())["layers"]
    assert config["transformers_weights"] == GUARD_WEIGHTS
    assert model.config.architectures == ["BertModel"]  # saving does not change the model's own config


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_export_permissions_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        out = stackcomp.save(make_tiny_model("bert"), tmp_path / "e")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o666 & ~umask}


def test_export_pass_writes_a_model_card(tmp_path, tiny_model_dirs, data_env):
    export_dir = tmp_path / "exported"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: tiny-card
        model: {tiny_model_dirs['bert']}
        task: glue/sst2
        data: {{max_length: 32}}
        stages:
          q: {{pass: int8}}
          out: {{pass: export, after: q, params: {{path: {export_dir}}}}}
    """))
    result = stackcomp.run(recipe, out=tmp_path / "run")
    assert [s.status for s in result.stages if s.status in ("failed", "skipped")] == []
    card = (export_dir / "README.md").read_text()
    for expected in ("glue/sst2", "accuracy", "ms per batch", "bytes (as stored)", "`q`",
                     "import stackcomp", "BertForSequenceClassification.from_pretrained", "stackcomp.load",
                     "Int8Linear"):
        assert expected in card, expected
    # how to make it again: the recipe as it ran and the run's lock, with this stage's key
    assert "## Recipe" in card and "name: tiny-card" in card
    lock = json.loads(card.split("## Lock", 1)[1].split("```json", 1)[1].split("```", 1)[0])
    assert lock["stage_keys"]["out"] == result.stage("out").key and lock["data"]["task"] == "glue/sst2"
    sums = json.loads((export_dir / "CHECKSUMS.json").read_text())
    assert "README.md" in sums
    assert stackcomp.load(export_dir)
