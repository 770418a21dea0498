"""The module as Slicer 5.10 loads it: only bundled packages at load time, helpers outside the module folder."""

import ast
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import vtk
import slicer

from SegmentationMachineLib.panels.promptmarkups import BoxPlacement, curve_points_ras, PlaceMode

REPO = Path(__file__).resolve().parents[1]
MODULE_FOLDER = REPO / "SegmentationMachine"

LOAD = f"""
import sys
sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(MODULE_FOLDER)!r}]  # Slicer puts the module's folder on sys.path
from slicer_standins import install_import_only_slicer, only_slicer_packages
install_import_only_slicer()
with only_slicer_packages():
    import SegmentationMachine
    SegmentationMachine.SegmentationMachineWidget, SegmentationMachine.SegmentationMachineTest
print("loaded")
"""


def run(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_the_module_loads_with_only_what_slicer_5_10_bundles(tmp_path):
    result = run(LOAD, tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "loaded", result.stderr[-3000:]


def test_the_import_guard_refuses_what_slicer_lacks(tmp_path):
    """The check above can fail: our code importing watchdog (installed here, absent in Slicer) is refused."""
    code = LOAD.replace("import SegmentationMachine\n", "exec('import watchdog', {'__name__': 'SegmentationMachineLib.probe'})\n")
    result = run(code, tmp_path)
    assert result.returncode != 0
    assert "SegmentationMachineLib.probe imports watchdog, which Slicer 5.10 does not bundle" in result.stderr


def test_a_developer_reload_leaves_one_generation_of_each_class(tmp_path):
    """Reload (the module's developer section) re-imports the library; an error class from a package reloaded
    before the one it derives from would no longer be a UserError, and its sentence would become a traceback."""
    code = LOAD.replace('print("loaded")', """
import importlib.util
def reload_module(widget):  # what slicer.util.reloadScriptedModule does first (Base/Python/slicer/util.py, v5.10.0)
    spec = importlib.util.spec_from_file_location("SegmentationMachine", SegmentationMachine.__file__)
    sys.modules["SegmentationMachine"] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
SegmentationMachine.ScriptedLoadableModuleWidget.onReload = reload_module
with only_slicer_packages():
    SegmentationMachine.SegmentationMachineWidget.onReload(object())
pods, errors = sys.modules["SegmentationMachineLib.cloud.pods"], sys.modules["SegmentationMachineLib.core.errors"]
assert issubclass(pods.PodsError, errors.UserError)
assert sys.modules["SegmentationMachine"] is not SegmentationMachine
print("reloaded")
""")
    result = run(code, tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "reloaded", result.stderr[-3000:]


def test_only_the_module_sits_in_the_module_folder():
    """Slicer loads every .py file directly in a module folder as a module
    (qSlicerAbstractModuleFactoryManager::registerModules lists QDir::Files): helpers live in a package."""
    assert [p.name for p in MODULE_FOLDER.glob("*.py")] == ["SegmentationMachine.py"]


def place(node, positions):
    """Clicks as vtkSlicerMarkupsWidget makes them, the mouse moving between them: while it moves, a preview control
    point follows the cursor (UpdatePreviewPoint), and a click defines it (PlacePoint), both through the display
    node's UpdateActiveControlPointWorld."""
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display, cursor = node.GetDisplayNode(), np.array(positions[0], float) + 7.0

    def preview_index():
        previews = [i for i in range(node.GetNumberOfControlPoints())
                    if node.GetNthControlPointPositionStatus(i) == node.PositionPreview]
        return previews[0] if previews else node.GetControlPointPlacementStartIndex()

    def update(position, status):
        event = slicer.vtkMRMLInteractionEventData()
        event.SetWorldPosition(list(position))
        display.UpdateActiveControlPointWorld(preview_index(), event, [1, 0, 0, 0, 1, 0, 0, 0, 1], "", "", status)

    for position in positions:
        for step in np.linspace(0, 1, 4):  # the mouse on its way to the click
            update(cursor + step * (np.array(position, float) - cursor), node.PositionPreview)
        update(position, node.PositionDefined)
        cursor = np.array(position, float)


def test_two_clicks_with_slicers_roi_give_a_flat_box_on_the_slice(ctx):
    roi = ctx.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    placement, boxes = BoxPlacement(), []

    def observe(node):  # as the AI prompts section does
        for event in (node.PointPositionDefinedEvent, vtk.vtkCommand.ModifiedEvent):
            node.AddObserver(event, lambda caller, event: boxes.append(placement.update(node)))

    observe(roi)
    place(roi, [(30.0, 50.0, 5.0), (10.0, 20.0, 5.0)])
    # Slicer's ROI has collapsed to its centre and grown across the slice; the box the user drew has not.
    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)
    assert roi.GetNumberOfControlPoints() == 1 and bounds[4:] == [-5.0, 15.0]
    assert [box for box in boxes if box] == [((10.0, 20.0, 5.0), (30.0, 50.0, 5.0))]
    # A box ROI takes one point from then on (UpdateControlPointsFromBoxROI): the section uses a fresh ROI.
    roi.RemoveAllControlPoints()
    assert roi.GetMaximumNumberOfControlPoints() == 1
    fresh = ctx.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    observe(fresh)
    place(fresh, [(0.0, 0.0, -2.0), (4.0, 6.0, -2.0)])
    assert [box for box in boxes if box][1:] == [((0.0, 0.0, -2.0), (4.0, 6.0, -2.0))]


def test_scribbles_and_lassos_are_the_spline_slicer_draws(ctx):
    corners = [(0.0, 0.0, 0.0), (10.0, 10.0, 0.0), (20.0, 0.0, 0.0)]
    curve = ctx.scene.AddNewNodeByClass("vtkMRMLMarkupsCurveNode")
    place(curve, corners)
    points = curve_points_ras(curve)
    assert len(points) > 10 and np.allclose(points[0], corners[0]) and np.allclose(points[-1], corners[-1])
    on_polygon = np.minimum(abs(points[:, 1] - points[:, 0]), abs(points[:, 1] - (20 - points[:, 0])))
    assert on_polygon.max() > 1.0  # a cardinal spline bulges off the straight control polygon
    lasso = ctx.scene.AddNewNodeByClass("vtkMRMLMarkupsClosedCurveNode")
    place(lasso, corners)
    ring = curve_points_ras(lasso)
    assert np.allclose(ring[0], ring[-1]) and len(ring) > len(points)  # closed back to the start


# Plain keys Slicer 5.10's views take (SetKeyboardEventTranslation in vtkMRMLSliceIntersectionWidget.cxx,
# vtkMRMLCameraWidget.cxx, vtkSlicerMarkupsWidget.cxx): a main-window shortcut on one of them steals it.
VIEW_KEYS = {"B", "F", "G", "R", "S", "T", "V"}


def test_no_shortcut_steals_a_key_slicers_views_use():
    tree = ast.parse((MODULE_FOLDER / "SegmentationMachineWidgets" / "prompttools.py").read_text())
    keys = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and (len(node.value) == 1 or node.value.startswith(("Ctrl+", "Shift+")))}
    assert {"Ctrl+Z", "Ctrl+Y"} <= keys and len(keys) >= 8, keys
    assert not keys & VIEW_KEYS, f"these shortcuts take keys from Slicer's views: {keys & VIEW_KEYS}"


def test_a_prompt_tool_gives_slicers_place_mode_back_as_it_was(ctx):
    """The interaction and selection nodes are Slicer's singletons: after a tool, "place multiple" and the active
    place node are the user's again, whether the tool was switched off or left by a right-click."""
    interaction, selection = ctx.app_logic.GetInteractionNode(), ctx.app_logic.GetSelectionNode()
    markups_logic = slicer.vtkSlicerMarkupsLogic()  # Slicer's: it makes each new markups node the active place node
    markups_logic.SetMRMLApplicationLogic(ctx.app_logic)
    markups_logic.SetMRMLScene(ctx.scene)
    own = ctx.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "my landmarks")
    before = (0, interaction.ViewTransform, "vtkMRMLMarkupsFiducialNode", own.GetID())

    def state():
        return (interaction.GetPlaceModePersistence(), interaction.GetCurrentInteractionMode(),
                selection.GetActivePlaceNodeClassName(), selection.GetActivePlaceNodeID())

    assert state() == before
    place_mode = PlaceMode()
    made = []  # the prompt node is made when the tool is first chosen: after Slicer's state is kept
    place_mode.take(interaction, selection, "vtkMRMLMarkupsCurveNode",
                    lambda: made.append(ctx.scene.AddNewNodeByClass("vtkMRMLMarkupsCurveNode", "AI scribble prompt"))
                    or made[-1].GetID())
    [prompts] = made
    assert state() == (1, interaction.Place, "vtkMRMLMarkupsCurveNode", prompts.GetID())
    place_mode.take(interaction, selection, "vtkMRMLMarkupsCurveNode", prompts.GetID())  # another tool: still kept
    interaction.SwitchToViewTransformMode()  # a right-click ends the curve; persistence stays 1 in Slicer
    assert interaction.GetPlaceModePersistence() == 1
    place_mode.give_back(interaction, selection, keep_mode=True)
    assert state() == before

    interaction.SetCurrentInteractionMode(interaction.Place)  # the user was placing their own points
    place_mode.take(interaction, selection, "vtkMRMLMarkupsCurveNode", prompts.GetID())
    ctx.scene.RemoveNode(own)
    place_mode.give_back(interaction, selection)  # the tool switched off: their mode comes back, their node is gone
    assert state() == (0, interaction.Place, "vtkMRMLMarkupsFiducialNode", None)
    place_mode.give_back(interaction, selection)  # nothing taken: nothing changes
    assert state() == (0, interaction.Place, "vtkMRMLMarkupsFiducialNode", None)


