"""Qt-free state of the module's Presets section."""

from dataclasses import dataclass

import numpy as np

from ..core import arrays
from ..segment.presets import PRESETS, add_preset_segment, preset_mask, spacing_kji
from .tasks import BackgroundTask


def cropped_preset_mask(preset: str, hu: np.ndarray, spacing, volume_name: str) -> tuple:
    """Worker thread: the preset's mask cut to its bounding box, and the box's first K, J, I index.

    hu is a view of the volume: the copy is made here, where it does not hold up the GUI. The crop keeps
    the main thread's segment write (and the segment's memory) proportional to the structure."""
    mask = preset_mask(preset, hu.copy(), spacing, volume_name)
    box = arrays.bounding_box(mask)
    return np.ascontiguousarray(mask[box]), tuple(part.start for part in box)


@dataclass
class PresetsPanel:
    preset: str = "bone"
    status: str = "Choose a CT volume and a preset."
    task: BackgroundTask = None

    @property
    def presets(self) -> dict:
        return {name: preset.description for name, preset in PRESETS.items()}

    def can_apply(self, volume_node) -> bool:
        return volume_node is not None and self.task is None

    def start(self, volume_node):
        # The view keeps the voxels alive if the user closes the volume; the worker copies them at once.
        self.task = BackgroundTask(cropped_preset_mask, self.preset, arrays.volume_array(volume_node),
                                   spacing_kji(volume_node), volume_node.GetName())
        self.status = f"Running the {self.preset} preset on '{volume_node.GetName()}'..."

    def finish(self, ctx, volume_node, segmentation_node=None):
        """Main thread, once task.done(): adds the segment; returns the segmentation node or None."""
        task, self.task = self.task, None
        result, problem = task.outcome()
        if problem:
            self.status = problem
            return None
        mask, start = result
        node = add_preset_segment(ctx, volume_node, self.preset, mask, segmentation_node, start)
        self.status = f"Added segment '{PRESETS[self.preset].segment_name}' to '{node.GetName()}'."
        return node
