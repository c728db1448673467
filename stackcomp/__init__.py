"""stackcomp: stack transformer compression techniques and compare the stacks."""

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a model saved by stackcomp (any stage artifact or an ``export`` folder)."""
    from stackcomp.artifacts import load_model

    return load_model(path, **kwargs)
