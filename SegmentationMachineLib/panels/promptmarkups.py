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
    ROI is sized one event before it is re-centred."""

    def __init__(self):
        self.first = None

    def update(self, roi_node):
        """None until the box is complete, then (ras_min, ras_max) once."""
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
