"""Qt-free state of the module's Presets section."""

from dataclasses import dataclass

from ..core import arrays
from ..segment.presets import PRESETS, add_preset_segment, preset_mask, spacing_kji
from .tasks import BackgroundTask


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
        # The worker gets a copy: the user may edit or close the volume meanwhile.
        hu = arrays.volume_array(volume_node).copy()
        self.task = BackgroundTask(preset_mask, self.preset, hu, spacing_kji(volume_node), volume_node.GetName())
        self.status = f"Running the {self.preset} preset on '{volume_node.GetName()}'..."

    def finish(self, ctx, volume_node, segmentation_node=None):
        """Main thread, once task.done(): adds the segment; returns the segmentation node or None."""
        task, self.task = self.task, None
        mask, problem = task.outcome()
        if problem:
            self.status = problem
            return None
        node = add_preset_segment(ctx, volume_node, self.preset, mask, segmentation_node)
        self.status = f"Added segment '{PRESETS[self.preset].segment_name}' to '{node.GetName()}'."
        return node
