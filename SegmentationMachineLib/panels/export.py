"""Qt-free state of the module's Export & Print section."""

from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import UserError
from ..mesh.export import DEFAULT_EXPORT_FOLDER, ExportOptions, ExportResult, export_segmentation
from ..mesh.printing import send_to_orcaslicer
from .tasks import BackgroundTask


@dataclass
class ExportPanel:
    formats: set = field(default_factory=lambda: {"stl", "obj", "3mf"})
    smoothing: float = 0.5
    output_folder: Path = DEFAULT_EXPORT_FOLDER
    status: str = "Choose a segmentation to export."
    last_result: ExportResult = None
    task: BackgroundTask = None

    def can_export(self, segmentation_node) -> bool:
        return segmentation_node is not None and bool(self.formats) and self.task is None

    def can_send(self) -> bool:
        return self.last_result is not None and self.task is None

    def options(self) -> ExportOptions:
        from ..mesh.surfaces import SurfaceOptions

        ordered = tuple(f for f in ("stl", "obj", "3mf") if f in self.formats)
        return ExportOptions(formats=ordered, surface=SurfaceOptions(smoothing=self.smoothing))

    def start(self, segmentation_node):
        # Export only reads the segmentation; the module keeps the node alive until finish().
        self.task = BackgroundTask(export_segmentation, segmentation_node, self.output_folder, self.options())
        self.status = f"Exporting '{segmentation_node.GetName()}'..."

    def finish(self):
        task, self.task = self.task, None
        result, problem = task.outcome()
        if problem:
            self.status = problem
            return None
        self.last_result = result
        bad = result.not_watertight
        self.status = (f"Exported to {result.folder}." if not bad else
                       f"Exported to {result.folder}, but {', '.join(bad)} "
                       "is not watertight: use flying edges with smoothing, or repair it in the slicer.")
        return result

    def report_text(self) -> str:
        return "\n".join(self.last_result.summary_lines()) if self.last_result else ""

    def send_to_printer(self, configured_path: str = None):
        try:
            send_to_orcaslicer(self.last_result.folder, configured_path or None)
            self.status = "Opened in OrcaSlicer."
        except UserError as error:
            self.status = str(error)
