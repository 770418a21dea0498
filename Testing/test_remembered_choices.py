"""The Export and Cloud GPU choices the module remembers in Slicer's settings, read back as Slicer 5.10 gives them.

Slicer keeps QSettings in an .ini file (Qt 5's QSettings::IniFormat). After a restart PythonQt's QSettings.value()
answers the text of the file: "true"/"false", "0.5", a comma list as a tuple of strings, a one-item list as that
item, an empty list (written "@Invalid()") as None, a missing key None. Slicer's own util.settingsValue only calls
its converter where contains() is true (Base/Python/slicer/util.py, v5.10.0); its toBool reads anything but "true"
or a number as False, so a hand-edited "yes" would untick a box: here such a value keeps the default instead.
"""

import ast
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import slicer

from SegmentationMachineLib.cloud.cloudgpu import MODES
from SegmentationMachineLib.cloud.pods import GpuType
from SegmentationMachineLib.mesh.export import FORMATS
from SegmentationMachineLib.panels.remembered import (BUDGET_USD, IDLE_MINUTES, LIFETIME_HOURS, CloudChoices,
                                                      ExportChoices, ExportMemory, remembered_parameter_node)

MODULE = Path(__file__).resolve().parents[1] / "SegmentationMachine" / "SegmentationMachine.py"


def _ini_text(value) -> str:
    """What Qt 5 writes after 'key=' for a value PythonQt passes to setValue (checked with Qt 5.15's QSettings in
    IniFormat: true, 0.5, 1 for 1.0, "stl,obj,3mf" quoted, stl, obj for a list, @Invalid() for an empty one, a list
    of one as a binary @Variant(...), read back as a list of one)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        text = repr(value)  # Qt writes the shortest text that reads back the same double, 1.0 as 1
        return text[:-2] if text.endswith(".0") else text
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return f"@Variant(list of {_ini_text(value[0])})"  # this stand-in's spelling of Qt's binary form
        return ", ".join(_ini_text(item) for item in value) if value else "@Invalid()"
    value = str(value)
    needs_quotes = any(c in value for c in ',;="') or value != value.strip()
    return f'"{value}"' if needs_quotes else value


def _read_back(text: str):
    """What PythonQt's QSettings.value() answers for a line of the .ini after a restart."""
    if text == "@Invalid()":
        return None
    if text.startswith("@Variant(list of "):
        return (_read_back(text[len("@Variant(list of "):-1]),)
    if text.startswith('"') and text.endswith('"') and len(text) > 1:
        return text[1:-1]
    if "," in text:  # an unquoted comma: Qt reads a QStringList, PythonQt hands a tuple
        return tuple(item.strip() for item in text.split(","))
    return text


class IniSettings:
    """Slicer's settings as a new Slicer reads them from its .ini file: every value comes back as text."""

    def __init__(self, ini: dict = None):
        self.ini = dict(ini or {})  # key -> the text after '=' in the file
        self.written = []

    def setValue(self, key, value):
        self.ini[key] = _ini_text(value)
        self.written.append(key)

    def contains(self, key):
        return key in self.ini

    def value(self, key, default=None):
        return _read_back(self.ini[key]) if key in self.ini else default

    def restarted(self) -> "IniSettings":
        return IniSettings(self.ini)


class SessionSettings(IniSettings):
    """The session that wrote them: QSettings hands back the values as written (a bool, a float)."""

    def __init__(self):
        super().__init__()
        self.values = {}

    def setValue(self, key, value):
        super().setValue(key, value)
        self.values[key] = value

    def value(self, key, default=None):
        return self.values.get(key, default)


def _wrapper_defaults() -> dict:
    """The defaults of the module's @parameterNodeWrapper fields that have literal ones."""
    tree = ast.parse(MODULE.read_text())
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SegmentationMachineParameterNode")
    return {n.target.id: ast.literal_eval(n.value) for n in wrapper.body
            if isinstance(n, ast.AnnAssign) and n.value is not None and isinstance(n.value, ast.Constant)}


class Wrapped:
    """What @parameterNodeWrapper does with a node (Base/Python/slicer/parameterNodeWrapper/wrapper.py, v5.10.0):
    wrapping writes each parameter the node lacks with the field's default; fields read and write the node's
    parameters as text, bools as "true"/"false"."""

    DEFAULTS = {name: value for name, value in _wrapper_defaults().items() if name in ExportChoices.parameter_names()}

    def __init__(self, node):
        object.__setattr__(self, "node", node)
        for name, default in self.DEFAULTS.items():
            if not node.HasParameter(name):
                setattr(self, name, default)

    def __getattr__(self, name):
        text, default = self.node.GetParameter(name), self.DEFAULTS[name]
        return text == "true" if isinstance(default, bool) else type(default)(text)

    def __setattr__(self, name, value):
        self.node.SetParameter(name, ("true" if value else "false") if isinstance(value, bool) else str(value))


