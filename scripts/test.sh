#!/usr/bin/env bash
# Sets up the test environments (first run only) and runs the whole test suite. CI calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
pip_flags=(--quiet --disable-pip-version-check)

# 0. The Khronos glTF-Validator (npm) that the glTF tests run on every .glb written (skipped without Node.js).
if command -v npm >/dev/null && [ ! -d build/tools/node_modules/gltf-validator ]; then
    npm install --silent --no-audit --no-fund --prefix build/tools gltf-validator@2.0.0-dev.3.10
fi

# 1. The library tests on the packages 3D Slicer 5.10 bundles (numpy 2.0.2, scipy 1.13.1, pydicom 2.4.4,
#    requests 2.32.3, ...: scripts/slicer-5.10-constraints.txt), as the module runs them inside Slicer.
#    The AI prompt tests need the torch-based server and the image tests its linters: they run in 2.
python3 -m venv .venv-slicer510
.venv-slicer510/bin/python -m pip install "${pip_flags[@]}" -c scripts/slicer-5.10-constraints.txt -e ".[test-core]"
.venv-slicer510/bin/python -m pytest -q -p no:cacheprovider \
    --ignore=Testing/test_interactive.py --ignore=Testing/test_image.py "$@" || [ $? -eq 5 ]  # 5: none selected

# 2. Everything, on current packages. The tests run the real nnInteractive server on CPU: torch's CPU build
#    first, then everything pinned to it.
python3 -m venv .venv
pip=(.venv/bin/python -m pip install "${pip_flags[@]}")
"${pip[@]}" torch==2.13.0
"${pip[@]}" -c scripts/constraints.txt -e ".[test]"
exec .venv/bin/python -m pytest "$@"
