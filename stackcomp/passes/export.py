"""``export``: write the model to a plain folder that ``stackcomp.load(path)`` reloads."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from torch import nn

from stackcomp.artifacts import export_model
from stackcomp.errors import ArtifactError
from stackcomp.passes.base import Pass, PassContext, PassParams


class ExportParams(PassParams):
    path: str = Field(description="destination folder; replaced atomically if it exists")


class ExportPass(Pass):
    """Save the model as safetensors + config + layer manifest + tokenizer, Hugging Face style,
    with a CHECKSUMS.json that ``stackcomp.load`` verifies before loading."""

    name = "export"
    version = "2"  # 2: the folder holds CHECKSUMS.json (folders of version 1 are re-exported)
    Params = ExportParams
    changes_model = False
    reads_data = False  # writes files only: changed data never re-exports

    def transform(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        dest = Path(self.params.path).expanduser()
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ArtifactError(f"export: cannot write to {dest.parent}: {e.strerror}") from None
        export_model(model, dest, tokenizer=ctx.tokenizer)
        ctx.report["exported_to"] = str(dest.resolve())
        ctx.log.info("exported to %s", dest)
        return model
