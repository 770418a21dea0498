"""The AI prompts section's binding: viewer markups and shortcuts in, PromptsPanel (the library) out.

Points are placed as markups points, boxes as ROIs, scribbles as open curves and lassos as
closed curves; each finished markup becomes one prompt (in RAS) and is cleared. The Segment
Editor module's own parameter node is used, so its masking and overwrite settings apply.
"""

import os

import qt
import slicer
from slicer.i18n import tr as _

import SegmentationMachinePackages
from SegmentationMachineLib.core.credentials import SecretStore
from SegmentationMachineLib.panels.prompts import PromptsPanel
from SegmentationMachineLib.prompts.promptfile import save_prompt_file, SegmentPrompts
from SegmentationMachineLib.prompts.session import SegmentTarget

SETTINGS_SERVER_URL = "SegmentationMachine/ServerUrl"
SECRET_NAME = "nninteractive-api-key"
TOOLS = {  # tool -> (markups class, button, shortcut)
    "point": ("vtkMRMLMarkupsFiducialNode", "pointToolButton", "P"),
    "box": ("vtkMRMLMarkupsROINode", "boxToolButton", "B"),
    "scribble": ("vtkMRMLMarkupsCurveNode", "scribbleToolButton", "S"),
    "lasso": ("vtkMRMLMarkupsClosedCurveNode", "lassoToolButton", "L"),
}


