"""Qt-free state of the module's Export and print section."""

import threading
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.misc import is_dicom

from ..core.cancel import CancelRequest
from ..core.errors import ExportError, UserError
from ..core.provenance import preset_of
from ..dicom.volumes import file_sha256, series_record
from ..mesh.dicomseg import database_files, reference_volume, storage_names
from ..mesh.export import DEFAULT_EXPORT_FOLDER, FORMATS, ExportOptions, ExportResult, prepare_export, write_export
from ..mesh.printing import OrcaSlicerNotFound, send_to_orcaslicer
from ..segment.masks import PRESETS, preset_parameters
from .tasks import BackgroundTask

# The coordinates combo box's items: what each says, and its tooltip
COORDINATE_CHOICES = {"LPS": ("LPS (DICOM's)", "What printers and most tools expect: DICOM's patient coordinates"),
                      "RAS": ("RAS (Slicer's)", "Slicer's own patient coordinates: x and y reversed from LPS")}
SEG_SKIPPED = "DICOM SEG skipped: highdicom was not installed."


def _volume_source(segmentation_node, dicom_database) -> list:
    """Main thread, reading no file (that is the worker's): the files the segmentation's volume was read from, as the
    scene knows them (its storage node, else Slicer's DICOM database); [] for a volume made in Slicer."""
    volume = reference_volume(segmentation_node)
    if volume is None:
        return []
    files = storage_names(volume) or database_files(volume, dicom_database)
    return files if all(files) else []  # a series partly gone from the database cannot be vouched for


