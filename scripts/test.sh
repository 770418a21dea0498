#!/usr/bin/env bash
# Sets up the test environments (first run only) and runs the whole test suite. CI calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
pip_flags=(--quiet --disable-pip-version-check)

# 0a. Debian packages that tests run as real components, installed where apt-get is usable (root, or sudo without a
#     password); elsewhere the tests that need them are skipped. Orthanc with its DICOMweb plugin and DCMTK are real
#     PACS servers and senders (the package starts no service where policy-rc.d forbids it, as in containers: the tests
#     start their own Orthanc on loopback); dicom3tools' dciodvfy checks the SEGs we write against DICOM's rules;
#     PrusaSlicer's CLI reads our 3MF as a real slicer does.
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi; }
install_debian() {  # install_debian "tests skipped without them" PACKAGE...
    local skipped=$1 missing=() package
    shift
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}")
    if command -v apt-get >/dev/null && as_root true 2>/dev/null; then
        as_root "${install[@]}" >/dev/null 2>&1 \
            || { as_root apt-get update -q >/dev/null && as_root "${install[@]}" >/dev/null; } \
            || echo "Could not install ${missing[*]} with apt-get: $skipped will be skipped."
    else
        echo "Not installing ${missing[*]} (needs apt-get as root or sudo without a password): $skipped will be skipped."
    fi
}
install_debian "the Orthanc, DICOM node and SEG validation tests" orthanc orthanc-dicomweb dcmtk dicom3tools
install_debian "the real-slicer 3MF test" prusa-slicer
install_debian "the pod desktop's notice test" xvfb x11-utils
install_debian "the pod agent's desktop session tests (ss)" iproute2

# 0b. The Khronos glTF-Validator (npm) that the glTF tests run on every .glb written (skipped without Node.js).
if command -v npm >/dev/null && [ ! -d build/tools/node_modules/gltf-validator ]; then
    npm install --silent --no-audit --no-fund --prefix build/tools gltf-validator@2.0.0-dev.3.10
fi

# 1. The library tests on the packages 3D Slicer 5.10 bundles (numpy 2.0.2, scipy 1.13.1, pydicom 2.4.4,
#    requests 2.32.3, ...: scripts/slicer-5.10-constraints.txt), as the module runs them inside Slicer.
#    The AI prompt tests need the torch-based server and the image tests its linters: they run in 2.
#    In Python 3.12, as Slicer 5.10, where this machine has it (on PATH, or pyenv's); else python3.
slicer_python=python3
for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
        slicer_python=$candidate
        break
    fi
done
slicer_version=$("$slicer_python" -c 'import platform; print(platform.python_version())')
grep -qs "^version = $slicer_version\$" .venv-slicer510/pyvenv.cfg || rm -rf .venv-slicer510  # made by another Python
"$slicer_python" -m venv .venv-slicer510
.venv-slicer510/bin/python -m pip install "${pip_flags[@]}" -c scripts/slicer-5.10-constraints.txt -e ".[test-core]"
.venv-slicer510/bin/python -m pytest -q -p no:cacheprovider \
    --ignore-glob='Testing/test_interactive*.py' --ignore=Testing/test_image.py "$@" || [ $? -eq 5 ]  # 5: none selected

# 2. Everything, on current packages. The tests run the real nnInteractive server on CPU: torch's CPU build
#    first, then everything pinned to it.
python3 -m venv .venv
pip=(.venv/bin/python -m pip install "${pip_flags[@]}")
"${pip[@]}" torch==2.13.0
"${pip[@]}" -c scripts/constraints.txt -e ".[test]"
exec .venv/bin/python -m pytest "$@"
