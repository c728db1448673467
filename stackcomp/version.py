"""The package version, in a module of its own: modules that record it (stage.json, summary.json)
import it without importing the package front (``stackcomp/__init__.py``)."""

__version__ = "0.1.0"