def _input_record(files: list) -> dict:
    """Any thread: report.json's input, as the CLI's, for the files a volume was read from (each read and hashed);
    None where they are gone or changed since (a provenance that cannot be vouched for is not made up)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        if len(files) == 1 and not is_dicom(files[0]):
            return {"path": files[0], "sha256": file_sha256(files[0])}
        uid = pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID
        folder = Path(files[0]).parent
        return series_record(str(folder), files, str(uid), folder)
    except (OSError, AttributeError, InvalidDicomError):
        return None


def shown_segment_ids(segmentation_node) -> list:
    """The segments the views show (the segmentation shown, and each segment's own visibility)."""
    display = segmentation_node.GetDisplayNode()
    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    shown = [i for i in ids if display is None or display.GetVisibility() and display.GetSegmentVisibility(i)]
    if not shown:
        raise ExportError(f"No segment of '{segmentation_node.GetName()}' is shown: show the ones to export, or "
                          "untick Only shown segments.")
    return shown


@dataclass
class ExportPanel:
    formats: set = field(default_factory=lambda: {"stl", "obj", "3mf"})
    smoothing: float = 0.5
    coordinates: str = "LPS"  # or RAS
    merged_stl: bool = False  # also one STL of every segment
    shown_only: bool = False  # only the segments the views show (as Slicer's own exporter offers)
    output_folder: Path = DEFAULT_EXPORT_FOLDER
    status: str = "Choose a segmentation to export."
    last_result: ExportResult = None
    task: BackgroundTask = None
    orcaslicer_missing: bool = False  # the last send found no OrcaSlicer: the module asks where it is
    _exported_from: str = None  # the ID of the segmentation node the last export (or the one running) is of
    _skipped: str = ""  # the sentence of a format chosen but left out of the export running
    _cancel: CancelRequest = None  # the running export's (Cancel)
    _exporting: str = ""  # the name of the segmentation being exported
    _left: str = ""  # why the export running is no longer the chosen segmentation's (another chosen, scene closed)
    _said: threading.Lock = field(default_factory=threading.Lock, repr=False)  # a progress line never hides Cancel's

    def can_export(self, segmentation_node) -> bool:
        return segmentation_node is not None and bool(self.formats) and self.task is None

    def can_send(self) -> bool:
        return self.last_result is not None and self.task is None

    def options(self, formats: set = None) -> ExportOptions:
        """formats: those of this export (default: the chosen ones)."""
        from ..mesh.surfaces import SurfaceOptions

        ordered = tuple(f for f in FORMATS if f in (self.formats if formats is None else formats))
        return ExportOptions(formats=ordered, coordinates=self.coordinates, merged_stl=self.merged_stl,
                             surface=SurfaceOptions(smoothing=self.smoothing))

    def start(self, segmentation_node, ctx=None, seg_installed: bool = True):
        """Main thread: copies what the export needs out of the scene (ctx: the module's, so that converting
        surfaces to labelmaps pauses the views); meshing and writing go to a worker. seg_installed: False where the
        user declined DICOM SEG's packages: the other formats chosen are exported, and the status says SEG was not."""
        formats = set(self.formats) if seg_installed else set(self.formats) - {"seg"}
        self._skipped = SEG_SKIPPED if formats != set(self.formats) else ""
        if not formats:
            self.status = f"{SEG_SKIPPED} Choose another format to export, or install it with the next Export."
            return
        options = self.options(formats)
        try:
            ids = shown_segment_ids(segmentation_node) if self.shown_only else None
            prepared = prepare_export(segmentation_node, options, ids, ctx=ctx)
        except UserError as error:
            self.status = str(error)
            return
        source = _volume_source(segmentation_node, ctx.dicom_database if ctx else None)
        presets = dict.fromkeys(name for name in (preset_of(segmentation_node, job.segment_id)
                                                  for job in prepared.segments.jobs) if name in PRESETS)
        cancel = self._cancel = CancelRequest()

        def work():  # hashing the volume's files is the worker's too
            provenance = {"input": _input_record(source) if source else None,
                          "presets": [{"name": name, "parameters": preset_parameters(name)} for name in presets]}
            return write_export(prepared, self.output_folder, options, self._progress, provenance, cancel)

        self._exporting = prepared.name
        self.task = BackgroundTask(work)
        self._exported_from = segmentation_node.GetID()
        self.status = " ".join(filter(None, [f"Exporting '{prepared.name}'...", self._skipped]))

    def _progress(self, done: int, total: int, name: str):
        """Worker thread, before the first segment and after each: one new string, which the GUI shows at its next
        update (a cancel's own line stays)."""
        step = f"segment {done + 1} of {total}" if done < total else "writing the files"
        with self._said:
            if not self._cancel.requested:
                self.status = " ".join(filter(None, [f"Exporting '{self._exporting}': {step}...", self._skipped]))

    def cancel(self):
        """Main thread (the Export button, which reads Cancel meanwhile): the export stops at its next segment or
        format and removes what it wrote; its task then ends with EXPORT_CANCELLED, which finish() shows."""
        with self._said:
            if self.task and not self._cancel.requested:
                self._cancel.cancel()
                self.status = f"Cancelling the export of '{self._exporting}' (after the segment under way)..."

    def finish(self):
        task, self.task = self.task, None
        result, problem = task.outcome()
        if problem:
            self.status = problem
            return None
        if self._exported_from is None:  # the scene was closed or another segmentation chosen meanwhile
            self.status = f"Exported to {result.folder} ({self._left})."
            return result
        self.last_result = result
        bad = result.not_watertight
        late = " (it was finished when Cancel was pressed)" if self._cancel and self._cancel.requested else ""
        self.status = (f"Exported to {result.folder}{late}." if not bad else
                       f"Exported to {result.folder}{late}, but {', '.join(bad)} "
                       "is not watertight: use flying edges with smoothing, or repair it in the slicer.")
        self.status = " ".join(filter(None, [self.status, *result.warnings, self._skipped]))
        return result

    def segmentation_chosen(self, segmentation_node):
        """Main thread, on every change of the chosen segmentation: once another one (or none) is chosen, the last
        export's report, Send to OrcaSlicer and Open folder are no longer about it."""
        node_id = segmentation_node.GetID() if segmentation_node is not None else None
        if self._exported_from is not None and node_id != self._exported_from:
            self._forget("Press Export to write the chosen segmentation." if node_id else "Choose a segmentation to "
                         "export.", "the segmentation chosen before")

    def scene_closed(self):
        """Close Scene: the last export was the closed scene's (and the next scene's nodes get the same IDs). One
        running is finished, from the copies start() made: closing a scene is not Cancel."""
        self._forget("Choose a segmentation to export.", "its scene was closed meanwhile")

    def _forget(self, status: str, left: str):
        """left: why an export still running is no longer the chosen segmentation's (said once it is done)."""
        self.last_result, self._exported_from, self.orcaslicer_missing, self._left = None, None, False, left
        self.status = status if self.task is None else self.status

    def report_text(self) -> str:
        return "\n".join(self.last_result.summary_lines() + self.last_result.warnings) if self.last_result else ""

    def send_to_printer(self, configured_path: str = None, env: dict = None):
        """env: the environment OrcaSlicer starts with (in Slicer, Slicer's startup environment)."""
        self.orcaslicer_missing = False
        try:
            send_to_orcaslicer(self.last_result.folder, configured_path or None, env=env)
            self.status = "Opened in OrcaSlicer."
        except OrcaSlicerNotFound as error:
            self.status, self.orcaslicer_missing = str(error), True
        except UserError as error:
            self.status = str(error)
