"""``stackcomp new-pass NAME``: write an installable plugin package for a new pass."""

from __future__ import annotations

import re
from pathlib import Path

from stackcomp.errors import StackcompError

TEMPLATES = Path(__file__).parent / "templates" / "plugin"


def write_plugin(name: str, output: Path) -> Path:
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", name):
        raise StackcompError(f"pass name {name!r}: use lower-case letters, digits and _ (start with a letter)")
    package = f"stackcomp_{name}"
    folder = Path(output) / f"stackcomp-{name.replace('_', '-')}"
    if folder.exists():
        raise StackcompError(f"{folder} already exists; choose another name or --output folder")
    class_name = "".join(p.capitalize() for p in name.split("_")) + "Pass"
    values = {"{{name}}": name, "{{package}}": package, "{{class_name}}": class_name,
              "{{dist}}": f"stackcomp-{name.replace('_', '-')}"}
    files = {
        "pyproject.toml": "pyproject.toml.tmpl",
        f"{package}/__init__.py": "package_init.py.tmpl",
        f"tests/test_{name}.py": "test_pass.py.tmpl",
        "README.md": "README.md.tmpl",
    }
    for rel, tmpl in files.items():
        text = (TEMPLATES / tmpl).read_text()
        for k, v in values.items():
            text = text.replace(k, v)
        dest = folder / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
    return folder
