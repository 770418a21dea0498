"""The Export and Cloud GPU choices the module remembers in Slicer's settings (QSettings), and reading them back.

Slicer's settings are an .ini file. After a restart PythonQt hands every value back as a string ("true", "0.5",
"1" for 1.0), a list as a tuple or list (of one item: that item, where it was written as a string list), an empty
list as None; in the session that wrote it, as written. A value this version cannot use (written by another
version, or edited by hand) falls back to its default, that choice alone: the module still opens, with every other
choice remembered.
"""

from dataclasses import dataclass

from ..cloud.cloudgpu import MODES
from ..mesh.export import FORMATS

PREFIX = "SegmentationMachine/"
COORDINATES = ("LPS", "RAS")
# The Cloud GPU section's ranges (its spin boxes have them too): what a remembered limit may be
IDLE_MINUTES = (5, 240)
LIFETIME_HOURS = (1, 168)
BUDGET_USD = (0.0, 1000.0)  # 0: no budget


def as_bool(value):
    """True/False from what QSettings gives back; None for anything else. Slicer's util.toBool would read a
    hand-edited "yes" or "abc" as False (it compares with "true"): here such a value is no choice, and the default
    holds."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return {"true": True, "1": True, "false": False, "0": False}.get(value.strip().lower())
    return None


def as_number(value, low: float, high: float, whole: bool = False):
    """A finite number within [low, high] (a whole one where whole), from a number or its text; None otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):  # "abc"; an integer too large for a float
        return None
    if not low <= number <= high or whole and not number.is_integer():  # NaN fails the comparison too
        return None
    return int(number) if whole else number


def as_one_of(value, options: tuple):
    """One of options, whatever its case ("lps" is LPS); None otherwise."""
    if not isinstance(value, str):
        return None
    return next((option for option in options if option.lower() == value.strip().lower()), None)


def as_formats(value):
    """The export formats, in FORMATS' order, from "stl,obj" (as written; Qt quotes it, so it comes back one
    string), one name, or a tuple or list (a hand edit without quotes is read as one); a name this version does not
    know is left out (a newer version's format). None where no known one is left: an export needs one."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else None
    if items is None or not all(isinstance(item, str) for item in items):
        return None
    names = {item.strip().lower() for item in items}
    chosen = tuple(name for name in FORMATS if name in names)
    return chosen or None


class _Choices:
    """A frozen dataclass of choices, each stored under PREFIX + GROUP + its KEYS entry and read with its READERS
    entry (value -> the choice, or None where the value is none)."""

    GROUP, KEYS, READERS, STORED = "", {}, {}, {}

    @classmethod
    def key(cls, name: str) -> str:
        return f"{PREFIX}{cls.GROUP}/{cls.KEYS[name]}"

    @classmethod
    def load(cls, settings):
        """The remembered choices; the default for each one not remembered or not usable. Never raises: each reader
        takes any value (a string, a tuple, None, a number) and answers None for what it cannot use."""
        defaults, chosen = cls(), {}
        for name, read in cls.READERS.items():
            value = read(settings.value(cls.key(name))) if settings.contains(cls.key(name)) else None
            chosen[name] = getattr(defaults, name) if value is None else value
        return cls(**chosen)

    def save(self, settings, before=None):
        """Writes the choices that differ from before (all of them without before); returns their names. A choice
        that is no valid one is not written (the remembered one stays)."""
        written = []
        for name in self.KEYS:
            value = getattr(self, name)
            if before is not None and getattr(before, name) == value:
                continue
            if self.READERS[name](value) is None:
                continue
            settings.setValue(self.key(name), self.STORED.get(name, lambda v: v)(value))
            written.append(name)
        return written


@dataclass(frozen=True)
class ExportChoices(_Choices):
    """The Export section's choices (Slicer's own "Export segments to files" remembers its own the same way)."""

    formats: tuple = ("stl", "obj", "3mf")
    smoothing: float = 0.5
    coordinates: str = "LPS"
    merged_stl: bool = False
    shown_only: bool = False

    GROUP = "Export"
    KEYS = {"formats": "Formats", "smoothing": "Smoothing", "coordinates": "Coordinates", "merged_stl": "MergedStl",
            "shown_only": "ShownSegmentsOnly"}
    READERS = {"formats": as_formats, "smoothing": lambda v: as_number(v, 0.0, 1.0),
               "coordinates": lambda v: as_one_of(v, COORDINATES), "merged_stl": as_bool, "shown_only": as_bool}
    # One string, not a list: Qt writes a one-item list as its item and an empty one as no value
    STORED = {"formats": ",".join}
    # The module's parameter node: its field for each choice (a format is ticked in export + its name capitalised)
    FIELDS = {"smoothing": "smoothing", "coordinates": "exportCoordinates", "merged_stl": "exportMergedStl",
              "shown_only": "exportShownOnly"}
    FORMAT_FIELDS = {name: f"export{name.capitalize()}" for name in FORMATS}

    @classmethod
    def parameter_names(cls) -> tuple:
        """The parameter node's fields that hold these choices."""
        return (*cls.FORMAT_FIELDS.values(), *cls.FIELDS.values())

    @classmethod
    def of(cls, parameter_node) -> "ExportChoices":
        """The choices a parameter node holds now."""
        formats = tuple(name for name, field in cls.FORMAT_FIELDS.items() if getattr(parameter_node, field))
        return cls(formats=formats, **{name: getattr(parameter_node, field) for name, field in cls.FIELDS.items()})

    def apply_to(self, parameter_node, parameter_names=None):
        """Sets the parameter node's fields named (default: all of them) to these choices."""
        names = self.parameter_names() if parameter_names is None else parameter_names
        values = {field: name in self.formats for name, field in self.FORMAT_FIELDS.items()}
        values.update({field: getattr(self, name) for name, field in self.FIELDS.items()})
        for field in names:
            if getattr(parameter_node, field) != values[field]:
                setattr(parameter_node, field, values[field])


