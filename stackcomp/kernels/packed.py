"""PackedDS: a DS layer re-laid-out for a kernel, and how to make one (``pack_ds``).

A packed layer is a dict of plain tensors plus a JSON-able ``meta`` dict, so it saves with
safetensors and loads back without pickle (:meth:`PackedDS.state_dict` /
:meth:`PackedDS.from_state_dict`).

Layout: output rows are cut into groups of ``group`` rows and each block's ELL tile is stored
``(nb, out_pad / group, s, group)``. The CPU kernel wants ``group = 8`` (one o-group of one block
is a small contiguous tile that serves both its loop orders); the GPU kernel wants
``group = out_pad`` (that is ``(nb, s, out)``: neighbouring programs read neighbouring rows).
Padded rows carry value 0 and index 0.

Tensors (``dtype="fp32"``): ``dictionary`` (nb, K, B) float32, ``values`` float32, ``indices``
uint8 (K <= 256) or int16, ``bias`` (out,) float32 if present. ``dtype="int8"`` adds
``dictionary_scale`` (nb, K) (symmetric, per atom) and ``values_scale`` (out_pad,) (symmetric,
per output row), with ``dictionary`` and ``values`` in int8.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from stackcomp.factorize.budget import tensor_bytes
from stackcomp.kernels.reference import KernelError, check_ds

FORMAT = "stackcomp.packed_ds"
VERSION = 1
TARGETS = ("cpu", "cuda")
DTYPES = ("fp32", "int8")
CPU_GROUP = 8
MAX_ATOMS = 32767  # int16 indices


@dataclass
class PackedDS:
    """Kernel-ready tensors of one DS layer, plus the meta that says how they are laid out."""

    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    #: derived tensors (e.g. the torch fallback's flat indices); never saved
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # -- shape facts ---------------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return int(self.meta["in_features"])

    @property
    def out_features(self) -> int:
        return int(self.meta["out_features"])

    @property
    def target(self) -> str:
        return str(self.meta["target"])

    @property
    def dtype(self) -> str:
        return str(self.meta["dtype"])

    @property
    def group(self) -> int:
        return int(self.meta["group"])

    @property
    def bias(self) -> torch.Tensor | None:
        return self.tensors.get("bias")

    @property
    def device(self) -> torch.device:
        return self.tensors["dictionary"].device

    def nbytes(self) -> int:
        """Bytes of the saved tensors (what the packed layer costs in memory and on disk)."""
        return int(tensor_bytes(*self.tensors.values()))

    # -- save / load ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors for safetensors; the layout lives in :attr:`meta` (JSON-able)."""
        return dict(self.tensors)

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | str) -> PackedDS:
        """Rebuild from :meth:`state_dict` and :attr:`meta` (a dict or its JSON string); checks both."""
        if isinstance(meta, str):
            meta = json.loads(meta)
        meta = dict(meta)
        if meta.get("format") != FORMAT:
            raise KernelError(f"packed DS meta: format must be {FORMAT!r}, got {meta.get('format')!r}")
        if int(meta.get("version", -1)) != VERSION:
            raise KernelError(f"packed DS meta: version {meta.get('version')} is not supported (expected {VERSION});"
                              " re-run the pack stage")
        p = cls(meta=meta, tensors=dict(tensors))
        p.validate()
        return p

    def to(self, device: torch.device | str) -> PackedDS:
        return PackedDS(meta=dict(self.meta), tensors={k: v.to(device) for k, v in self.tensors.items()})

    def validate(self) -> None:
        """Raise KernelError naming the field that does not fit the meta."""
        m, t = self.meta, self.tensors
        for key in ("target", "dtype", "in_features", "out_features", "n_blocks", "atoms", "block", "nnz", "group",
                    "out_pad"):
            if key not in m:
                raise KernelError(f"packed DS meta: missing field {key!r}")
        nb, K, B, s, G, out_pad = (int(m[k]) for k in ("n_blocks", "atoms", "block", "nnz", "group", "out_pad"))
        q = m["dtype"] == "int8"
        need = {"dictionary": ((nb, K, B), torch.int8 if q else torch.float32),
                "values": ((nb, out_pad // G, s, G), torch.int8 if q else torch.float32),
                "indices": ((nb, out_pad // G, s, G), torch.uint8 if K <= 256 else torch.int16)}
        if q:
            need["dictionary_scale"] = ((nb, K), torch.float32)
            need["values_scale"] = ((out_pad,), torch.float32)
        for name, (shape, dt) in need.items():
            if name not in t:
                raise KernelError(f"packed DS: tensor {name!r} is missing")
            if tuple(t[name].shape) != shape or t[name].dtype != dt:
                raise KernelError(f"packed DS: tensor {name!r} must be {dt} {shape}, got {t[name].dtype} "
                                  f"{tuple(t[name].shape)}")
        if "bias" in t and tuple(t["bias"].shape) != (int(m["out_features"]),):
            raise KernelError(f"packed DS: bias must be ({m['out_features']},), got {tuple(t['bias'].shape)}")

    # -- back to canonical ---------------------------------------------------------------------
    def _rows(self, name: str) -> torch.Tensor:
        """``values`` or ``indices`` from the ELL tile layout (nb, OG, s, G) to canonical (nb, out, s)."""
        m = self.meta
        nb, out, s = int(m["n_blocks"]), int(m["out_features"]), int(m["nnz"])
        return self.tensors[name].permute(0, 1, 3, 2).reshape(nb, -1, s)[:, :out].contiguous()

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Canonical float32 (dictionary, values, indices int64, bias); int8 tensors come dequantized.

        The int8 kernels are tested against the exact reference run on these tensors.
        """
        t = self.tensors
        d = t["dictionary"].float()
        v = self._rows("values").float()
        if self.dtype == "int8":
            d = d * t["dictionary_scale"].unsqueeze(-1)
            v = v * t["values_scale"][: self.out_features].view(1, -1, 1)
        return d.contiguous(), v, self._rows("indices").long(), t.get("bias")

    def unpack_int8(self) -> tuple[torch.Tensor, ...]:
        """Canonical int8 tensors and their scales, for ``ds_forward_act8_reference``: (dictionary
        (nb, K, B) int8, dictionary_scale (nb, K), values (nb, out, s) int8, values_scale (out,),
        indices int64, bias)."""
        if self.dtype != "int8":
            raise KernelError(f"unpack_int8 needs an int8 packed layer, this one is {self.dtype}")
        t = self.tensors
        return (t["dictionary"], t["dictionary_scale"], self._rows("values"), t["values_scale"][: self.out_features],
                self._rows("indices").long(), t.get("bias"))


def _quantize_symmetric(x: torch.Tensor, dim: int | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 = round(x / scale), scale = max|x| / 127 over ``dim`` (1 where the max is 0)."""
    amax = x.abs().amax(dim=dim, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(x / scale), -127, 127).to(torch.int8)
    return q, scale


def pack_ds(dictionary: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None = None,
            target: str = "cpu", dtype: str = "fp32", name: str = "DS layer") -> PackedDS:
    """Re-lay canonical DS tensors out for a kernel; ``dtype="int8"`` quantizes symmetrically.

    int8: the dictionary per atom (row of D_b), the values per output row (across all blocks, so
    the scale factors out of the whole sum). The result's :meth:`PackedDS.unpack` gives the
    dequantized tensors the kernels are exact against.
    """
    if target not in TARGETS:
        raise KernelError(f"{name}: pack target must be one of {TARGETS}, got {target!r}")
    if dtype not in DTYPES:
        raise KernelError(f"{name}: pack dtype must be one of {DTYPES}, got {dtype!r}")
    nb, K, B, out, s = check_ds(dictionary, values, indices, bias, name)
    if K > MAX_ATOMS:
        raise KernelError(f"{name}: at most {MAX_ATOMS} atoms per block are supported, got {K}")
    if s == 0:
        raise KernelError(f"{name}: nnz (values.shape[2]) must be at least 1")
    with torch.no_grad():
        dev = dictionary.device
        G = CPU_GROUP if target == "cpu" else out
        out_pad = -(-out // G) * G
        d = dictionary.detach().float()
        v = values.detach().float()
        idx = indices.detach().long()
        if out_pad > out:
            v = torch.cat([v, v.new_zeros(nb, out_pad - out, s)], 1)
            idx = torch.cat([idx, idx.new_zeros(nb, out_pad - out, s)], 1)
        tensors: dict[str, torch.Tensor] = {}
        if dtype == "int8":
            dq, dsc = _quantize_symmetric(d, dim=2)
            vq, vsc = _quantize_symmetric(v, dim=(0, 2))          # per output row, all blocks
            tensors["dictionary"] = dq.contiguous()
            tensors["dictionary_scale"] = dsc.reshape(nb, K).contiguous()
            v = vq
            tensors["values_scale"] = vsc.reshape(out_pad).contiguous()
        else:
            tensors["dictionary"] = d.contiguous()
        # (nb, out_pad, s) -> (nb, OG, s, G)
        tensors["values"] = v.reshape(nb, out_pad // G, G, s).permute(0, 1, 3, 2).contiguous()
        idt = torch.uint8 if K <= 256 else torch.int16
        tensors["indices"] = idx.reshape(nb, out_pad // G, G, s).permute(0, 1, 3, 2).to(idt).contiguous()
        if bias is not None:
            tensors["bias"] = bias.detach().float().contiguous().to(dev)
    meta = {"format": FORMAT, "version": VERSION, "target": target, "dtype": dtype, "in_features": nb * B,
            "out_features": out, "n_blocks": nb, "atoms": K, "block": B, "nnz": s, "group": G, "out_pad": out_pad,
            "index_dtype": str(idt).replace("torch.", "")}
    return PackedDS(meta=meta, tensors=tensors)
