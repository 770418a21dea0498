"""Python packages the optional sections need, installed into Slicer's Python on first use, after asking."""

import importlib.util
import tempfile
from pathlib import Path

import slicer
from slicer.i18n import tr as _

from SegmentationMachineLib.core.packages import installed_pins
from SegmentationMachineLib.mesh import dicomseg

from . import errorsShown

AI = {"nnInteractive": "nninteractive-client==2.6.*", "httpx": "httpx>=0.25"}


def missing(modules: dict) -> list:
    """modules: import name → pip requirement. The requirements of those that do not import."""
    return [requirement for name, requirement in modules.items() if importlib.util.find_spec(name) is None]


def ensure(modules: dict, purpose: str) -> bool:
    """True once all import (installed now if the user agrees), never replacing a package Slicer ships."""
    requirements = missing(modules)
    if not requirements:
        return True
    if not slicer.util.confirmOkCancelDisplay(
            _("{purpose} needs these Python packages: {packages}. Install them into Slicer now "
              "(about a minute, needs the internet)?").format(purpose=purpose, packages=", ".join(requirements))):
        return False
    with tempfile.TemporaryDirectory() as folder, errorsShown(_("Installing the packages failed."), waitCursor=True):
        pins = Path(folder) / "slicer-pins.txt"
        pins.write_text(installed_pins())
        slicer.util.pip_install([*requirements, "--constraint", str(pins)])
    importlib.invalidate_caches()
    return not missing(modules)


def ensureSeg() -> bool:
    """DICOM SEG's pydicom 3 and highdicom (after asking), in a folder of their own that only the SEG writer's
    child process puts on its path: Slicer 5.10's pydicom 2.4 is too old for highdicom and must stay."""
    if not dicomseg.seg_packages_missing():
        return True
    if not slicer.util.confirmOkCancelDisplay(
            _("DICOM SEG export needs {packages}. Install them now (about 40 MB, needs the internet) into "
              "{folder}? Slicer's own packages stay as they are.").format(
                packages=", ".join(dicomseg.SEG_PINS), folder=dicomseg.seg_packages_folder())):
        return False
    with errorsShown(_("Installing the packages failed."), waitCursor=True):
        dicomseg.install_seg_packages(slicer.util.pip_install)
    return not dicomseg.seg_packages_missing()