def test_a_closed_scenes_node_ids_go_to_the_next_nodes_made(ctx):
    """Close Scene (vtkMRMLScene::Clear) forgets the IDs it gave: a prompt node kept across it is found by its ID as
    the user's next list of its class. prompttools asks IsNodePresent instead."""
    prompts = ctx.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "AI point prompt")
    ctx.scene.Clear(False)
    own = ctx.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "my landmarks")
    assert ctx.scene.GetNodeByID(prompts.GetID()) is own and not ctx.scene.IsNodePresent(prompts)
    assert "IsNodePresent(node)" in (MODULE_FOLDER / "SegmentationMachineWidgets" / "prompttools.py").read_text()


def test_the_cloud_sections_cleanup_leaves_its_quit_slot_connected():
    """Slicer connects its own aboutToQuit slot first (qSlicerCoreApplicationPrivate::init); it unloads the modules,
    which calls our cleanup(), before our slot's turn. Qt skips a slot disconnected during the emission, so a
    cleanup() that disconnected aboutToQuit would leave this session's pods running on every quit. (A source check:
    Qt's emission order cannot run here.)"""
    tree = ast.parse((MODULE_FOLDER / "SegmentationMachineWidgets" / "cloud.py").read_text())
    section = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "CloudSection")
    methods = {node.name: node for node in section.body if isinstance(node, ast.FunctionDef)}

    def quit_calls(function, verb):
        return [call for call in ast.walk(function) if isinstance(call, ast.Call)
                and getattr(call.func, "attr", "") == verb and call.args
                and getattr(call.args[0], "value", None) == "aboutToQuit()"]

    assert quit_calls(methods["__init__"], "connect") and not quit_calls(methods["cleanup"], "disconnect")


