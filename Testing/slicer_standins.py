"""What a scripted module meets inside 3D Slicer 5.10, reproduced for tests (Slicer cannot run here).

Every fact below is read from Slicer's source at tag v5.10.0 (../shared/notes/slicer-5.10-runtime.md).
"""

import builtins
import contextlib
import ctypes
import sys
import threading
import time
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


def python_slicer(folder, first_paths=(), starts=None):
    """Writes folder/PythonSlicer as Slicer 5.10 ships it: a CTK AppLauncher (0.1.33: Base/ctkAppLauncher.cpp;
    Slicer's SuperBuild/python_configure_python_launcher.cmake) that puts Slicer's paths (first_paths) before the
    PYTHONPATH it inherits and runs the real Python as its own child, passing it its stdin, stdout and stderr. It
    exits with that child's code; after a crash or a kill, it says so on stderr and exits 1. starts: a file each
    start is listed in."""
    launcher = folder / "PythonSlicer"
    launcher.write_text(f"""#!{sys.executable}
import os, subprocess, sys
if {str(starts or '')!r}:
    with open({str(starts or '')!r}, "a") as starts:
        starts.write(" ".join(sys.argv[1:]) + "\\n")
paths = os.pathsep.join(filter(None, [*{[str(p) for p in first_paths]!r}, os.environ.get("PYTHONPATH", "")]))
code = subprocess.call([{sys.executable!r}, *sys.argv[1:]], env={{**os.environ, "PYTHONPATH": paths}})
if code < 0:
    sys.stderr.write("[python-real] exit abnormally - Report the problem.\\n")
sys.exit(1 if code < 0 else code)
""")
    launcher.chmod(0o755)
    return launcher


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


# libc through PyDLL: its calls keep the GIL, as Qt's C++ event loop does in Slicer's main thread.
_LIBC_KEEPING_GIL = ctypes.PyDLL(None)
_LIBC_KEEPING_GIL.usleep.argtypes = [ctypes.c_uint]


class IdleMainThread:
    """Slicer's main thread while the user does nothing, run on the test's main thread.

    Neither Slicer 5.10 nor its CTK enables PythonQt's thread support: the main thread keeps the GIL
    while Qt waits in C++, and runs Python only for its timers. run() does the same with the timers
    given to every(): it holds the GIL in C until the next one is due, then calls it. hold_gil=False
    waits with the GIL released instead, the same flow as if Qt let go of it (the baseline).
    """

    def __init__(self, hold_gil: bool = True):
        self.hold_gil = hold_gil
        self.timers = []  # [due, interval s, callback], like started QTimers
        self.ticks = []  # (seconds, of them the main thread's CPU seconds, callback name) per call

    def every(self, interval_ms: float, callback) -> "IdleMainThread":
        self.timers.append([time.monotonic() + interval_ms / 1000, interval_ms / 1000, callback])
        return self

    def click(self, callback, *args):
        """Runs callback(*args) now, as Qt runs a button's slot on the main thread, and records it as a tick."""
        started, cpu = time.monotonic(), time.thread_time()
        result = callback(*args)
        self.ticks.append((time.monotonic() - started, time.thread_time() - cpu, getattr(callback, "__qualname__", "")))
        return result

    def run(self, until, seconds: float = 120.0) -> bool:
        """Fires the timers until until() is true (True) or seconds have passed (False)."""
        deadline = time.monotonic() + seconds
        while not until():
            timer = min(self.timers, key=lambda t: t[0])
            now = time.monotonic()
            if now >= deadline:
                return False
            if timer[0] > deadline:
                self._wait(deadline - now)
                return until()
            if timer[0] > now:
                self._wait(timer[0] - now)  # then straight into the callback, as Qt calls it
            started, cpu = time.monotonic(), time.thread_time()
            timer[2]()
            self.ticks.append((time.monotonic() - started, time.thread_time() - cpu, getattr(timer[2], "__qualname__", "")))
            timer[0] = started + timer[1]  # a QTimer fires at once again if its callback overran
        return True

    def _wait(self, seconds: float):
        if self.hold_gil:
            _LIBC_KEEPING_GIL.usleep(int(seconds * 1e6))
        else:
            time.sleep(seconds)


