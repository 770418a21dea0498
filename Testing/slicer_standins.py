"""What a scripted module meets inside 3D Slicer 5.10, reproduced for tests (Slicer cannot run here).

Every fact below is read from Slicer's source at tag v5.10.0 (../shared/notes/slicer-5.10-runtime.md).
"""

import builtins
import contextlib
import sys
import types

# Top-level import names of the Python packages Slicer 5.10 bundles: SuperBuild/External_python-*.cmake
# (numpy, scipy, the dicom, requests, pythonqt and extension-manager requirements, pip, setuptools, wheel;
# versions in scripts/slicer-5.10-constraints.txt) and what Slicer's own build puts on sys.path
# (CMake/SlicerBlockInstallExternalPythonModules.cmake: VTK, CTK and PythonQt modules; SimpleITK; Slicer's
# scripted packages).
SLICER_5_10_BUNDLED = frozenset({
    "numpy", "scipy", "pydicom", "PIL", "dicomweb_client", "retrying", "chardet", "couchdb", "git", "gitdb",
    "smmap", "cryptography", "jwt", "wrapt", "deprecated", "pycparser", "cffi", "nacl", "dateutil", "six",
    "typing_extensions", "github", "pip", "packaging", "pyparsing", "certifi", "idna", "charset_normalizer",
    "urllib3", "requests", "setuptools", "pkg_resources", "wheel",
    "vtk", "vtkmodules", "slicer", "qt", "ctk", "mrml", "vtkAddon", "vtkITK", "vtkSegmentationCore",
    "vtkTeem", "SimpleITK", "sitkUtils", "DICOMLib", "PythonQt",
})
OURS = ("SegmentationMachine",)  # the module, its widget package and SegmentationMachineLib


def _placeholder_module(name: str) -> types.ModuleType:
    """A module whose every attribute is an empty class: enough to import code, nothing to run it."""
    module = types.ModuleType(name)
    module.__getattr__ = lambda attribute: type(attribute, (), {})
    return module


def install_import_only_slicer():
    """qt, ctk and the slicer submodules that only exist inside Slicer, as import-only stand-ins.

    slicer-core's `slicer` package (real MRML classes, slicer.util) stays; what it lacks is added."""
    import slicer  # slicer-core

    modules = {"qt": _placeholder_module("qt"), "ctk": _placeholder_module("ctk"),
               "slicer.ScriptedLoadableModule": _placeholder_module("slicer.ScriptedLoadableModule")}
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = wrapper.WithinRange = lambda *args, **kwargs: None
    modules.update({"slicer.i18n": i18n, "slicer.parameterNodeWrapper": wrapper})
    for name, module in modules.items():
        sys.modules[name] = module
        if name.startswith("slicer."):
            setattr(slicer, name.split(".", 1)[1], module)


@contextlib.contextmanager
def only_slicer_packages():
    """Our code may import the standard library, what Slicer 5.10 bundles and itself; nothing else.

    Imports made by other packages (numpy importing its own dependencies) are Slicer's business."""
    allowed = SLICER_5_10_BUNDLED | set(sys.stdlib_module_names)
    original = builtins.__import__

    def guarded(name, globals=None, locals=None, fromlist=(), level=0):
        importer = (globals or {}).get("__name__", "")
        top = name.split(".")[0]
        if level == 0 and importer.startswith(OURS) and top not in allowed and not top.startswith(OURS):
            raise ImportError(f"{importer} imports {top}, which Slicer 5.10 does not bundle")
        return original(name, globals, locals, fromlist, level)

    builtins.__import__ = guarded
    try:
        yield
    finally:
        builtins.__import__ = original
