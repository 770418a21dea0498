"""The Slicer extension's files, checked as files (Slicer itself runs the module's self-test)."""

import ast
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "SegmentationMachine" / "SegmentationMachine.py"
PROMPT_TOOLS = REPO / "SegmentationMachine" / "SegmentationMachinePromptTools.py"
UI = REPO / "SegmentationMachine" / "Resources" / "UI" / "SegmentationMachine.ui"


def test_library_cmake_packages_every_library_file():
    text = (REPO / "SegmentationMachineLib" / "CMakeLists.txt").read_text()
    assert "file(GLOB MODULE_PYTHON_SCRIPTS RELATIVE ${CMAKE_CURRENT_SOURCE_DIR} CONFIGURE_DEPENDS *.py)" in text
    assert "SCRIPTS ${MODULE_PYTHON_SCRIPTS}" in text and "WITH_SUBDIR" in text
    assert not list((REPO / "SegmentationMachineLib").glob("*/*.py")), "a subpackage would need its own glob"


def test_extension_metadata():
    top = (REPO / "CMakeLists.txt").read_text()
    assert "project(SegmentationMachine)" in top
    for variable in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "DEPENDS"):
        assert f"set(EXTENSION_{variable} " in top
    assert "add_subdirectory(SegmentationMachine)" in top and "add_subdirectory(SegmentationMachineLib)" in top
    assert json.loads((REPO / "SegmentationMachine.json").read_text())["category"] == "Segmentation"
    assert (REPO / "SegmentationMachine" / "Resources" / "Icons" / "SegmentationMachine.png").read_bytes()[:4] == b"\x89PNG"


def test_ui_binds_every_widget_the_module_uses_and_every_parameter():
    root = ET.parse(UI).getroot()
    names = {w.get("name") for w in root.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)|\bui\.(\w+)", MODULE.read_text() + PROMPT_TOOLS.read_text()))
    used = {a or b for a, b in used}
    assert used <= names, f"the module uses widgets the .ui lacks: {used - names}"
    bound = {w.find("string").text for w in root.iter("property") if w.get("name") == "SlicerParameterName"}
    tree = ast.parse(MODULE.read_text())
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SegmentationMachineParameterNode")
    fields = {n.target.id for n in wrapper.body if isinstance(n, ast.AnnAssign)}
    assert bound == fields


def test_module_files_are_listed_for_the_build():
    scripts = (REPO / "SegmentationMachine" / "CMakeLists.txt").read_text()
    for path in (REPO / "SegmentationMachine").glob("*.py"):
        assert path.name.replace("SegmentationMachine", "${MODULE_NAME}", 1) in scripts
        compile(path.read_text(), str(path), "exec")


def test_the_cloud_binding_uses_only_what_the_cloud_panel_has():
    """Slicer is not here to run the binding: at least every panel attribute it touches must exist."""
    from SegmentationMachineLib.cloudpanel import CloudPanel
    from SegmentationMachineLib.credentials import SecretStore

    binding = (REPO / "SegmentationMachine" / "SegmentationMachineCloud.py").read_text()
    used = set(re.findall(r"panel\.(\w+)", binding))
    panel = CloudPanel(SecretStore(REPO / "unused", use_keychain=False))
    assert used and not [name for name in used if not hasattr(panel, name)]


def test_module_is_thin_and_the_library_has_no_slicer_globals():
    module_lines = len(MODULE.read_text().splitlines())
    assert module_lines < 400  # binding only: widgets, timers, settings
    for path in (REPO / "SegmentationMachineLib").glob("*.py"):
        text = path.read_text()
        for forbidden in ("slicer.mrmlScene", "slicer.app", "slicer.modules", "import qt", "slicer.util"):
            assert forbidden not in text, f"{path.name} uses {forbidden}"