@dataclass(frozen=True)
class CloudChoices(_Choices):
    """The Cloud GPU section's choices. gpu: RunPod's GPU type id ("" for the cheapest offered); one RunPod no
    longer offers is resolved when the list arrives (gpu_index)."""

    gpu: str = ""
    mode: str = MODES[0]
    idle_minutes: int = 15
    lifetime_hours: int = 12
    budget_usd: float = 0.0

    GROUP = "CloudGpu"
    KEYS = {"gpu": "GpuType", "mode": "Mode", "idle_minutes": "IdleTimeoutMinutes",
            "lifetime_hours": "MaxLifetimeHours", "budget_usd": "BudgetUsd"}
    READERS = {"gpu": lambda v: v.strip() if isinstance(v, str) and v.strip() else None,
               "mode": lambda v: as_one_of(v, MODES),
               "idle_minutes": lambda v: as_number(v, *IDLE_MINUTES, whole=True),
               "lifetime_hours": lambda v: as_number(v, *LIFETIME_HOURS, whole=True),
               "budget_usd": lambda v: as_number(v, *BUDGET_USD)}

    def gpu_index(self, gpus: list) -> int:
        """Where the remembered GPU type is in RunPod's list (GpuType, cheapest first); 0, the cheapest, where it is
        not offered any more."""
        return next((index for index, gpu in enumerate(gpus) if gpu.id == self.gpu), 0)


def remembered_parameter_node(node, wrap, settings):
    """wrap(node) (the module's parameter node wrapper), where the Export choices the node does not hold yet are the
    remembered ones, not the wrapper's defaults: a new node, one Close Scene emptied (Slicer keeps the module's
    singleton node and clears its parameters), a scene saved before a choice existed. A scene's own choices stay."""
    unset = [name for name in ExportChoices.parameter_names() if not node.HasParameter(name)]
    parameter_node = wrap(node)  # writes the wrapper's defaults for what is unset
    if unset:
        ExportChoices.load(settings).apply_to(parameter_node, unset)
    return parameter_node


class ExportMemory:
    """Remembers each Export choice the user changes on the bound parameter node. The choices a node comes with (a
    loaded scene's) are not written until one is changed: opening a scene does not change what new scenes get."""

    def __init__(self, settings_factory):
        """settings_factory() -> the settings to write (in Slicer qt.QSettings, made each time, as Slicer does)."""
        self.settings_factory = settings_factory
        self._node = None
        self._seen = None

    def bind(self, parameter_node):
        """parameter_node: the one the panel shows now, or None (Close Scene)."""
        self._node = parameter_node
        self._seen = ExportChoices.of(parameter_node) if parameter_node is not None else None

    def update(self) -> list:
        """Call on every change of the bound node: writes the choices changed since; returns their names."""
        if self._node is None:
            return []
        now = ExportChoices.of(self._node)
        if now == self._seen:
            return []
        written = now.save(self.settings_factory(), self._seen)
        self._seen = now
        return written