def test_an_install_into_slicer_may_add_packages_but_never_replace_slicers(tmp_path):
    """pip upgrades an installed package in place for a newer requirement (runpod 1.12 would take Slicer's
    requests, urllib3 and cryptography): installs into Slicer are constrained to what it has."""
    from importlib import metadata

    from SegmentationMachineLib.core.packages import installed_pins

    pins = tmp_path / "pins.txt"
    pins.write_text(installed_pins())
    numpy_version = metadata.version("numpy")
    assert f"numpy=={numpy_version}" in pins.read_text().splitlines()
    newer = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--constraint", str(pins),
                            f"numpy>{numpy_version}"], capture_output=True, text=True, timeout=120)
    assert newer.returncode != 0 and "conflict" in newer.stdout + newer.stderr
    binding = (MODULE_FOLDER / "SegmentationMachineWidgets" / "packages.py").read_text()
    assert '"--constraint", str(pins)' in binding and "installed_pins()" in binding


def test_without_keyring_as_in_a_stock_slicer_keys_go_to_a_file_only_the_user_reads(tmp_path, monkeypatch):
    from SegmentationMachineLib.core.credentials import SecretStore

    monkeypatch.setitem(sys.modules, "keyring", None)  # stock Slicer bundles no keyring: importing it fails
    store = SecretStore(tmp_path / "secrets")
    store.save("nninteractive-api-key", "key-0123456789")
    assert store.where.endswith("(readable only by you)") and store.load("nninteractive-api-key") == "key-0123456789"
    assert (tmp_path / "secrets" / "nninteractive-api-key").stat().st_mode & 0o077 == 0