class MainThreadOnly:
    """Records calls into MRML and segmentation objects made from any thread but the main one.

    In Slicer those objects forward their events to Qt widgets and renderers, which must stay on the
    main thread. Threads started inside the with-block are watched (threading.setprofile). A VTK static
    method called on its class (a logic's ImportLabelmapToSegmentationNode, say) is no call a profiler sees,
    so with a scene every event of its nodes (those added meanwhile too) is also recorded where it fires
    off the main thread: what reaches Slicer's widgets, whichever way the write came."""

    def __init__(self, scene=None):
        import slicer

        # Logics too (the application's, the Segmentations and Segment Editor logics): they write into the scene
        # for their caller, and so raise the nodes' events on the caller's thread.
        self.watched = (slicer.vtkMRMLNode, slicer.vtkMRMLScene, slicer.vtkSegmentation, slicer.vtkOrientedImageData,
                        slicer.vtkMRMLAbstractLogic)
        self.scene, self.observed = scene, []
        self.calls = []  # "thread: Class.Method (file:line)", or "thread: event Name on Class"

    def _profile(self, frame, event, argument):
        if event == "c_call" and isinstance(getattr(argument, "__self__", None), self.watched):
            thread = threading.current_thread()
            if thread is not threading.main_thread():
                self.calls.append(f"{thread.name}: {type(argument.__self__).__name__}.{argument.__name__} "
                                  f"({frame.f_code.co_filename}:{frame.f_lineno})")

    def _event(self, caller, event):
        thread = threading.current_thread()
        if thread is not threading.main_thread():
            self.calls.append(f"{thread.name}: event {event} on {type(caller).__name__}")  # (a VTK call would count)

    def _observe(self, node):
        self.observed.append((node, node.AddObserver("AnyEvent", self._event)))

    def __enter__(self) -> "MainThreadOnly":
        if self.scene is not None:
            import vtk

            def added(scene, event, node):
                self._observe(node)

            added.CallDataType = vtk.VTK_OBJECT  # the added node comes as the event's call data
            for index in range(self.scene.GetNumberOfNodes()):
                self._observe(self.scene.GetNthNode(index))
            self._observe(self.scene)
            self.observed.append((self.scene, self.scene.AddObserver(self.scene.NodeAddedEvent, added)))
        threading.setprofile(self._profile)
        return self

    def __exit__(self, *exc):
        threading.setprofile(None)
        for node, tag in self.observed:
            node.RemoveObserver(tag)
        self.observed = []


# -- The module's timers, as its widget wires them (SegmentationMachine.py, SegmentationMachineWidgets/) --
POLL_MS, INBOX_MS, PROMPTS_MS, CLOUD_MS, PACS_MS = 100, 250, 50, 200, 100


def drive(main: IdleMainThread, until, *timers, pump: bool = True, seconds: float = 300.0) -> bool:
    """Runs (interval ms, callback) timers, and the module's GIL pump unless pump=False, until until()."""
    from SegmentationMachineLib.panels.tasks import PUMP_INTERVAL_MS, share_gil

    main.timers.clear()  # the timers of the step before stopped
    if pump:
        main.every(PUMP_INTERVAL_MS, share_gil)
    for interval_ms, callback in timers:
        main.every(interval_ms, callback)
    return main.run(until, seconds)


def _task_flow(main: IdleMainThread, panel, start: tuple, finish, interval_ms: float = POLL_MS,
               seconds: float = 300.0):
    """start, (a panel's method, its arguments), clicked; then the section's timer calls finish() once the panel's
    task is done; returns what it did."""
    results = []
    main.click(*start)

    def poll():
        if panel.task and panel.task.done():
            results.append(finish())

    assert drive(main, lambda: results, (interval_ms, poll), seconds=seconds), panel.status
    return results[0]


