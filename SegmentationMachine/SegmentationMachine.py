"""SegmentationMachine: DICOM to a model on the print bed. A thin binding: behaviour lives in SegmentationMachineLib."""

import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _, translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

try:
    import SegmentationMachineLib  # noqa: F401  (the check that it is importable)
except ImportError:  # loaded from a source checkout: only this module's folder is on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import SegmentationMachineLib  # noqa: F401  (the check that it is importable)

from SegmentationMachineLib.core.errors import UserError
from SegmentationMachineLib.core.scene import SceneContext, first_source_volume
from SegmentationMachineLib.panels.export import COORDINATE_CHOICES, ExportPanel
from SegmentationMachineLib.panels.inbox import InboxPanel
from SegmentationMachineLib.panels.presets import PRESET_CHOICES, PresetsPanel
from SegmentationMachineLib.panels.remembered import ExportMemory, remembered_parameter_node
from SegmentationMachineLib.panels.tasks import PUMP_INTERVAL_MS, share_gil
from SegmentationMachineLib.segment.masks import PRESETS

from SegmentationMachineWidgets import errorsShown, labelChoices, packages, sendToOrcaSlicer, setPlainText, timer
from SegmentationMachineWidgets.cloud import CloudSection
from SegmentationMachineWidgets.inbox import loadDelivery, showVolume
from SegmentationMachineWidgets.pacs import PacsSection
from SegmentationMachineWidgets.prompttools import PromptToolsSection

SETTINGS_OUTPUT_FOLDER = "SegmentationMachine/OutputFolder"
SETTINGS_INBOX_FOLDER = "SegmentationMachine/InboxFolder"


