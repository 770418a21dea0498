"""The scene and module logics every library function works on.

In Slicer the module builds a SceneContext from Slicer's own scene and logics; the CLI and the
tests build a headless one from the slicer-core wheel (real MRML, no Qt).
"""

from contextlib import contextmanager
from dataclasses import dataclass

import slicer
import vtk

BINARY_LABELMAP = "Binary labelmap"
# Scalar volume subclasses that are no scan to segment (the source volume selector hides them, as its
# hideChildNodeTypes in the module's .ui): labelmaps, and volumes of several components per voxel.
NOT_SOURCE_VOLUMES = ("vtkMRMLLabelMapVolumeNode", "vtkMRMLVectorVolumeNode", "vtkMRMLTensorVolumeNode",
                      "vtkMRMLDiffusionWeightedVolumeNode")


@dataclass
class SceneContext:
    scene: "slicer.vtkMRMLScene"
    app_logic: "slicer.vtkMRMLApplicationLogic"
    volumes_logic: "slicer.vtkSlicerVolumesLogic"
    segmentations_logic: "slicer.vtkSlicerSegmentationsModuleLogic"
    subject_hierarchy_logic: "slicer.vtkSlicerSubjectHierarchyModuleLogic"
    colors_logic: "slicer.vtkSlicerColorLogic"
    dicom_database: object = None  # Slicer's ctkDICOMDatabase: the files of the volumes its DICOM module loads
    owns_stderr: bool = False  # a command's scene, not Slicer's: it may capture descriptor 2 around a read


@contextmanager
def editing(ctx: SceneContext, node):
    """Changes to node as one: views paused and node events held until the end, as Slicer's Segment Editor
    logic wraps its edits (RenderBlocker, MRMLNodeModifyBlocker), so no view draws a half-made state."""
    ctx.app_logic.PauseRender()
    modifying = node.StartModify()
    try:
        yield node
    finally:
        node.EndModify(modifying)
        ctx.app_logic.ResumeRender()


def first_source_volume(scene):
    """The first scalar volume of the scene that is a scan to segment (None where there is none): a labelmap loaded
    first was chosen as the source volume when the module opened."""
    kind = "vtkMRMLScalarVolumeNode"
    volumes = (scene.GetNthNodeByClass(i, kind) for i in range(scene.GetNumberOfNodesByClass(kind)))
    return next((volume for volume in volumes if not any(volume.IsA(other) for other in NOT_SOURCE_VOLUMES)), None)


def new_segmentation(volume_node, name: str):
    """A segmentation made for volume_node (on_the_grid_of it)."""
    node = volume_node.GetScene().AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    on_the_grid_of(volume_node, node)
    return node


def on_the_grid_of(volume_node, segmentation_node):
    """A new segmentation on volume_node's grid and under its transform, so its voxels are the volume's (no
    resampling when prompts or presets write into it), with the display nodes Slicer gives a new one."""
    segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())


def forward_render_pauses(editor_logic: "slicer.vtkSlicerSegmentEditorLogic", app_logic):
    """A Segment Editor logic pauses the views around each edit through its own events, which Slicer 5.10
    connects to the application only for its Segment Editor widget's logic: a module's logic forwards them
    to the application logic (Slicer's application pauses rendering on its events)."""
    editor_logic.AddObserver(editor_logic.PauseRenderEvent, lambda *_: app_logic.PauseRender())
    editor_logic.AddObserver(editor_logic.ResumeRenderEvent, lambda *_: app_logic.ResumeRender())


_MODULE_LOGICS = (
    # (name the logics look each other up by, class, SceneContext field)
    ("Colors", "vtkSlicerColorLogic", "colors_logic"),
    ("SubjectHierarchy", "vtkSlicerSubjectHierarchyModuleLogic", "subject_hierarchy_logic"),
    ("Volumes", "vtkSlicerVolumesLogic", "volumes_logic"),
    ("Segmentations", "vtkSlicerSegmentationsModuleLogic", "segmentations_logic"),
)


def _quiet_itk():
    """ITK writes its own warnings to stderr (e.g. "Non uniform sampling or missing slices detected"); the
    library says what matters in its own sentences. slicer-core renames ITK's namespace to slicer_itk."""
    import ctypes
    import glob
    import os

    try:
        import slicer_core
    except ImportError:  # inside Slicer: its own ITK logs to Slicer's log
        return
    folder = os.path.join(os.path.dirname(slicer_core.__file__), "third_party.libs")
    for path in glob.glob(os.path.join(folder, "libITKCommon*")):
        library = ctypes.CDLL(path)  # already loaded by Slicer's reader: the same copy
        for namespace in ("10slicer_itk", "3itk"):  # itk::Object::SetGlobalWarningDisplay(bool), mangled
            symbol = f"_ZN{namespace}6Object23SetGlobalWarningDisplayEb"
            if hasattr(library, symbol):
                getattr(library, symbol)(ctypes.c_bool(False))


def create_headless_scene() -> SceneContext:
    """A new scene with application logic and the module logics, wired as Slicer wires them."""
    # Without Slicer's home directory the Colors logic logs harmless errors on stderr;
    # library code checks return values instead of relying on VTK's log.
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
    vtk.vtkObject.GlobalWarningDisplayOff()
    _quiet_itk()
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    logics = {}
    for name, class_name, field in _MODULE_LOGICS:
        logic = getattr(slicer, class_name)()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic(name, logic)
        logics[field] = logic
    app_logic.SetColorLogic(logics["colors_logic"])
    return SceneContext(scene=scene, app_logic=app_logic, owns_stderr=True, **logics)
