"""Python packages the optional sections need, installed into Slicer's Python on first use, after asking."""

import importlib.util

import slicer
from slicer.i18n import tr as _

CLOUD = {"runpod": "runpod>=1.7,<2", "httpx": "httpx>=0.25"}
AI = {"nnInteractive": "nninteractive-client==2.6.*", "httpx": "httpx>=0.25"}


def ensure(modules: dict, purpose: str) -> bool:
    """modules: import name → pip requirement. True once all import (installed now if the user agrees)."""
    missing = [requirement for name, requirement in modules.items() if importlib.util.find_spec(name) is None]
    if not missing:
        return True
    if not slicer.util.confirmOkCancelDisplay(
            _("{purpose} needs these Python packages: {packages}. Install them into Slicer now "
              "(about a minute, needs the internet)?").format(purpose=purpose, packages=", ".join(missing))):
        return False
    with slicer.util.tryWithErrorDisplay(_("Installing the packages failed."), waitCursor=True):
        slicer.util.pip_install(" ".join(missing))
    importlib.invalidate_caches()
    return all(importlib.util.find_spec(name) is not None for name in modules)