def test_a_key_saved_by_slicer_in_the_file_is_found_where_keyring_works_and_a_locked_keychain_is_no_traceback(
        tmp_path, monkeypatch):
    """The CLI (with keyring) looked only in the keychain, for keys a stock Slicer keeps in the file; a macOS keychain
    locked (an SSH session, a service) ended in keyring's traceback."""
    keyring = pytest.importorskip("keyring")
    from keyring.backend import KeyringBackend
    from keyring.errors import KeyringError

    from SegmentationMachineLib.core.credentials import SecretStore

    class Keychain(KeyringBackend):
        priority, locked, kept = 5, False, {}

        def _unless_locked(self):
            if self.locked:
                raise KeyringError("Can't get password from keychain: (-25308, 'Unknown Error')")

        def get_password(self, service, name):
            self._unless_locked()
            return self.kept.get((service, name))

        def set_password(self, service, name, secret):
            self._unless_locked()
            self.kept[(service, name)] = secret

        def delete_password(self, service, name):
            self._unless_locked()
            self.kept.pop((service, name))

    keychain = Keychain()
    monkeypatch.setattr(keyring.core, "_keyring_backend", keychain)  # keyring's own calls use it
    slicer = SecretStore(tmp_path / "secrets", use_keychain=False)
    slicer.save("runpod-api-key", "from-slicer")  # as stock Slicer keeps it
    store = SecretStore(tmp_path / "secrets")
    assert store.where == "the OS keychain" and store.load("runpod-api-key") == "from-slicer"
    assert store.save("runpod-api-key", "new").endswith("(readable only by you)")  # where Slicer reads it too
    assert slicer.load("runpod-api-key") == store.load("runpod-api-key") == "new" and not keychain.kept
    store.forget("runpod-api-key")
    assert store.save("runpod-api-key", "cli") == "the OS keychain" and keychain.kept
    assert store.load("runpod-api-key") == "cli" and slicer.load("runpod-api-key") is None
    keychain.locked = True
    assert store.load("runpod-api-key") is None
    assert store.save("runpod-api-key", "while-locked").endswith("(readable only by you)")
    assert store.load("runpod-api-key") == "while-locked"
    store.forget("runpod-api-key")
    assert store.load("runpod-api-key") is None


def test_without_the_nninteractive_client_as_in_a_stock_slicer_a_prompt_says_what_to_install(monkeypatch):
    from SegmentationMachineLib.prompts.session import InteractiveError, InteractiveSession

    for name in ("blosc2", "httpx", "nnInteractive", "nnInteractive.inference", "nnInteractive.inference.remote"):
        monkeypatch.setitem(sys.modules, name, None)  # Slicer bundles none of them
    with pytest.raises(InteractiveError, match=r"^The nnInteractive client is not installed: pip install -e '\.\[ai\]' "
                                               r"in the SegmentationMachine folder \(in Slicer, the module offers to "):
        InteractiveSession("http://127.0.0.1:1", "key-0123456789").connect()


def test_the_report_box_is_set_only_when_its_text_changes():
    """The inbox's 250 ms update set it every time, and Qt's setPlainText reset the user's scroll and selection."""
    sys.path.insert(0, str(MODULE_FOLDER))
    try:
        from SegmentationMachineWidgets import setPlainText
    finally:
        sys.path.remove(str(MODULE_FOLDER))

    class TextBox:
        plainText, sets = "", 0

        def __setattr__(self, name, value):
            if name == "plainText":
                object.__setattr__(self, "sets", self.sets + 1)
            object.__setattr__(self, name, value)

    box = TextBox()
    for text in ("Bone: 120 mL", "Bone: 120 mL", "Bone: 120 mL", "Skin: 2 L"):
        setPlainText(box, text)
    assert (box.plainText, box.sets) == ("Skin: 2 L", 2)
    assert "setPlainText(self.ui.reportTextEdit" in (MODULE_FOLDER / "SegmentationMachine.py").read_text()