CHANGED_EXPORT = ExportChoices(formats=("obj", "seg"), smoothing=0.25, coordinates="RAS", merged_stl=True,
                               shown_only=True)
CHANGED_CLOUD = CloudChoices(gpu="NVIDIA L40S", mode="desktop", idle_minutes=45, lifetime_hours=3, budget_usd=12.5)


def test_every_choice_comes_back_after_a_restart_as_it_was_chosen():
    """Written as Qt writes them, read back as text: each is converted again, not taken as the text."""
    for choices in (CHANGED_EXPORT, CHANGED_CLOUD, ExportChoices(formats=("glb",)), ExportChoices(formats=FORMATS),
                    CloudChoices(mode="server", idle_minutes=240, lifetime_hours=168, budget_usd=1000.0),
                    CloudChoices(idle_minutes=5, lifetime_hours=1, budget_usd=0.0)):
        settings = IniSettings()
        choices.save(settings)
        assert all(isinstance(settings.restarted().value(key), str) for key in settings.written)  # text, as restarted
        assert type(choices).load(settings.restarted()) == choices
    session = SessionSettings()  # and in the session that wrote them, where QSettings hands back the values
    CHANGED_EXPORT.save(session)
    CHANGED_CLOUD.save(session)
    assert (ExportChoices.load(session), CloudChoices.load(session)) == (CHANGED_EXPORT, CHANGED_CLOUD)


def test_text_from_the_file_is_converted_false_is_false_and_numbers_are_numbers():
    """The .ini's own text, as a restarted Slicer reads it: "false" is not a true string, "0.25" no string at all."""
    ini = IniSettings({f"SegmentationMachine/{key}": text for key, text in {
        "Export/MergedStl": "false", "Export/ShownSegmentsOnly": "true", "Export/Smoothing": "0.25",
        "Export/Formats": '"obj,3mf"', "Export/Coordinates": "RAS", "CloudGpu/IdleTimeoutMinutes": "45",
        "CloudGpu/MaxLifetimeHours": "1", "CloudGpu/BudgetUsd": "0"}.items()})
    export, cloud = ExportChoices.load(ini), CloudChoices.load(ini)
    assert export.merged_stl is False and export.shown_only is True
    assert export.smoothing == 0.25 and isinstance(export.smoothing, float)
    assert export.formats == ("obj", "3mf") and export.coordinates == "RAS"
    assert (cloud.idle_minutes, cloud.lifetime_hours, cloud.budget_usd) == (45, 1, 0.0)
    assert isinstance(cloud.idle_minutes, int) and isinstance(cloud.budget_usd, float)
    # True stored over a default of False, then False again: the last one is what comes back
    settings = IniSettings()
    ExportChoices(merged_stl=True).save(settings)
    ExportChoices(merged_stl=False).save(settings)
    assert settings.ini["SegmentationMachine/Export/MergedStl"] == "false"
    assert ExportChoices.load(settings.restarted()).merged_stl is False
    # A hand edit in numbers (Qt itself writes true/false): 1 ticks a box, 0 unticks it
    edited = ExportChoices.load(IniSettings({ExportChoices.key("merged_stl"): "1",
                                             ExportChoices.key("shown_only"): "0"}).restarted())
    assert (edited.merged_stl, edited.shown_only) == (True, False)


@pytest.mark.parametrize("text, formats", [
    ("stl", ("stl",)),  # one name edited by hand
    ("@Variant(list of obj)", ("obj",)),  # a list of one (from another version), read back as a list of one
    ("STL", ("stl",)),
    ("3mf, stl", ("stl", "3mf")),  # a list edited by hand, read back as a tuple: in the module's order
    ('"obj,glb,seg"', ("obj", "glb", "seg")),  # as written: one quoted string
    ("stl, ply", ("stl",)),  # a newer version's format is left out, the known one kept
])
def test_formats_come_back_from_one_item_a_list_or_the_written_string(text, formats):
    assert ExportChoices.load(IniSettings({ExportChoices.key("formats"): text})).formats == formats


