"""stackcomp: stack transformer compression techniques and compare the stacks."""

from stackcomp.hf_register import install as _install_hf_quantizer
from stackcomp.version import __version__

_install_hf_quantizer()  # AutoModelFor*.from_pretrained loads stackcomp exports (on transformers' import)

__all__ = ["__version__", "compare", "load", "run", "save"]


def load(path, device="cpu", *, verify=True):
    """Load a model saved by stackcomp (any stage artifact, its ``model/``, or an ``export`` folder).

    The folder is checked against its ``CHECKSUMS.json`` first (every file its kind requires, no
    file unlisted, no symbolic link) and ``ArtifactError`` says what failed; nothing is loaded from
    a folder that fails. ``verify=False`` is the explicit opt-out.
    """
    from stackcomp.artifacts import load_model

    return load_model(path, device=device, verify=verify)


def save(model, path, tokenizer=None):
    """Write ``model`` (and ``tokenizer``) to an export folder that :func:`load` verifies and reloads."""
    from stackcomp.artifacts import export_model

    return export_model(model, path, tokenizer=tokenizer)


def run(recipe, overrides=(), out=None, **kwargs):
    """Run (or resume) a recipe and return its summary as a :class:`stackcomp.api.RunResult`."""
    from stackcomp.api import run as _run

    return _run(recipe, overrides, out, **kwargs)


def compare(*targets, **kwargs):
    """The leaderboard of the given runs (:func:`stackcomp.api.compare`)."""
    from stackcomp.api import compare as _compare

    return _compare(*targets, **kwargs)