class SegmentationMachine(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SegmentationMachine")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.contributors = ["SegmentationMachine developers"]
        self.parent.helpText = _(
            "From CT/MR DICOM to a model on the print bed: CPU presets (bone, skin), watertight STL/OBJ/3MF "
            "(and glTF, DICOM SEG) export in LPS millimetres with a mesh report, Send to OrcaSlicer or to a PACS. "
            "A Cloud GPU's server pod gets only the scan's voxels and your prompts; a desktop pod gets whole DICOM files "
            "and keeps them until it is terminated (the README's Cloud GPU section: what leaves this computer).")
        self.parent.acknowledgementText = _(
            "AI prompt tools use nnInteractive: Isensee F., Rokuss M., Krämer L. et al. (2025), "
            "nnInteractive: Redefining 3D Promptable Segmentation, arXiv:2503.08373.")


@parameterNodeWrapper
class SegmentationMachineParameterNode:
    sourceVolume: vtkMRMLScalarVolumeNode
    preset: Annotated[str, Choice(list(PRESETS))] = "bone"
    segmentation: vtkMRMLSegmentationNode
    exportStl: bool = True
    exportObj: bool = True
    export3mf: bool = True
    exportGlb: bool = False
    exportSeg: bool = False
    smoothing: Annotated[float, WithinRange(0, 1)] = 0.5
    exportShownOnly: bool = False
    exportMergedStl: bool = False
    exportCoordinates: Annotated[str, Choice(["LPS", "RAS"])] = "LPS"


class SegmentationMachineWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.presets = PresetsPanel()
        self.export = ExportPanel()
        self.exportMemory = ExportMemory(qt.QSettings)  # the Export choices the user changes, for new scenes
        self.inbox = InboxPanel()
        self.inboxTimer = timer(250, self.onInboxTick)
        self._promptVolume = None
        self._inboxRows = None
        self.pollTimer = timer(100, self.poll)
        # Slicer's idle main thread keeps the GIL: this timer lends it to the workers of every section.
        self.gilPumpTimer = timer(PUMP_INTERVAL_MS, share_gil)
        ScriptedLoadableModuleWidget.__init__(self, parent)  # last: without a parent it calls setup() at once

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegmentationMachine.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SegmentationMachineLogic()
        self.promptTools = PromptToolsSection(self.ui, lambda: self._parameterNode, self.updateGui)
        # Above the AI prompts it serves, not below the panel's spacer at the bottom
        mainLayout = uiWidget.layout()
        self.cloud = CloudSection(lambda box: mainLayout.insertWidget(mainLayout.indexOf(self.ui.promptsCollapsibleButton),
                                                                     box), self.promptTools)
        self.pacs = PacsSection(self.ui, lambda: self._parameterNode, self.logic.context, self.inbox, self.onInboxStartStop)
        self.ui.inboxFolderSelector.currentPath = slicer.util.settingsValue(SETTINGS_INBOX_FOLDER, str(self.inbox.folder))
        self.ui.inboxStartButton.connect("clicked(bool)", self.onInboxStartStop)
        self.ui.outputFolderSelector.currentPath = slicer.util.settingsValue(
            SETTINGS_OUTPUT_FOLDER, str(self.export.output_folder))
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyPresetButton.connect("clicked(bool)", self.onApplyPreset)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.sendToPrinterButton.connect("clicked(bool)", self.onSendToPrinter)
        self.ui.openFolderButton.connect("clicked(bool)", self.onOpenFolder)
        self.gilPumpTimer.start()  # cheap while nothing runs: share_gil() then returns at once
        self.initializeParameterNode()
        if os.environ.get("SM_INBOX"):  # set by the pod image: uploads are loaded without a click
            self.ui.inboxFolderSelector.currentPath = os.environ["SM_INBOX"]
            self.onInboxStartStop()
        self.updateGui()

    def cleanup(self):
        self.presets.cancel()  # its child process would otherwise compute for minutes for nobody
        self.export.cancel()  # nobody would see it end: it stops at its next segment and removes what it wrote
        self.pollTimer.stop()
        self.gilPumpTimer.stop()
        self.inboxTimer.stop()
        self.inbox.stop()
        self.promptTools.cleanup()
        self.cloud.cleanup()
        self.pacs.cleanup()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()
        self.promptTools.enableShortcuts(True)

    def exit(self):
        self.promptTools.enableShortcuts(False)
        self.promptTools.setTool(None)  # place mode is global: leave it as it was
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)

    def onSceneStartClose(self, caller, event):
        self.presets.cancel()  # its result would be the closed scene's patient's
        self.inbox.scene_closed()
        self.export.scene_closed()  # Send to OrcaSlicer and Open folder were the closed scene's
        self.setParameterNode(None)
        self.promptTools.onSceneClose()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        parameterNode = self.logic.getParameterNode()
        if not parameterNode.sourceVolume:
            parameterNode.sourceVolume = first_source_volume(slicer.mrmlScene)  # no labelmap, as the selector
        self.setParameterNode(parameterNode)

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)
        self._parameterNode = parameterNode
        self.exportMemory.bind(parameterNode)
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)
        labelChoices(self.ui.presetComboBox, PRESET_CHOICES)  # after connectGui, which fills them with raw values
        labelChoices(self.ui.coordinatesComboBox, COORDINATE_CHOICES)
        self.updateGui()

    def updateGui(self, caller=None, event=None):
        p = self._parameterNode
        if p and p.sourceVolume is not self._promptVolume:
            self._promptVolume = p.sourceVolume
            self.promptTools.onTargetChanged()
        self.ui.applyPresetButton.text = _("Cancel") if self.presets.task else _("Apply")
        self.ui.applyPresetButton.enabled = bool(self.presets.task) or bool(p) and self.presets.can_apply(p.sourceVolume)
        if p:
            self.exportMemory.update()  # updateGui runs on every change of the parameter node
            self.export.formats = {f for f in ("stl", "obj", "3mf", "glb", "seg") if getattr(p, f"export{f.capitalize()}")}
            self.export.segmentation_chosen(p.segmentation)  # another one: the last export's report is not its
        self.ui.exportButton.text = _("Cancel") if self.export.task else _("Export")
        self.ui.exportButton.enabled = bool(self.export.task) or bool(p) and self.export.can_export(p.segmentation)
        self.ui.sendToPrinterButton.enabled = self.export.can_send()
        self.ui.openFolderButton.enabled = self.export.last_result is not None
        self.ui.inboxStartButton.text = _("Stop watching") if self.inbox.running else _("Start watching")
        self.ui.inboxFolderSelector.enabled = not self.inbox.running
        self.ui.inboxStatusLabel.text = self.inbox.status
        rows = self.inbox.rows()
        if rows != self._inboxRows:  # rebuilt only on change: updateGui runs on every parameter change
            self._inboxRows = rows
            self.ui.inboxTable.setRowCount(len(rows))
            for row, values in enumerate(rows):
                for column, value in enumerate(values):
                    self.ui.inboxTable.setItem(row, column, qt.QTableWidgetItem(str(value)))
        self.ui.presetStatusLabel.text = self.presets.status
        self.ui.exportStatusLabel.text = self.export.status
        setPlainText(self.ui.reportTextEdit, self.export.report_text())

    def onApplyPreset(self):
        if self.presets.task:  # the button reads Cancel while a preset runs: its sentence comes through poll
            return self.presets.cancel()
        with errorsShown(_("Failed to start the preset."), waitCursor=True):
            self.presets.preset = self._parameterNode.preset
            self.presets.start(self._parameterNode.sourceVolume, self._parameterNode.segmentation)
            self.pollTimer.start()
        self.updateGui()

    def onExport(self):
        if self.export.task:  # the button reads Cancel while an export runs: its sentence comes through poll
            return self.export.cancel()
        # Asked with no wait cursor over the question; declined, the other formats are exported.
        segInstalled = "seg" not in self.export.formats or packages.ensureSeg()
        with errorsShown(_("Failed to start the export."), waitCursor=True):
            folder = self.ui.outputFolderSelector.currentPath or str(self.export.output_folder)
            qt.QSettings().setValue(SETTINGS_OUTPUT_FOLDER, folder)
            self.export.output_folder = Path(folder)
            p = self._parameterNode
            self.export.smoothing, self.export.coordinates = p.smoothing, p.exportCoordinates
            self.export.merged_stl, self.export.shown_only = p.exportMergedStl, p.exportShownOnly
            self.export.start(p.segmentation, self.logic.context(), segInstalled)  # copies what it needs
            self.pollTimer.start()
        self.updateGui()

    def poll(self):
        """QTimer on the main thread: finishes work whose thread is done (scene edits happen here)."""
        with errorsShown(_("Processing failed."), waitCursor=False):
            if self.presets.task and self.presets.task.done():
                node = self.presets.finish(self.logic.context())
                if node and self._parameterNode:
                    self._parameterNode.segmentation = node
            if self.export.task and self.export.task.done():
                self.export.finish()
        if not self.presets.task and not self.export.task:
            self.pollTimer.stop()
        self.updateGui()

    def onInboxStartStop(self):
        if self.inbox.running:
            self.inboxTimer.stop()
            self.inbox.stop()
        else:
            self.inbox.folder = Path(self.ui.inboxFolderSelector.currentPath or str(self.inbox.folder))
            qt.QSettings().setValue(SETTINGS_INBOX_FOLDER, str(self.inbox.folder))
            self.inbox.start()
            if self.inbox.running:
                self.inboxTimer.start()
        self.updateGui()

    def onInboxTick(self):
        """Loads what the inbox delivered: only the new files, into the DICOM database and the scene."""
        deliveries = self.inbox.tick()
        for delivery in deliveries:
            try:
                loaded = loadDelivery(self.logic.context(), delivery, self.inbox.copies_into_database(delivery))
                self.inbox.loaded(delivery, True, notes=loaded.notes, node=loaded.node)  # its row; older ones go
            except UserError as error:  # said in its row and the status line, and logged: no dialog from a timer
                self.inbox.loaded(delivery, False, str(error))
                continue
            prompting = self.promptTools.tool is not None or self.promptTools.panel.busy  # prompts would go there
            if self._parameterNode and self.inbox.as_source(delivery, self.ui.inboxUseAsSourceCheckBox.checked, prompting):
                self._parameterNode.sourceVolume = loaded.node
                showVolume(loaded.node)
                self.ui.promptsCollapsibleButton.collapsed = False  # straight to the AI prompt tools
        if deliveries or self.inbox.rows():
            self.updateGui()

    def onSendToPrinter(self):
        sendToOrcaSlicer(self.export)
        self.updateGui()

    def onOpenFolder(self):
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(self.export.last_result.folder)))

    def onReload(self):
        # Forgotten, not reloaded one by one: the module's reload imports them all afresh, each after what it
        # imports (a reload in name order left cloud.pods's error class deriving from the old core.errors one).
        for name in [n for n in sys.modules if n.startswith(("SegmentationMachineLib", "SegmentationMachineWidgets"))]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)


