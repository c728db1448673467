"""Layer manifests as stackcomp wrote them before manifests were declared per field.

Each entry below is the exact JSON the earlier per-class ``manifest()`` code wrote (recorded from
it); the layers must rebuild from it, write it back byte for byte, hold the same tensors, and count
their bytes as the tensors' widths say.
"""

from __future__ import annotations

import json

import pytest
import torch

from stackcomp.errors import ArtifactError
from stackcomp.nn.base import layer_class

_W = {"float32": 4, "float16": 2, "int32": 4, "int16": 2, "int8": 1, "uint8": 1}

# (manifest JSON, parameters, stored tensors {name: (dtype, shape)})
OLD = [
    ('{"type": "LowRankLinear", "layout_version": 1, "in_features": 12, "out_features": 10, "rank": 4, '
     '"bias": true, "dtype": "float32"}', 98,
     {"U": ("float32", [10, 4]), "V": ("float32", [4, 12]), "bias": ("float32", [10])}),
    ('{"type": "LowRankLinear", "layout_version": 1, "in_features": 12, "out_features": 10, "rank": 3, '
     '"bias": false, "dtype": "float16"}', 66,
     {"U": ("float16", [10, 3]), "V": ("float16", [3, 12])}),
    ('{"type": "BlockLowRankLinear", "layout_version": 1, "in_features": 12, "out_features": 10, "grid": [2, 3], '
     '"rank": 2, "interleave_out": true, "bias": true, "dtype": "float32"}', 118,
     {"U": ("float32", [2, 3, 5, 2]), "V": ("float32", [2, 3, 2, 4]), "bias": ("float32", [10])}),
    ('{"type": "SparseLowRankLinear", "layout_version": 1, "in_features": 12, "out_features": 10, "rank": 2, '
     '"n_rows": 3, "bias": true, "dtype": "float32"}', 90,
     {"U": ("float32", [10, 2]), "V": ("float32", [2, 12]), "sparse": ("float32", [3, 12]),
      "row_index": ("uint8", [3]), "bias": ("float32", [10])}),
    ('{"type": "SparseLowRankLinear", "layout_version": 1, "in_features": 12, "out_features": 10, "rank": 2, '
     '"n_rows": 0, "bias": false, "dtype": "float32"}', 44,
     {"U": ("float32", [10, 2]), "V": ("float32", [2, 12]), "sparse": ("float32", [0, 12]),
      "row_index": ("uint8", [0])}),
    ('{"type": "DoubleSparseLinear", "layout_version": 1, "in_features": 12, "out_features": 10, "inner": 6, '
     '"nnz_p": 30, "nnz_q": 37, "bias": true, "dtype": "float32"}', 77,
     {"p_values": ("float32", [30]), "q_values": ("float32", [37]), "p_crow": ("int32", [11]),
      "p_col": ("uint8", [30]), "q_crow": ("int32", [7]), "q_col": ("uint8", [37]), "bias": ("float32", [10])}),
    ('{"type": "Int8Linear", "layout_version": 1, "in_features": 12, "out_features": 10, "bias": false, '
     '"backend": "bitsandbytes"}', 120,
     {"weight": ("int8", [10, 12]), "weight_scale": ("float32", [10])}),
    ('{"type": "Int8LowRankLinear", "layout_version": 1, "in_features": 12, "out_features": 10, "rank": 4, '
     '"bias": true, "backend": "torch"}', 98,
     {"U": ("int8", [10, 4]), "U_scale": ("float32", [10]), "V": ("int8", [4, 12]), "V_scale": ("float32", [4]),
      "bias": ("float32", [10])}),
    ('{"type": "Int8DSLinear", "layout_version": 1, "in_features": 32, "out_features": 10, "block": 16, '
     '"atoms": 16, "nnz": 4, "bias": true, "backend": "torch", "index_dtype": "uint8"}', 602,
     {"dictionary": ("int8", [2, 16, 16]), "dictionary_scale": ("float32", [2, 16]), "values": ("int8", [2, 10, 4]),
      "values_scale": ("float32", [10]), "indices": ("uint8", [2, 10, 4]), "bias": ("float32", [10])}),
    ('{"type": "Int8DSLinear", "layout_version": 1, "in_features": 32, "out_features": 10, "block": 16, '
     '"atoms": 300, "nnz": 4, "bias": false, "backend": "bitsandbytes", "index_dtype": "int16"}', 9680,
     {"dictionary": ("int8", [2, 300, 16]), "dictionary_scale": ("float32", [2, 300]),
      "values": ("int8", [2, 10, 4]), "values_scale": ("float32", [10]), "indices": ("int16", [2, 10, 4])}),
    ('{"type": "Int8Embedding", "layout_version": 1, "num_embeddings": 20, "embedding_dim": 8, "padding_idx": 3}',
     160, {"weight": ("int8", [20, 8]), "weight_scale": ("float32", [20])}),
]