class PromptToolsSection:
    def __init__(self, ui, parameterNodeGetter, updateGui):
        self.ui = ui
        self.parameterNode = parameterNodeGetter
        self.updateGui = updateGui
        self.panel = PromptsPanel()
        self.secrets = SecretStore()
        self.tool = None
        self.markups = {}
        self.observations = []
        self.timer = qt.QTimer()
        self.timer.setInterval(50)
        self.timer.timeout.connect(self.tick)
        # Inside the pod's desktop the image sets SM_NNI_URL and SM_NNI_API_KEY: the local server is ready to use.
        ui.serverUrlEdit.text = os.environ.get("SM_NNI_URL") or slicer.util.settingsValue(SETTINGS_SERVER_URL, "")
        ui.serverKeyEdit.text = os.environ.get("SM_NNI_API_KEY") or self.secrets.load(SECRET_NAME) or ""
        ui.connectButton.connect("clicked(bool)", self.onConnect)
        ui.includeButton.connect("clicked(bool)", self.onToggleInclude)
        ui.undoButton.connect("clicked(bool)", lambda: self.queue(self.panel.undo))
        ui.redoButton.connect("clicked(bool)", lambda: self.queue(self.panel.redo))
        ui.resetButton.connect("clicked(bool)", lambda: self.queue(self.panel.reset))
        ui.savePromptsButton.connect("clicked(bool)", self.onSavePrompts)
        ui.promptSegmentSelector.connect("currentSegmentChanged(QString)", lambda _: self.onTargetChanged())
        for tool, (_className, button, _key) in TOOLS.items():
            getattr(ui, button).connect("clicked(bool)", lambda checked, t=tool: self.setTool(t if checked else None))
        window = slicer.util.mainWindow()
        self.shortcuts = [qt.QShortcut(qt.QKeySequence(key), window) for _, _, key in TOOLS.values()]
        for shortcut, tool in zip(self.shortcuts, TOOLS):
            shortcut.connect("activated()", lambda t=tool: self.setTool(None if self.tool == t else t))
        for key, action in (("T", self.onToggleInclude), ("Ctrl+Z", lambda: self.queue(self.panel.undo)),
                            ("Ctrl+Y", lambda: self.queue(self.panel.redo)), ("R", lambda: self.queue(self.panel.reset))):
            shortcut = qt.QShortcut(qt.QKeySequence(key), window)
            shortcut.connect("activated()", action)
            self.shortcuts.append(shortcut)
        self.enableShortcuts(False)

    def enableShortcuts(self, enabled: bool):
        """Only while the module is shown: P, B, S, L, T and R must not steal keys elsewhere."""
        for shortcut in self.shortcuts:
            shortcut.setEnabled(enabled)

    def cleanup(self):
        self.timer.stop()
        self.setTool(None)
        for node, tag in self.observations:
            node.RemoveObserver(tag)
        if self.panel.session:
            self.panel.session.close()

    def onConnect(self):
        url, key = self.ui.serverUrlEdit.text.strip(), self.ui.serverKeyEdit.text.strip()
        qt.QSettings().setValue(SETTINGS_SERVER_URL, url)
        if self.ui.rememberKeyCheckBox.checked:
            self.secrets.save(SECRET_NAME, key)
        else:
            self.secrets.forget(SECRET_NAME)
        self.connectTo(url, key, fill=False)

    def connectTo(self, url: str, key: str, fill: bool = True):
        """Also called by the Cloud GPU section once a pod's server is ready (its one-off key is not remembered)."""
        if fill:
            self.ui.serverUrlEdit.text, self.ui.serverKeyEdit.text = url, key
        if not SegmentationMachinePackages.ensure(SegmentationMachinePackages.AI, _("The AI prompt tools")):
            return
        self.panel.connect(url, key)
        self.timer.start()
        self.updateGui()

    def onToggleInclude(self):
        self.panel.toggle_include()
        self.ui.includeButton.text = _("Include (T)") if self.panel.include else _("Exclude (T)")

    def queue(self, action):
        action()
        self.timer.start()

    def onTargetChanged(self):
        p = self.parameterNode()
        segmentation = self.ui.promptSegmentSelector.currentNode()
        segmentId = self.ui.promptSegmentSelector.currentSegmentID()
        if p and p.sourceVolume and segmentation and segmentId and self.panel.connected:
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(p.sourceVolume)
            self.panel.choose(p.sourceVolume, SegmentTarget(segmentation, segmentId, self.editorLogic(p.sourceVolume)))
            self.timer.start()

    def editorLogic(self, volume):
        """Segment Editor logic on the Segment Editor module's node: its masking and overwrite settings hold."""
        editorNode = slicer.mrmlScene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
        if editorNode is None:
            editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
            editorNode.SetSingletonTag("SegmentEditor")
        editorNode.SetAndObserveSegmentationNode(self.ui.promptSegmentSelector.currentNode())
        editorNode.SetAndObserveSourceVolumeNode(volume)
        logic = slicer.vtkSlicerSegmentEditorLogic()
        logic.SetMRMLScene(slicer.mrmlScene)
        logic.SetMRMLApplicationLogic(slicer.app.applicationLogic())
        logic.SetSegmentEditorNode(editorNode)
        return logic

    # -- viewer tools ------------------------------------------------------------------------
    def setTool(self, tool):
        self.tool = tool
        for name, (_className, button, _key) in TOOLS.items():
            getattr(self.ui, button).checked = name == tool
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        if tool is None:
            interaction.SetCurrentInteractionMode(interaction.ViewTransform)
            return
        node = self.markupsNode(tool)
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetReferenceActivePlaceNodeClassName(TOOLS[tool][0])
        selection.SetActivePlaceNodeID(node.GetID())
        interaction.SetPlaceModePersistence(1)
        interaction.SetCurrentInteractionMode(interaction.Place)

    def markupsNode(self, tool):
        node = self.markups.get(tool)
        if node is None or slicer.mrmlScene.GetNodeByID(node.GetID()) is None:
            node = slicer.mrmlScene.AddNewNodeByClass(TOOLS[tool][0], f"AI {tool} prompt")
            node.SetSaveWithScene(False)
            event = node.PointPositionDefinedEvent if tool in ("point", "box") else None
            if event is not None:
                self.observations.append((node, node.AddObserver(event, lambda caller, ev, t=tool: self.onPlaced(t))))
            self.markups[tool] = node
            interaction = slicer.app.applicationLogic().GetInteractionNode()
            if not any(n is interaction for n, _ in self.observations):
                self.observations.append((interaction, interaction.AddObserver(
                    interaction.EndPlacementEvent, lambda caller, ev: self.onPlacementEnded())))
        return node

    def onPlaced(self, tool):
        node = self.markups[tool]
        if tool == "point":
            position = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(node.GetNumberOfControlPoints() - 1, position)
            self.submit("point", ras=tuple(position))
            node.RemoveAllControlPoints()
        elif tool == "box" and node.GetNumberOfDefinedControlPoints() >= 2:
            bounds = [0.0] * 6
            node.GetRASBounds(bounds)
            low, high = list(bounds[0::2]), list(bounds[1::2])
            for axis in range(3):  # a box dragged in a slice view is flat across it
                if high[axis] - low[axis] < 1e-3:
                    high[axis] = low[axis]
            self.submit("box", ras_min=tuple(low), ras_max=tuple(high))
            node.RemoveAllControlPoints()

    def onPlacementEnded(self):
        """Curves are finished by the user (right-click or Escape): then they become a prompt."""
        for tool in ("scribble", "lasso"):
            node = self.markups.get(tool)
            if node is not None and node.GetNumberOfControlPoints() >= (2 if tool == "scribble" else 3):
                points = slicer.util.arrayFromMarkupsControlPoints(node, world=True)
                self.submit(tool, ras_points=tuple(tuple(p) for p in points))
                node.RemoveAllControlPoints()

    def submit(self, kind, **geometry):
        self.panel.submit(kind, **geometry)
        self.timer.start()

    def tick(self):
        with slicer.util.tryWithErrorDisplay(_("The AI prompt failed."), waitCursor=False):
            wasConnected = self.panel.connected
            self.panel.tick()
            if self.panel.connected and not wasConnected:
                self.onTargetChanged()
        if not self.panel.busy:
            self.timer.stop()
        self.ui.promptStatusLabel.text = self.panel.status
        self.ui.latencyLabel.text = _("Last prompt: ") + self.panel.last_latency if self.panel.last_latency else ""

    def onSavePrompts(self):
        segmentation = self.ui.promptSegmentSelector.currentNode()
        if not segmentation or not self.panel.session:
            return
        path = qt.QFileDialog.getSaveFileName(None, _("Save prompts"), "prompts.json", "JSON (*.json)")
        if path:
            segments = segmentation.GetSegmentation()
            prompts = [SegmentPrompts(segments.GetNthSegment(i).GetName(),
                                      self.panel.session.prompts_of(segments.GetNthSegmentID(i)))
                       for i in range(segments.GetNumberOfSegments())]
            with slicer.util.tryWithErrorDisplay(_("Could not save the prompts."), waitCursor=True):
                save_prompt_file(path, [p for p in prompts if p.prompts])