def preset_flow(main: IdleMainThread, ctx, volume_node, preset: str = "bone", seconds: float = 300.0):
    """Apply, then the poll timer adds the segment once the worker is done; returns the segmentation node."""
    from SegmentationMachineLib.panels.presets import PresetsPanel

    panel = PresetsPanel(preset=preset)
    added = _task_flow(main, panel, (panel.start, volume_node), lambda: panel.finish(ctx),
                       seconds=seconds)
    assert added is not None, panel.status
    return added


def export_flow(main: IdleMainThread, segmentation_node, folder, formats=("stl", "obj", "3mf")):
    """Export, then the poll timer finishes it; returns the ExportResult."""
    from SegmentationMachineLib.panels.export import ExportPanel

    panel = ExportPanel(formats=set(formats), output_folder=folder)
    result = _task_flow(main, panel, (panel.start, segmentation_node), panel.finish)
    assert result is not None, panel.status
    return result


def pacs_flow(main: IdleMainThread, panel, segmentation_node, ctx=None):
    """Send to PACS, then the section's timer finishes it once the worker is done; returns what finish() does (the
    stored SEG's header, or None with the cause in panel.status)."""
    return _task_flow(main, panel, (panel.start, segmentation_node, ctx), panel.finish, PACS_MS)


def inbox_flow(main: IdleMainThread, panel, upload, load=None) -> list:
    """A started InboxPanel: upload() drops a series in; the inbox timer ticks until it is delivered.

    load(delivery), when given, runs on the main thread as the widget's loadDelivery does."""
    deliveries = []

    def tick():
        for delivery in panel.tick():
            if load:
                load(delivery)
            panel.loaded(delivery, True)
            deliveries.append(delivery)

    upload()
    assert drive(main, lambda: deliveries, (INBOX_MS, tick)), panel.status
    return deliveries


def prompts_flow(main: IdleMainThread, panel, *steps):
    """Each step (a call on the PromptsPanel) is followed by the prompt timer's ticks until it is done."""
    for step in steps:
        step()
        assert drive(main, lambda: not panel.busy, (PROMPTS_MS, panel.tick)), panel.status


def cloud_flow(main: IdleMainThread, panel, *steps):
    """Each step (a call on the CloudPanel) is followed by the cloud timer's ticks; returns the pod made ready."""
    ready = []

    def tick():
        ready.append(panel.tick())

    for step in steps:
        step()
        assert drive(main, lambda: not panel.busy, (CLOUD_MS, tick)), panel.status
    return next((pod for pod in ready if pod is not None), None)


class DicomDatabase:
    """ctkDICOMDatabase's fileForInstance over the DICOM files it indexed: the path, or "" for a SOP instance UID it
    does not know (ctkDICOMDatabase.cpp)."""

    def __init__(self, files):
        import pydicom

        self._files = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID): str(path) for path in files}

    def fileForInstance(self, uid: str) -> str:
        return self._files.get(uid, "")


def as_dicom_module_loads(ctx, volume_node, files, name: str = "DICOM"):
    """A copy of volume_node as Slicer 5.10's DICOM module loads a series by default (DICOMScalarVolumePlugin's
    "GDCM with DCMTK fallback" series reader): voxels and geometry, no storage node, and the attribute
    DICOM.instanceUIDs listing the series' SOP instance UIDs in slice order."""
    import pydicom
    import numpy as np
    import vtk

    datasets = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    normal = np.cross(*np.reshape(np.asarray(datasets[0].ImageOrientationPatient, float), (2, 3)))
    datasets.sort(key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient, float))))
    node = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.DeepCopy(volume_node.GetImageData())
    node.SetAndObserveImageData(image)
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    node.SetIJKToRASMatrix(matrix)
    node.SetAttribute("DICOM.instanceUIDs", " ".join(str(d.SOPInstanceUID) for d in datasets))
    return node
