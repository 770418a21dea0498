"""The scene and module logics every library function works on.

In Slicer the module builds a SceneContext from Slicer's own scene and logics; the CLI and the
tests build a headless one from the slicer-core wheel (real MRML, no Qt).
"""

from dataclasses import dataclass

import slicer
import vtk

BINARY_LABELMAP = "Binary labelmap"


@dataclass
class SceneContext:
    scene: "slicer.vtkMRMLScene"
    app_logic: "slicer.vtkMRMLApplicationLogic"
    volumes_logic: "slicer.vtkSlicerVolumesLogic"
    segmentations_logic: "slicer.vtkSlicerSegmentationsModuleLogic"
    subject_hierarchy_logic: "slicer.vtkSlicerSubjectHierarchyModuleLogic"
    colors_logic: "slicer.vtkSlicerColorLogic"


_MODULE_LOGICS = (
    # (name the logics look each other up by, class, SceneContext field)
    ("Colors", "vtkSlicerColorLogic", "colors_logic"),
    ("SubjectHierarchy", "vtkSlicerSubjectHierarchyModuleLogic", "subject_hierarchy_logic"),
    ("Volumes", "vtkSlicerVolumesLogic", "volumes_logic"),
    ("Segmentations", "vtkSlicerSegmentationsModuleLogic", "segmentations_logic"),
)


def create_headless_scene(quiet: bool = True) -> SceneContext:
    """A new scene with application logic and the module logics, wired as Slicer wires them."""
    if quiet:
        # Without Slicer's home directory the Colors logic logs harmless errors on stderr;
        # library code checks return values instead of relying on VTK's log.
        vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
        vtk.vtkObject.GlobalWarningDisplayOff()
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
    return SceneContext(scene=scene, app_logic=app_logic, **logics)
