"""``export``: write the model to a plain folder that ``stackcomp.load(path)`` reloads."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pydantic import Field
from torch import nn

from stackcomp.artifacts import save_model
from stackcomp.errors import ArtifactError
from stackcomp.passes.base import Pass, PassContext, PassParams


class ExportParams(PassParams):
    path: str = Field(description="destination folder; replaced atomically if it exists")


class ExportPass(Pass):
    """Save the model as safetensors + config + layer manifest + tokenizer, Hugging Face style."""

    name = "export"
    version = "1"
    Params = ExportParams
    changes_model = False

    def transform(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        dest = Path(self.params.path).expanduser()
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        except OSError as e:
            raise ArtifactError(f"export: cannot write to {dest.parent}: {e.strerror}") from None
        try:
            save_model(model, tmp, tokenizer=ctx.tokenizer)
            if dest.exists():
                old = dest.with_name(f".{dest.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                dest.rename(old)
                tmp.rename(dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        ctx.report["exported_to"] = str(dest.resolve())
        ctx.log.info("exported to %s", dest)
        return model
