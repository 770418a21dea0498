"""Qt-free state of the module's Presets section."""

from dataclasses import dataclass

from ..core import arrays
from ..core.provenance import mask_fingerprint
from ..segment.preset_child import PresetProcess
from ..segment.masks import PRESETS
from ..segment.presets import add_preset_segment, spacing_kji
from .tasks import BackgroundTask


# Each preset's name → what its combo box item says, and its tooltip
PRESET_CHOICES = {name: (f"{preset.segment_name} (CT)", preset.description) for name, preset in PRESETS.items()}


@dataclass
class PresetsPanel:
    preset: str = "bone"
    status: str = "Choose a CT volume and a preset."
    task: BackgroundTask = None
    process: PresetProcess = None
    volume: object = None  # the volume it runs on and the segmentation it adds to (None: a new one), from start()
    target: object = None

    def can_apply(self, volume_node) -> bool:
        return volume_node is not None and self.task is None

    def start(self, volume_node, segmentation_node=None):
        """Main thread: the preset runs in a child process (its own GIL); the worker thread writes the volume
        for it, waits and reads the cropped mask back. The view keeps the voxels alive if the user closes the
        volume meanwhile. Its segment goes into segmentation_node, the one chosen now (None: a new one)."""
        self.volume, self.target = volume_node, segmentation_node
        name = volume_node.GetName()
        running = f"Running the {self.preset} preset on '{name}'"

        def progress(done, total, step):  # worker thread: one new string, which the GUI shows at its next update
            if done < total:
                self.status = f"{running}: {step} ({done + 1}/{total})..."

        self.process = PresetProcess()

        def run(hu, spacing, ijk_to_ras):  # worker thread: the mask and its checksum, which reads every voxel
            mask, start = self.process.run(self.preset, hu, spacing, name, progress, ijk_to_ras)
            return mask, start, mask_fingerprint(mask, start)

        self.task = BackgroundTask(run, arrays.volume_array(volume_node), spacing_kji(volume_node),
                                   arrays.ijk_to_ras(volume_node))
        self.status = f"{running}..."

    def cancel(self):
        """Any thread (the module's cleanup): kills a running preset's process; its task ends with a sentence."""
        if self.task:
            self.process.cancel()

    def finish(self, ctx):
        """Main thread, once task.done(): adds the segment; returns the segmentation node or None. A volume that
        left the scene meanwhile (Close Scene, deleted) takes its result along: after Close Scene the next patient's
        nodes get the same IDs, and a result written there would be the wrong patient's."""
        task, volume, target = self.task, self.volume, self.target
        self.task = self.volume = self.target = None
        result, problem = task.outcome()
        if problem:
            self.status = problem
            return None
        if not ctx.scene.IsNodePresent(volume):
            self.status = f"'{volume.GetName()}' left the scene while its {self.preset} preset ran: nothing was added."
            return None
        mask, start, fingerprint = result
        target = target if target is not None and ctx.scene.IsNodePresent(target) else None
        node = add_preset_segment(ctx, volume, self.preset, mask, target, start, fingerprint)
        self.status = f"Added segment '{PRESETS[self.preset].segment_name}' to '{node.GetName()}'."
        return node
