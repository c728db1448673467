"""Embedding tables pruned to a kept vocabulary, looked up with the ORIGINAL token ids.

``vocab_prune`` keeps only the rows of the word table that a task's data uses. So that the
tokenizer (and every caller of ``model(input_ids=...)``) stays as it was, the layer holds a
``remap`` buffer of one row index per vocabulary id: kept ids point at their row, every other
id at the row chosen for unseen tokens (the unk token's, or an added mean row). The remap is
stored at the narrowest integer type that indexes the kept rows (:func:`index_dtype`: int16
for up to 32,768 rows) and counted in the layer's bytes.

Layers (registered for the artifact manifest, exact :meth:`storage` from their state dicts):

* :class:`RemappedEmbedding` -- fp32 kept rows. It *is* an ``nn.Embedding`` (of the kept rows)
  as well as a compressed layer, so the ``int8`` pass's ``embeddings: int8|int4`` finds it like
  any table and converts it through this module's ``"int8"`` conversion;
* :class:`RemappedInt8Embedding`, :class:`RemappedInt4Embedding` -- the same remap over an
  ``Int8Embedding`` / ``Int4Embedding`` table.

``to_dense()`` is the stored (kept-row) table, as for the other tables; ``dense_module()`` is the
full-vocabulary ``nn.Embedding`` that computes the same lookups (for plain-transformers export).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from stackcomp.errors import StackcompError
from stackcomp.factorize.budget import index_dtype
from stackcomp.nn.base import LayerStorage, register_layer
from stackcomp.nn.conversions import Int8Config, register_conversion
from stackcomp.nn.manifest import DeclaredLayer, Field, count
from stackcomp.nn.quantized import Int4Embedding, Int8Embedding

__all__ = ["RemappedEmbedding", "RemappedInt4Embedding", "RemappedInt8Embedding", "VocabRemapError"]


class VocabRemapError(StackcompError):
    """A remap that does not fit its table (ids pointing past the kept rows, wrong length)."""


_VOCAB = count("vocab_size")
_PADDING = Field("padding_idx", lambda v: v is None or (type(v) is int and v >= 0), "null or an integer >= 0",
                 default=None)


class _Remap:
    """The remap buffer and lookup shared by the three tables (a mixin ahead of the table class)."""

    vocab_size: int
    num_embeddings: int
    remap: torch.Tensor

    def _init_remap(self, vocab_size: int) -> None:
        if type(vocab_size) is not int or vocab_size < 1:
            raise VocabRemapError(f"{type(self).__name__}: vocab_size must be an integer >= 1, got {vocab_size!r}")
        self.vocab_size = vocab_size
        self.register_buffer("remap", torch.zeros(vocab_size, dtype=index_dtype(self.num_embeddings)))

    def set_remap(self, remap: torch.Tensor) -> None:
        """Store ``remap`` (one kept-row index per vocabulary id), checked against the table."""
        remap = torch.as_tensor(remap)
        if remap.shape != (self.vocab_size,):
            raise VocabRemapError(f"{type(self).__name__}: remap has shape {tuple(remap.shape)}, expected "
                                  f"({self.vocab_size},)")
        if remap.numel() and (int(remap.min()) < 0 or int(remap.max()) >= self.num_embeddings):
            raise VocabRemapError(f"{type(self).__name__}: remap points outside the {self.num_embeddings} kept rows")
        with torch.no_grad():
            self.remap.copy_(remap.to(self.remap.dtype))

    def rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Kept-row indices (int64) of original token ids."""
        return self.remap[ids].long()

    def dense_params(self) -> int:
        """The full-vocabulary fp32 table this one replaces."""
        return self.vocab_size * self.embedding_dim

    def dense_module(self) -> nn.Embedding:
        """The full-vocabulary ``nn.Embedding`` giving the same rows for every id (fp32)."""
        table = self.to_dense().detach().float()[self.remap.long()]
        dense = nn.Embedding(self.vocab_size, self.embedding_dim)
        with torch.no_grad():
            dense.weight.copy_(table)
        return dense.to(table.device)


