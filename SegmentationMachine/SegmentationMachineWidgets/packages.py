"""Python packages the optional sections need, installed into Slicer's Python on first use, after asking."""

import importlib.util
import tempfile
from pathlib import Path

import slicer
from slicer.i18n import tr as _

from SegmentationMachineLib.core.packages import installed_pins
from SegmentationMachineLib.panels.export import ExportPanel

from . import errorsShown

AI = {"nnInteractive": "nninteractive-client==2.6.*", "httpx": "httpx>=0.25"}
SEG = {"highdicom": "highdicom>=0.23"}  # the first on NumPy 2; needs pydicom 3 (ExportPanel.check_seg_possible)


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
    """highdicom for DICOM SEG; where Slicer's pydicom is too old for it, the sentence instead of an install."""
    ExportPanel.check_seg_possible()
    return ensure(SEG, _("DICOM SEG export"))