def _build(text: str):
    entry = json.loads(text)
    return layer_class(entry.pop("type")).from_manifest(entry)


@pytest.mark.parametrize("text,params,tensors", OLD, ids=[json.loads(t)["type"] + str(i) for i, (t, _, _) in
                                                           enumerate(OLD)])
def test_old_manifests_rebuild_and_write_back_byte_identical(text, params, tensors):
    layer = _build(text)
    assert json.dumps({"type": type(layer).__name__, **layer.manifest()}) == text
    held = {n: (str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in layer.state_dict().items()}
    assert held == tensors
    st = layer.storage()
    assert st.params == params
    assert st.bytes == sum(_W[d] * torch.Size(s).numel() for d, s in tensors.values())


def test_fields_older_writers_left_out_take_their_defaults():
    lr = _build('{"type": "LowRankLinear", "in_features": 4, "out_features": 3, "rank": 2, "bias": false}')
    assert lr.manifest() == {"layout_version": 1, "in_features": 4, "out_features": 3, "rank": 2, "bias": False,
                             "dtype": "float32"}
    q = _build('{"type": "Int8DSLinear", "in_features": 32, "out_features": 4, "block": 16, "atoms": 8, "nnz": 2}')
    assert q.manifest()["bias"] is True and q.manifest()["backend"] == "torch"
    assert q.manifest()["index_dtype"] == "uint8"


@pytest.mark.parametrize("text,match", [
    ('{"type": "LowRankLinear", "in_features": 4, "out_features": 3, "rank": 2}', "lacks field 'bias'"),
    ('{"type": "LowRankLinear", "in_features": 4, "out_features": 3, "rank": 2, "bias": 1}', "'bias'.*true/false"),
    ('{"type": "LowRankLinear", "in_features": 4, "out_features": 3, "rank": 2, "bias": true, "dtype": ["x"]}',
     "'dtype'"),
    ('{"type": "Int8Linear", "in_features": 4, "out_features": 3, "backend": ["torch"]}', "'backend'"),
    ('{"type": "BlockLowRankLinear", "in_features": 0, "out_features": 4, "grid": [2, 2], "rank": 1, '
     '"interleave_out": false, "bias": true}', "'in_features'.*>= 1"),
    ('{"type": "BlockLowRankLinear", "in_features": 6, "out_features": 4, "grid": [2, 4], "rank": 1, '
     '"interleave_out": false, "bias": true}', "does not fit"),
    ('{"type": "DoubleSparseLinear", "in_features": 6, "out_features": 4, "inner": 2, "nnz_p": 99, "nnz_q": 1, '
     '"bias": true}', "cannot hold"),
    ('{"type": "Int8DSLinear", "in_features": 32, "out_features": 4, "block": 16, "atoms": 8, "nnz": 2, '
     '"index_dtype": "int16"}', "'index_dtype'.*uint8"),
    ('{"type": "Int8Linear", "layout_version": 2, "in_features": 4, "out_features": 3}', "layout_version 2"),
])
def test_bad_entries_are_artifact_errors_naming_layer_and_field(text, match):
    name = json.loads(text)["type"]
    with pytest.raises(ArtifactError, match=f"{name}.*{match}"):
        _build(text)