def test_a_module_timer_never_runs_its_slot_inside_itself(monkeypatch):
    """Loading an inbox series runs Qt's event loop (ctkDICOMIndexer::waitForImportFinished, in CTK at Slicer 5.10's
    commit): the 250 ms inbox timer fired inside its own slot, and an older series was loaded last."""
    sys.path.insert(0, str(MODULE_FOLDER))
    try:
        from SegmentationMachineWidgets import timer
    finally:
        sys.path.remove(str(MODULE_FOLDER))

    class QTimer:  # Qt's, as far as timer() uses it; fire() is a timeout, as an event loop delivers it
        def __init__(self):
            self.slots = []
            self.timeout = SimpleNamespace(connect=self.slots.append)

        def setInterval(self, interval_ms):
            self.interval = interval_ms

        def fire(self):
            for slot in self.slots:
                slot()

    monkeypatch.setitem(sys.modules, "qt", SimpleNamespace(QTimer=QTimer))
    calls = []

    def tick():  # a load that waits in an event loop, where the timer fires again
        calls.append(len(calls))
        if len(calls) == 1:
            ticking.fire()

    ticking = timer(250, tick)
    ticking.fire()
    ticking.fire()
    assert calls == [0, 1] and ticking.interval == 250


def test_the_choice_combo_boxes_say_what_each_item_is_and_still_give_the_raw_value(monkeypatch):
    """Slicer 5.10's QComboBoxToStringableConnector (parameterNodeWrapper/guiConnectors.py) fills a Choice's combo box
    with str(value) and reads the value back by index: the user saw "bone" and "LPS"."""
    sys.path.insert(0, str(MODULE_FOLDER))
    try:
        from SegmentationMachineWidgets import labelChoices
    finally:
        sys.path.remove(str(MODULE_FOLDER))
    from SegmentationMachineLib.panels.export import COORDINATE_CHOICES
    from SegmentationMachineLib.panels.presets import PRESET_CHOICES
    from SegmentationMachineLib.segment.masks import PRESETS

    class ComboBox:  # Qt's, as far as the connector and labelChoices use it
        def __init__(self, values):
            self.texts, self.tips = [str(v) for v in values], {}

        count = property(lambda self: len(self.texts))

        def itemText(self, index):
            return self.texts[index]

        def setItemText(self, index, text):
            self.texts[index] = text

        def setItemData(self, index, value, role):
            self.tips[index, role] = value

    monkeypatch.setitem(sys.modules, "qt", SimpleNamespace(Qt=SimpleNamespace(ToolTipRole=3)))
    module = (MODULE_FOLDER / "SegmentationMachine.py").read_text()
    assert 'Choice(["LPS", "RAS"])' in module and "Choice(list(PRESETS))" in module
    for values, choices in ((list(PRESETS), PRESET_CHOICES), (["LPS", "RAS"], COORDINATE_CHOICES)):
        combo = ComboBox(values)
        labelChoices(combo, choices)
        labelChoices(combo, choices)  # again without connectGui (a parameter node set to None): kept as they are
        assert combo.texts == [choices[v][0] for v in values] and all(t not in values for t in combo.texts)
        assert combo.tips == {(i, 3): choices[v][1] for i, v in enumerate(values)} and all(combo.tips.values())
    assert combo.texts == ["LPS (DICOM's)", "RAS (Slicer's)"]


def test_a_series_a_bug_stops_loading_gets_a_row_that_quotes_nothing_from_its_header(monkeypatch, caplog):
    """An unexpected error left the inbox timer's tick: that series, and the others of the tick, got no row; its text
    (a pydicom or VTK error may quote a header value) went to the Python console only."""
    sys.path.insert(0, str(MODULE_FOLDER))
    try:
        from SegmentationMachineWidgets import inbox
    finally:
        sys.path.remove(str(MODULE_FOLDER))
    from SegmentationMachineLib.core.errors import InputError, UserError

    delivery = SimpleNamespace(series=SimpleNamespace(files=[], name="CT 'chest'"))

    def load_series(context, series):
        raise ValueError("Invalid value for VR PN: 'Privacy^Jane'")

    monkeypatch.setattr(inbox, "load_series", load_series)
    with pytest.raises(UserError) as raised:
        inbox.loadDelivery(None, delivery)
    assert str(raised.value) == ("CT 'chest' could not be loaded: an unexpected error stopped it (the details are in "
                                 "Slicer's Python console and log); please report it with the log.")
    assert "Privacy^Jane" in caplog.text  # the log keeps what happened

    def refused(context, series):
        raise InputError("CT 'chest' has a gap.")

    monkeypatch.setattr(inbox, "load_series", refused)
    with pytest.raises(InputError, match=r"^CT 'chest' has a gap\.$"):
        inbox.loadDelivery(None, delivery)  # a user mistake's own sentence, as it was
