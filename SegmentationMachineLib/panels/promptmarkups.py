"""Prompts read from Slicer's markups as Slicer really draws them (Libs/MRML/Core at tag v5.10.0)."""

import numpy as np
from vtkmodules.util import numpy_support


class BoxPlacement:
    """Two clicks in a slice view give a box flat on that slice.

    vtkMRMLMarkupsROINode::UpdateBoxROIFromControlPoints replaces the two corners with one centre point
    once the second is defined, and pads the box across the slice to its shortest side: so the first
    corner is kept here, and the second is 2 x centre - first (on the slice, as the click was).
    The ROI's state is read, not its events counted: how many PointPositionDefinedEvents one click
    raises depends on whether the node's modified events are blocked at that moment (they are then
    merged, vtkMRMLNode::InvokeCustomModifiedEvent), so call update() on its ModifiedEvent too; and the
    ROI is sized one event before it is re-centred. While the mouse moves, Slicer's placing widget keeps a
    preview control point at the cursor and sizes the ROI to it (vtkSlicerMarkupsWidget::UpdatePreviewPoint):
    such a state is not a click."""

    def __init__(self):
        self.first = None

    def update(self, roi_node):
        """None until the box is complete, then (ras_min, ras_max) once."""
        if any(roi_node.GetNthControlPointPositionStatus(i) == roi_node.PositionPreview
               for i in range(roi_node.GetNumberOfControlPoints())):
            return None
        size = roi_node.GetSize()
        if self.first is None:
            if roi_node.GetNumberOfDefinedControlPoints() == 1 and max(size) == 0:  # the first corner alone
                corner = [0.0, 0.0, 0.0]
                roi_node.GetNthControlPointPositionWorld(0, corner)
                self.first = np.array(corner)
            return None
        centre = [0.0, 0.0, 0.0]
        roi_node.GetCenterWorld(centre)
        if max(size) == 0 or np.allclose(centre, self.first):  # not yet, or sized but not yet re-centred
            return None
        first, second = self.first, 2 * np.array(centre) - self.first
        self.first = None
        return tuple(map(float, np.minimum(first, second))), tuple(map(float, np.maximum(first, second)))

    def reset(self):
        self.first = None


def curve_points_ras(curve_node) -> np.ndarray:
    """The curve as Slicer draws it (a spline through the control points, closed for a closed curve),
    in world RAS: not the polygon of the control points."""
    points = curve_node.GetCurvePointsWorld()
    if points is None or points.GetNumberOfPoints() == 0:
        return np.zeros((0, 3))
    return numpy_support.vtk_to_numpy(points.GetData()).astype(float).copy()


class PlaceMode:
    """The interaction and selection nodes are Slicer's global singletons: what a prompt tool sets there (place
    mode, "place multiple", the active place node) would stay set for every other module, and a point placed later
    from Slicer's own toolbar would land in the tool's node. take() keeps what was set before the first tool;
    give_back() restores all of it."""

    def __init__(self):
        self.saved = None  # (persistence, interaction mode, active place node class, active place node ID)

    def take(self, interaction, selection, class_name: str, node_id):
        """Place mode, placing many, into the node node_id (of class_name). node_id may be a callable that makes the
        node and returns its ID: it is called once Slicer's state is kept, as Slicer's Markups logic makes every new
        markups node the active place node (vtkSlicerMarkupsLogic::OnMRMLSceneNodeAdded)."""
        if self.saved is None:
            self.saved = (interaction.GetPlaceModePersistence(), interaction.GetCurrentInteractionMode(),
                          selection.GetActivePlaceNodeClassName(), selection.GetActivePlaceNodeID())
        selection.SetReferenceActivePlaceNodeClassName(class_name)
        selection.SetActivePlaceNodeID(node_id() if callable(node_id) else node_id)
        interaction.SetPlaceModePersistence(1)
        interaction.SetCurrentInteractionMode(interaction.Place)

    def give_back(self, interaction, selection, keep_mode: bool = False):
        """Everything as it was before take(); keep_mode: the user left place mode and chose the mode now in force
        (a right-click, the toolbar), so that one stays."""
        if self.saved is None:
            return
        (persistence, mode, class_name, node_id), self.saved = self.saved, None
        selection.SetReferenceActivePlaceNodeClassName(class_name)
        scene = selection.GetScene()
        selection.SetActivePlaceNodeID(node_id if node_id and scene and scene.GetNodeByID(node_id) else None)
        interaction.SetPlaceModePersistence(persistence)
        if not keep_mode:
            interaction.SetCurrentInteractionMode(mode)