BAD = {  # choice -> what a hand edit or another version may have left, as the file's text or as PythonQt's value
    "formats": ["xyz", "", "@Invalid()", "ply, vrml", '" , "', 7, b"stl", ("stl", 3), {"stl": 1}],
    "smoothing": ["abc", "7", "-0.1", "1.5", "nan", "inf", "-inf", "", "0.5, 0.6", True, None, b"0.5", 10 ** 400],
    "coordinates": ["XYZ", "", "LPS, RAS", "L P S", 0, None],
    "merged_stl": ["abc", "yes", "2", "-1", "", "true, false", 2, 0.5, None, b"true"],
    "shown_only": ["abc", "on", "", "@Invalid()", 3],
    "gpu": ["", "   ", "@Invalid()", "A5000, 4090", 4090],
    "mode": ["cloud", "", "server, desktop", 1, None],
    "idle_minutes": ["-5", "0", "4", "241", "15.5", "nan", "inf", "abc", "1e999", "", True, None],
    "lifetime_hours": ["0", "-1", "169", "nan", "inf", "2.5", "abc", False],
    "budget_usd": ["-1", "-0.01", "1000.5", "nan", "inf", "-inf", "abc", "", "5, 6", None],
}


@pytest.mark.parametrize("choice, stored", [(choice, stored) for choice, values in BAD.items() for stored in values])
def test_a_value_this_version_cannot_use_is_that_choices_default_and_the_others_stay(choice, stored):
    changed = CHANGED_EXPORT if choice in ExportChoices.KEYS else CHANGED_CLOUD
    settings = IniSettings()
    changed.save(settings)
    if isinstance(stored, str):  # the file's text
        settings.ini[changed.key(choice)] = stored
        loaded = type(changed).load(settings.restarted())
    else:  # a value PythonQt might hand back (a QByteArray, a number, an invalid QVariant)
        session = SessionSettings()
        changed.save(session)
        session.values[changed.key(choice)] = stored
        loaded = type(changed).load(session)
    expected = {name: getattr(changed, name) for name in changed.KEYS}
    expected[choice] = getattr(type(changed)(), choice)
    assert {name: getattr(loaded, name) for name in changed.KEYS} == expected


def test_nothing_remembered_gives_the_defaults_and_the_modules_wrapper_has_the_same():
    assert ExportChoices.load(IniSettings()) == ExportChoices() and CloudChoices.load(IniSettings()) == CloudChoices()
    assert ExportChoices.load(IniSettings({"Other/Key": "1"})) == ExportChoices()
    defaults = _wrapper_defaults()
    assert set(ExportChoices.parameter_names()) <= set(defaults)  # every choice is a field of the module's wrapper
    assert ExportChoices.of(SimpleNamespace(**defaults)) == ExportChoices()
    assert CloudChoices().mode == MODES[0] and IDLE_MINUTES[0] <= CloudChoices().idle_minutes <= IDLE_MINUTES[1]
    assert LIFETIME_HOURS[0] <= CloudChoices().lifetime_hours <= LIFETIME_HOURS[1] and BUDGET_USD[0] == 0


def test_a_choice_no_export_could_use_is_not_written_over_the_remembered_one():
    settings = IniSettings()
    CHANGED_EXPORT.save(settings)
    assert ExportChoices(formats=(), smoothing=CHANGED_EXPORT.smoothing).save(settings, CHANGED_EXPORT) == [
        "coordinates", "merged_stl", "shown_only"]  # no format ticked: the remembered ones stay for next time
    assert ExportChoices.load(settings.restarted()).formats == CHANGED_EXPORT.formats
    assert CloudChoices(gpu="").save(IniSettings()) == ["mode", "idle_minutes", "lifetime_hours", "budget_usd"]


def test_a_gpu_type_runpod_no_longer_offers_is_the_cheapest_offered():
    gpus = [GpuType(name, name, 24, price, price) for name, price in
            (("NVIDIA RTX A5000", 0.27), ("NVIDIA GeForce RTX 4090", 0.69), ("NVIDIA L40S", 0.86))]
    assert CHANGED_CLOUD.gpu_index(gpus) == 2
    assert CloudChoices(gpu="NVIDIA A40").gpu_index(gpus) == 0 and CloudChoices().gpu_index(gpus) == 0
    settings = IniSettings({CloudChoices.key("gpu"): "NVIDIA A40"})  # remembered, then no longer offered
    assert CloudChoices.load(settings).gpu_index(gpus) == 0 and CloudChoices.load(settings).gpu_index([]) == 0


def _module_node(scene):
    """The module's singleton parameter node, as ScriptedLoadableModuleLogic.getParameterNode adds it."""
    node = scene.GetSingletonNode("SegmentationMachine", "vtkMRMLScriptedModuleNode")
    if node is None:
        node = slicer.vtkMRMLScriptedModuleNode()
        node.SetSingletonTag("SegmentationMachine")
        node.SetAttribute("ModuleName", "SegmentationMachine")
        scene.AddNode(node)
    return node


