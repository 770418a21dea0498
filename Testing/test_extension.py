"""The Slicer extension's files, checked as files (Slicer itself runs the module's self-test)."""

import ast
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
MODULE = REPO / "SegmentationMachine" / "SegmentationMachine.py"
PROMPT_TOOLS = REPO / "SegmentationMachine" / "SegmentationMachineWidgets" / "prompttools.py"
PACS = REPO / "SegmentationMachine" / "SegmentationMachineWidgets" / "pacs.py"
UI = REPO / "SegmentationMachine" / "Resources" / "UI" / "SegmentationMachine.ui"


def test_library_cmake_lists_every_library_file():
    import library_cmake

    text = (REPO / "SegmentationMachineLib" / "CMakeLists.txt").read_text()
    assert text == library_cmake.render(), "run scripts/library_cmake.py"
    assert "  prompts/session.py\n" in text and "WITH_SUBDIR" in text


# Each package imports only those of lower layers or its own: module -> panels/CLI -> pipeline -> capabilities -> core.
LAYERS = {"core": 0, "dicom": 1, "mesh": 1, "prompts": 1, "cloud": 1, "segment": 2, "inbox": 2,
          "pipeline": 3, "pacs": 3, "panels": 4, "cli": 4}


def _library_imports():
    """(importing package, imported package) for every import between the library's packages, in each form:
    `from ..x import y`, `from .. import x`, `from SegmentationMachineLib.x import y`, `import SegmentationMachineLib.x`."""
    library = REPO / "SegmentationMachineLib"
    for path in library.rglob("*.py"):
        parts = path.relative_to(library).with_suffix("").parts
        if parts[0] == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name.split(".")[1:] for alias in node.names
                           if alias.name.startswith("SegmentationMachineLib.")]
            elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("SegmentationMachineLib")):
                base = list(parts[:-1])[: len(parts) - node.level] if node.level else []
                module = base + [name for name in (node.module or "").split(".") if name][0 if node.level else 1:]
                # from the library's root: each name imported is a package (or, like __version__, none)
                targets = [module] if module else [[alias.name] for alias in node.names if alias.name in LAYERS]
            else:
                continue
            yield from ((parts[0], target[0]) for target in targets if target)


def test_library_packages_form_layers_without_circles():
    assert set(LAYERS) == {p.name if p.is_dir() else p.stem for p in (REPO / "SegmentationMachineLib").iterdir()
                           if p.name not in ("__init__.py", "CMakeLists.txt", "__pycache__")}
    for source, target in _library_imports():
        assert target in LAYERS, f"{source} imports {target}, which is not a package of the library"
        assert source == target or LAYERS[target] < LAYERS[source], f"{source} must not import {target}"


def test_the_repository_holds_no_links():
    """A worktree's .venv, linked to another checkout's, was committed once (.gitignore's `.venv/` names folders
    only): the next checkout put the link where that venv was, and removed it."""
    import subprocess

    listed = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode:
        pytest.skip("not a git checkout")
    assert [line.split("\t")[1] for line in listed.stdout.splitlines() if line.startswith("120000")] == []


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
    used = set(re.findall(r"self\.ui\.(\w+)|\bui\.(\w+)", MODULE.read_text() + PROMPT_TOOLS.read_text() + PACS.read_text()))
    used = {a or b for a, b in used}
    assert used <= names, f"the module uses widgets the .ui lacks: {used - names}"
    bound = {w.find("string").text for w in root.iter("property") if w.get("name") == "SlicerParameterName"}
    tree = ast.parse(MODULE.read_text())
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SegmentationMachineParameterNode")
    fields = {n.target.id for n in wrapper.body if isinstance(n, ast.AnnAssign)}
    assert bound == fields


def test_no_ui_text_is_taken_for_a_keyboard_mnemonic():
    """Qt reads one '&' in a button's or section's text as a mnemonic: "Export & Print" showed as "Export  Print"
    with an underlined space. Written "and", or "&&" where an ampersand is meant."""
    texts = [w.find("string").text or "" for w in ET.parse(UI).getroot().iter("property") if w.get("name") == "text"]
    assert len(texts) > 20 and "Export and print" in texts
    assert [text for text in texts if "&" in text.replace("&&", "")] == []