class SegmentationMachineLogic(ScriptedLoadableModuleLogic):
    def getParameterNode(self):
        """Export choices the node lacks (new, or emptied by Close Scene) are the remembered ones."""
        return remembered_parameter_node(super().getParameterNode(), SegmentationMachineParameterNode, qt.QSettings())

    def context(self) -> SceneContext:
        """Slicer's own scene and module logics, for the library."""
        return SceneContext(
            scene=slicer.mrmlScene,
            app_logic=slicer.app.applicationLogic(),
            volumes_logic=slicer.modules.volumes.logic(),
            segmentations_logic=slicer.modules.segmentations.logic(),
            subject_hierarchy_logic=slicer.modules.subjecthierarchy.logic(),
            colors_logic=slicer.modules.colors.logic(),
            dicom_database=getattr(slicer, "dicomDatabase", None),  # set by the DICOM module, where it is loaded
        )


class SegmentationMachineTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: phantom volume → bone preset (in a child process) → export → report."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_PresetExportOnPhantom()
        self.setUp()
        self.test_InboxLoadsNewSeries()
        self.setUp()
        self.test_BoxFromTwoClicks()

    def test_PresetExportOnPhantom(self):
        from SegmentationMachineLib.core import arrays
        from SegmentationMachineLib.dicom.phantom import make_phantom

        self.delayDisplay("Phantom volume")
        phantom = make_phantom(shape=(24, 64, 64))
        matrix = [[-1.5, 0, 0, 47.25], [0, -1.5, 0, 47.25], [0, 0, 2.0, -23.0], [0, 0, 0, 1]]
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Phantom")
        arrays.set_volume_array(volume, phantom.hu, np.array(matrix))

        self.delayDisplay("Bone preset in a child process")
        logic = SegmentationMachineLogic()
        presets = PresetsPanel()
        presets.start(volume)
        self.assertTrue(presets.task.wait(120))
        segmentation = presets.finish(logic.context())
        self.assertIsNotNone(segmentation, presets.status)
        self.assertEqual(segmentation.GetSegmentation().GetNthSegment(0).GetName(), "Bone")

        self.delayDisplay("Export")
        export = ExportPanel(output_folder=Path(tempfile.mkdtemp()))
        export.start(segmentation)
        self.assertTrue(export.task.wait(120))
        result = export.finish()
        self.assertIsNotNone(result, export.status)
        self.assertEqual(sorted(os.listdir(result.folder)),
                         ["Bone.stl", "report.json", "segments.3mf", "segments.mtl", "segments.obj"])
        self.assertEqual(result.not_watertight, [])
        self.delayDisplay("Test passed")

    def test_InboxLoadsNewSeries(self):
        import time

        from SegmentationMachineLib.dicom.phantom import make_phantom, write_phantom

        self.delayDisplay("A series dropped into a watched inbox is loaded once")
        root = Path(tempfile.mkdtemp())
        (root / "inbox").mkdir()
        panel = InboxPanel(folder=root / "inbox", settle_seconds=0.5, state_folder=root / "state")
        panel.start()
        write_phantom(root / "inbox" / "upload", make_phantom(shape=(16, 48, 48)))
        deliveries, deadline = [], time.monotonic() + 30
        while not deliveries and time.monotonic() < deadline:
            deliveries = panel.tick()
            time.sleep(0.05)
        self.assertEqual(len(deliveries), 1)
        node = loadDelivery(SegmentationMachineLogic().context(), deliveries[0]).node
        showVolume(node)
        self.assertEqual(node.GetImageData().GetDimensions(), (48, 48, 16))
        red = slicer.app.layoutManager().sliceWidget("Red") if slicer.app.layoutManager() else None
        if red:  # shown, not only loaded
            self.assertEqual(red.sliceLogic().GetSliceCompositeNode().GetBackgroundVolumeID(), node.GetID())
        if slicer.dicomDatabase:  # and indexed in Slicer's DICOM database
            indexed = set(slicer.dicomDatabase.filesForSeries(deliveries[0].series.uid))
            self.assertTrue({str(f) for f in deliveries[0].series.files} <= indexed)
        panel.loaded(deliveries[0], True)
        panel.stop()
        self.delayDisplay("Test passed")

    def test_BoxFromTwoClicks(self):
        """Slicer's ROI collapses to its centre after the second click; the box tool still gets both corners."""
        from SegmentationMachineLib.panels.promptmarkups import BoxPlacement

        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
        placement, boxes = BoxPlacement(), []
        for event in (roi.PointPositionDefinedEvent, vtk.vtkCommand.ModifiedEvent):
            roi.AddObserver(event, lambda caller, event: boxes.append(placement.update(roi)))
        for corner in ((30.0, 50.0, 5.0), (10.0, 20.0, 5.0)):
            roi.AddControlPointWorld(vtk.vtkVector3d(*corner))
        self.assertEqual([box for box in boxes if box], [((10.0, 20.0, 5.0), (30.0, 50.0, 5.0))])
        self.delayDisplay("Test passed")