def test_a_new_parameter_node_and_one_close_scene_emptied_get_the_remembered_choices(ctx):
    settings = IniSettings()
    CHANGED_EXPORT.save(settings)
    settings = settings.restarted()
    first = remembered_parameter_node(_module_node(ctx.scene), Wrapped, settings)
    assert ExportChoices.of(first) == CHANGED_EXPORT
    assert first.exportStl is False and first.exportSeg is True  # from "obj,seg", not the wrapper's defaults
    ctx.scene.Clear(0)  # Close Scene: Slicer keeps the singleton node and clears its parameters
    node = _module_node(ctx.scene)
    assert node is first.node and not node.HasParameter("exportObj")
    assert ExportChoices.of(remembered_parameter_node(node, Wrapped, settings)) == CHANGED_EXPORT
    # without the library, the wrapper's defaults (what Close Scene gave before)
    ctx.scene.Clear(0)
    assert ExportChoices.of(Wrapped(_module_node(ctx.scene))) == ExportChoices()


def test_a_scenes_own_choices_stay_and_one_it_lacks_is_the_remembered_one(ctx):
    settings = IniSettings()
    CHANGED_EXPORT.save(settings)
    node = _module_node(ctx.scene)
    node.SetParameter("smoothing", "0.75")  # a scene saved with its choices, before DICOM SEG existed
    for name in set(ExportChoices.parameter_names()) - {"smoothing", "exportSeg"}:
        node.SetParameter(name, "false")
    node.SetParameter("exportCoordinates", "LPS")
    loaded = ExportChoices.of(remembered_parameter_node(node, Wrapped, settings.restarted()))
    assert loaded == ExportChoices(formats=("seg",), smoothing=0.75, coordinates="LPS")


def test_a_choice_the_user_changes_is_written_and_comes_back_after_a_restart(ctx):
    settings = IniSettings()
    memory = ExportMemory(lambda: settings)
    node = Wrapped(_module_node(ctx.scene))
    memory.bind(node)
    assert memory.update() == [] and settings.written == []  # bound: nothing changed yet, nothing written
    node.exportMergedStl = True
    assert memory.update() == ["merged_stl"] and settings.ini == {ExportChoices.key("merged_stl"): "true"}
    assert memory.update() == []  # once
    node.smoothing, node.exportStl, node.exportGlb = 0.3, False, True
    assert memory.update() == ["formats", "smoothing"]
    node.exportCoordinates, node.exportShownOnly, node.exportMergedStl = "RAS", True, False
    assert memory.update() == ["coordinates", "merged_stl", "shown_only"]
    assert ExportChoices.load(settings.restarted()) == ExportChoices(
        formats=("obj", "3mf", "glb"), smoothing=0.3, coordinates="RAS", merged_stl=False, shown_only=True)


def test_a_loaded_scenes_choices_are_not_written_until_one_is_changed(ctx):
    settings = IniSettings()
    CHANGED_EXPORT.save(settings)
    written = list(settings.written)
    memory = ExportMemory(lambda: settings)
    node = Wrapped(_module_node(ctx.scene))  # a scene with the defaults in its node
    memory.bind(node)
    assert memory.update() == [] and settings.written == written
    assert ExportChoices.load(settings.restarted()) == CHANGED_EXPORT
    node.exportObj = False  # one changed: that one alone is written
    assert memory.update() == ["formats"] and settings.ini[ExportChoices.key("formats")] == '"stl,3mf"'
    assert ExportChoices.load(settings.restarted()).smoothing == CHANGED_EXPORT.smoothing
    memory.bind(None)  # Close Scene
    assert memory.update() == []


def test_the_bindings_remember_every_choice_through_the_library():
    """Slicer is not here to run the bindings: what they call must exist, and every Cloud GPU choice is written."""
    cloud = (MODULE.parent / "SegmentationMachineWidgets" / "cloud.py").read_text()
    used = set(re.findall(r"self\.choices\.(\w+)", cloud))
    assert used and all(hasattr(CloudChoices(), name) for name in used)
    call = next(node for node in ast.walk(ast.parse(cloud)) if isinstance(node, ast.Call)
                and getattr(node.func, "id", "") == "CloudChoices")
    assert {keyword.arg for keyword in call.keywords} == set(CloudChoices.KEYS)
    connected = set()  # the widgets of each loop that connects its widgets' changes to rememberChoices
    for loop in (node for node in ast.walk(ast.parse(cloud)) if isinstance(node, ast.For)):
        if "self.rememberChoices" in ast.unparse(loop.body[0]):
            connected |= {element.attr for element in loop.iter.elts}
    assert connected == {"gpuCombo", "modeCombo", "idleSpin", "lifetimeSpin", "budgetSpin"}
    module = MODULE.read_text()
    for call in ("remembered_parameter_node(super().getParameterNode(), SegmentationMachineParameterNode",
                 "self.exportMemory.bind(parameterNode)", "self.exportMemory.update()"):
        assert call in module