def test_the_source_volume_is_a_scan_never_a_labelmap_or_a_vector_volume(ctx):
    """The selector listed labelmaps and vector volumes (scalar volume subclasses), and the module chose a labelmap
    loaded first as the source volume; with nothing chosen it showed an empty box instead of what to do."""
    from SegmentationMachineLib.core.scene import NOT_SOURCE_VOLUMES, first_source_volume

    selector = next(w for w in ET.parse(UI).getroot().iter("widget") if w.get("name") == "sourceVolumeSelector")
    properties = {p.get("name"): p for p in selector.findall("property")}
    assert [s.text for s in properties["hideChildNodeTypes"].iter("string")] == list(NOT_SOURCE_VOLUMES)
    assert properties["noneDisplay"].find("string").text == "Select source volume…"
    assert first_source_volume(ctx.scene) is None
    for kind in NOT_SOURCE_VOLUMES:
        ctx.scene.AddNewNodeByClass(kind, kind)
    ct = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    assert ctx.scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode") is not ct and first_source_volume(ctx.scene) is ct


def test_each_translated_sentence_is_one_string_for_the_translator():
    """Sentences glued from _() pieces ("Last prompt: " + latency, a tooltip + a shared ending) cannot be translated
    in another word order: each is one _() format string with named fields, as Slicer's own modules write them."""

    def translated(node):  # _(...) or _(...).format(...)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
            node = node.func.value
        return isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_"

    files = [MODULE, *(REPO / "SegmentationMachine" / "SegmentationMachineWidgets").glob("*.py")]
    glued = [f"{path.name}:{node.lineno}" for path in files for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add)
             and (translated(node.left) or translated(node.right))]
    assert glued == []
    probe = ast.parse('label = _("Last prompt: ") + latency')  # what the check finds
    assert any(isinstance(n, ast.BinOp) and translated(n.left) for n in ast.walk(probe))


def test_module_files_are_listed_for_the_build():
    scripts = (REPO / "SegmentationMachine" / "CMakeLists.txt").read_text()
    for path in (REPO / "SegmentationMachine").rglob("*.py"):
        name = path.relative_to(REPO / "SegmentationMachine").as_posix()
        assert name.replace("SegmentationMachine", "${MODULE_NAME}", 1) in scripts, name
        compile(path.read_text(), str(path), "exec")


def test_the_section_bindings_use_only_what_their_panels_have():
    """Slicer is not here to run the bindings: at least every panel attribute they touch must exist."""
    from SegmentationMachineLib.core.credentials import SecretStore
    from SegmentationMachineLib.panels.cloud import CloudPanel
    from SegmentationMachineLib.panels.pacs import PacsPanel
    from SegmentationMachineLib.panels.prompts import PromptsPanel

    panels = {"cloud.py": CloudPanel(SecretStore(REPO / "unused", use_keychain=False)), "prompttools.py": PromptsPanel(),
              "pacs.py": PacsPanel(store=SecretStore(REPO / "unused", use_keychain=False))}
    for name, panel in panels.items():
        used = set(re.findall(r"panel\.(\w+)", (REPO / "SegmentationMachine" / "SegmentationMachineWidgets" / name).read_text()))
        assert used and not [attribute for attribute in used if not hasattr(panel, attribute)], name


def test_module_is_thin_and_the_library_has_no_slicer_globals():
    module_lines = len(MODULE.read_text().splitlines())
    assert module_lines < 400  # binding only: widgets, timers, settings
    for path in (REPO / "SegmentationMachineLib").rglob("*.py"):
        text = path.read_text()
        for forbidden in ("slicer.mrmlScene", "slicer.app", "slicer.modules", "import qt", "slicer.util"):
            assert forbidden not in text, f"{path.name} uses {forbidden}"