@register_layer
class RemappedEmbedding(_Remap, DeclaredLayer, nn.Embedding):
    """An ``nn.Embedding`` of the kept rows behind an id remap: ``forward(ids) = weight[remap[ids]]``.

    ``padding_idx`` is the padding token's kept row (None if the model has none).
    """

    layout_version: ClassVar[int] = 1
    replaces: ClassVar[str] = "embedding"
    manifest_fields = (_VOCAB, count("num_embeddings"), count("embedding_dim"), _PADDING)
    param_tensors = ("weight",)

    def __init__(self, vocab_size: int, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        if padding_idx is not None and not 0 <= padding_idx < num_embeddings:
            raise VocabRemapError(f"RemappedEmbedding: padding_idx {padding_idx} is outside [0, {num_embeddings})")
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, padding_idx=padding_idx)
        self._init_remap(vocab_size)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, kept: torch.Tensor, unseen: str = "unk",
                       unk_id: int | None = None) -> RemappedEmbedding:
        """Keep rows ``kept`` (sorted original ids) of ``emb``; every other id maps to ``unk_id``'s row
        (``unseen="unk"``, which must be kept) or to one added row, the mean of the dropped rows
        (``unseen="mean"``)."""
        if emb.max_norm is not None:
            raise VocabRemapError(f"RemappedEmbedding: embeddings with max_norm={emb.max_norm} rewrite their rows "
                                  "on lookup; they cannot be pruned")
        vocab = emb.num_embeddings
        kept = torch.as_tensor(kept, dtype=torch.long).unique()  # sorted, once each
        if kept.numel() == 0 or int(kept[0]) < 0 or int(kept[-1]) >= vocab:
            raise VocabRemapError(f"RemappedEmbedding: kept ids must be a non-empty subset of [0, {vocab})")
        w = emb.weight.detach()
        dropped = torch.ones(vocab, dtype=torch.bool, device=w.device)
        dropped[kept.to(w.device)] = False
        rows = w[kept.to(w.device)]
        remap = torch.full((vocab,), -1, dtype=torch.long)
        remap[kept] = torch.arange(kept.numel())
        if unseen == "unk":
            if unk_id is None or not 0 <= unk_id < vocab or remap[unk_id] < 0:
                raise VocabRemapError(f"RemappedEmbedding: unseen='unk' needs the unk id among the kept ids, "
                                      f"got {unk_id!r}")
            remap[remap < 0] = remap[unk_id]
        elif unseen == "mean":
            if dropped.any():
                rows = torch.cat([rows, w[dropped].mean(0, keepdim=True)])
                remap[remap < 0] = kept.numel()
        else:
            raise VocabRemapError(f"RemappedEmbedding: unseen must be 'unk' or 'mean', got {unseen!r}")
        pad = None if emb.padding_idx is None else int(remap[emb.padding_idx])
        layer = cls(vocab, rows.shape[0], emb.embedding_dim, pad)
        with torch.no_grad():
            layer.weight.copy_(rows)
        layer.set_remap(remap)
        return layer.to(device=w.device, dtype=w.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.rows_of(ids), self.weight, self.padding_idx)

    def to_dense(self) -> torch.Tensor:
        """The kept rows (num_embeddings, embedding_dim)."""
        return self.weight

    def manifest(self) -> dict[str, Any]:  # DeclaredLayer's, not nn.Embedding's attributes
        return DeclaredLayer.manifest(self)

    def extra_repr(self) -> str:
        return DeclaredLayer.extra_repr(self)


@register_layer
class RemappedInt8Embedding(_Remap, Int8Embedding):
    """An ``Int8Embedding`` of the kept rows behind the id remap."""

    manifest_fields = (_VOCAB, *Int8Embedding.manifest_fields)

    def __init__(self, vocab_size: int, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self._init_remap(vocab_size)

    @classmethod
    def from_remapped(cls, layer: RemappedEmbedding) -> RemappedInt8Embedding:
        q = Int8Embedding.from_embedding(layer)
        out = cls(layer.vocab_size, layer.num_embeddings, layer.embedding_dim, layer.padding_idx)
        out.load_state_dict({**q.state_dict(), "remap": layer.remap})
        return out.to(layer.weight.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(self.rows_of(ids))


@register_layer
class RemappedInt4Embedding(_Remap, Int4Embedding):
    """An ``Int4Embedding`` of the kept rows behind the id remap."""

    manifest_fields = (_VOCAB, *Int4Embedding.manifest_fields)

    def __init__(self, vocab_size: int, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 group_size: int = 64):
        super().__init__(num_embeddings, embedding_dim, padding_idx, group_size)
        self._init_remap(vocab_size)

    @classmethod
    def from_remapped(cls, layer: RemappedEmbedding, group_size: int = 64,
                      fit: str = "minmax") -> RemappedInt4Embedding:
        q = Int4Embedding.from_embedding(layer, group_size, fit)
        out = cls(layer.vocab_size, layer.num_embeddings, layer.embedding_dim, layer.padding_idx, q.group_size)
        out.load_state_dict({**q.state_dict(), "remap": layer.remap})
        return out.to(layer.weight.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(self.rows_of(ids))

    def storage(self) -> LayerStorage:
        """Exact bytes (codes, scales, offsets, remap); params count the kept table's entries."""
        st = DeclaredLayer.storage(self)
        return LayerStorage(params=self.num_embeddings * self.embedding_dim, bytes=st.bytes,
                            dense_params=st.dense_params, dense_bytes=st.dense_bytes)


@register_conversion("int8", RemappedEmbedding)
def _remapped_to_int8(layer: RemappedEmbedding, config: Int8Config) -> RemappedInt8Embedding | RemappedInt4Embedding:
    """``int8``'s ``embeddings: int8|int4`` on a pruned table: the same remap over the quantized kept rows."""
    if config.embedding_format == "int8":
        return RemappedInt8Embedding.from_remapped(layer)
    return RemappedInt4Embedding.from_remapped(layer, config.embedding_group_size, config.embedding_fit)
