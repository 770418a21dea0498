"""The AI prompts section's binding: viewer markups and shortcuts in, PromptsPanel (the library) out.

Points are placed as markups points, boxes as ROIs, scribbles as open curves and lassos as
closed curves; each finished markup becomes one prompt (in RAS) and is cleared; the library's PromptTrail shows it
faint while it waits and, once its result is in, read-only until Undo, reset, another segment or Disconnect. The
Segment Editor module's own parameter node is used, so its masking and overwrite settings apply.
"""

import os

import qt
import slicer
import vtk
from slicer.i18n import tr as _

from SegmentationMachineLib.core.credentials import SecretStore
from SegmentationMachineLib.core.errors import UserError
from SegmentationMachineLib.core.scene import forward_render_pauses
from SegmentationMachineLib.panels.promptmarkups import BoxPlacement, curve_points_ras, PlaceMode
from SegmentationMachineLib.panels.prompts import new_segment, PromptsPanel
from SegmentationMachineLib.panels.prompttrail import PromptTrail
from SegmentationMachineLib.prompts.promptfile import save_prompt_file, SegmentPrompts
from SegmentationMachineLib.prompts.session import SegmentTarget

from . import errorsShown, packages, timer

SETTINGS_SERVER_URL = "SegmentationMachine/ServerUrl"
SECRET_NAME = "nninteractive-api-key"
# Shortcuts avoid the plain keys Slicer's views take (b, f, g, r, s, t, v: vtkMRMLSliceIntersectionWidget,
# vtkSlicerMarkupsWidget), which a main-window shortcut would steal; Ctrl+Z, and the platform's Redo with Ctrl+Y, as
# the Segment Editor has them (qMRMLSegmentEditorWidget.cxx).
TOOLS = {  # tool -> (markups class, button, shortcut)
    "point": ("vtkMRMLMarkupsFiducialNode", "pointToolButton", "P"),
    "box": ("vtkMRMLMarkupsROINode", "boxToolButton", "X"),
    "scribble": ("vtkMRMLMarkupsCurveNode", "scribbleToolButton", "C"),
    "lasso": ("vtkMRMLMarkupsClosedCurveNode", "lassoToolButton", "L"),
}


def redoKeys() -> list:
    """The platform's Redo (Ctrl+Shift+Z on Linux and macOS, Ctrl+Y on Windows), and Ctrl+Y where that is another
    key: the Segment Editor takes both."""
    keys = [key for key in [qt.QKeySequence(qt.QKeySequence.Redo).toString()] if key]
    return keys + ([] if "Ctrl+Y" in keys else ["Ctrl+Y"])


def nativeText(key: str) -> str:
    return qt.QKeySequence(key).toString(qt.QKeySequence.NativeText)


class PromptToolsSection:
    def __init__(self, ui, parameterNodeGetter, updateGui):
        self.ui = ui
        self.parameterNode = parameterNodeGetter
        self.updateGui = updateGui
        self.panel = PromptsPanel(trail=PromptTrail(slicer.mrmlScene, slicer.app.applicationLogic()))
        self.secrets = SecretStore()
        self.tool = None
        self.boxPlacement = BoxPlacement()
        self.placeMode = PlaceMode()  # Slicer's, as it was before a tool was chosen
        self.markups = {}
        self.observations = []
        self.timer = timer(50, self.tick)
        # Inside the pod's desktop the image sets SM_NNI_URL and SM_NNI_API_KEY: the local server is ready to use.
        ui.serverUrlEdit.text = os.environ.get("SM_NNI_URL") or slicer.util.settingsValue(SETTINGS_SERVER_URL, "")
        ui.serverKeyEdit.text = os.environ.get("SM_NNI_API_KEY") or self.secrets.load(SECRET_NAME) or ""
        if packages.missing(packages.AI):  # Slicer does not ship the client: say so before the first Connect
            ui.promptStatusLabel.text = _("The AI prompt tools need the nnInteractive client, which Slicer does "
                                          "not include: Connect installs it, after asking.")
        ui.connectButton.connect("clicked(bool)", self.onConnect)
        ui.disconnectButton.connect("clicked(bool)", self.onDisconnect)
        ui.includeButton.connect("clicked(bool)", self.onToggleInclude)
        # The keys as this platform writes them (Ctrl+Z is Command-Z on macOS).
        ui.undoButton.text = _("Undo ({keys})").format(keys=nativeText("Ctrl+Z"))
        ui.redoButton.text = _("Redo ({keys})").format(keys=nativeText(redoKeys()[0]))
        ui.redoButton.toolTip = _("Makes the last undo again ({keys})").format(
            keys=", ".join(nativeText(key) for key in redoKeys()))
        ui.undoButton.connect("clicked(bool)", lambda: self.queue(self.panel.undo))
        ui.redoButton.connect("clicked(bool)", lambda: self.queue(self.panel.redo))
        ui.resetButton.connect("clicked(bool)", lambda: self.queue(self.panel.reset))
        ui.cancelPromptButton.connect("clicked(bool)", self.onCancel)
        ui.savePromptsButton.connect("clicked(bool)", self.onSavePrompts)
        # Both: choosing another segmentation whose current segment has the same ID (a clone) changes no segment ID.
        ui.promptSegmentSelector.connect("currentSegmentChanged(QString)", lambda _: self.onTargetChanged())
        ui.promptSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", lambda _: self.onTargetChanged())
        ui.addPromptSegmentButton.connect("clicked(bool)", self.onAddSegment)
        for tool, (_className, button, _key) in TOOLS.items():
            getattr(ui, button).connect("clicked(bool)", lambda checked, t=tool: self.setTool(t if checked else None))
        self.shortcuts = []
        window = slicer.util.mainWindow()
        if window:  # none in generic tests (--no-main-window)
            self.addShortcuts(window)
        self.enableShortcuts(False)

    def addShortcuts(self, window):
        self.shortcuts = [qt.QShortcut(qt.QKeySequence(key), window) for _, _, key in TOOLS.values()]
        for shortcut, tool in zip(self.shortcuts, TOOLS):
            shortcut.connect("activated()", lambda t=tool: self.setTool(None if self.tool == t else t))
        undo, redo = (lambda: self.queue(self.panel.undo)), (lambda: self.queue(self.panel.redo))
        keys = [("E", self.onToggleInclude), ("Ctrl+Z", undo), ("Ctrl+R", lambda: self.queue(self.panel.reset))]
        keys += [(key, redo) for key in redoKeys()]
        for key, action in keys:
            shortcut = qt.QShortcut(qt.QKeySequence(key), window)
            shortcut.connect("activated()", action)
            self.shortcuts.append(shortcut)

    def enableShortcuts(self, enabled: bool):
        """Only while the module is shown: its plain-letter shortcuts must not take keys from other modules."""
        for shortcut in self.shortcuts:
            shortcut.setEnabled(enabled)

    def cleanup(self):
        """Slicer's reload calls cleanup(), not exit(): shortcuts and observers go here."""
        self.timer.stop()
        self.setTool(None)
        for node, tag in self.observations:
            node.RemoveObserver(tag)
        self.observations = []
        for shortcut in self.shortcuts:
            shortcut.setParent(None)  # parented to the main window, which outlives this section
        self.shortcuts = []
        self.panel.disconnect()  # its heartbeats stop too: the pod it kept running may end

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
        if not packages.ensure(packages.AI, _("The AI prompt tools")):
            return
        self.panel.connect(url, key)
        self.timer.start()
        self.updateGui()

    def onDisconnect(self):
        self.panel.disconnect()
        self.tick()

    def onToggleInclude(self):
        self.panel.toggle_include()
        self.ui.includeButton.text = _("Include (E)") if self.panel.include else _("Exclude (E)")

    def queue(self, action):
        action()
        self.timer.start()

    def onTargetChanged(self):
        p = self.parameterNode()
        segmentation = self.ui.promptSegmentSelector.currentNode()
        segmentId = self.ui.promptSegmentSelector.currentSegmentID()
        if p and p.sourceVolume and segmentation and segmentId and self.panel.connected:
            self.panel.choose(p.sourceVolume, SegmentTarget(segmentation, segmentId, self.editorLogic(p.sourceVolume)))
            self.timer.start()

    def onAddSegment(self):
        p = self.parameterNode()
        try:
            segmentation, segmentId = new_segment(p.sourceVolume if p else None,
                                                  self.ui.promptSegmentSelector.currentNode())
        except UserError as error:
            self.ui.promptStatusLabel.text = str(error)
            return
        self.ui.promptSegmentSelector.setCurrentNode(segmentation)
        self.ui.promptSegmentSelector.setCurrentSegmentID(segmentId)  # chosen: prompts go there
        if p:  # and Export's: what the prompts make can be exported without choosing it again
            p.segmentation = segmentation

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
        forward_render_pauses(logic, slicer.app.applicationLogic())  # no Segment Editor widget does it
        return logic

    # -- viewer tools ------------------------------------------------------------------------
    def setTool(self, tool, keepMode=False):
        """Slicer's place mode, "place multiple" and active place node are given back as they were when no tool
        of ours is active any more (keepMode: the interaction mode the user chose meanwhile stays). Turned off here
        (its button or key, leaving the module, Close Scene), a curve drawn halfway is dropped: giving place mode
        back ends the placement, which would send it. A right-click ends it on purpose: keepMode, it is sent."""
        if tool is None and not keepMode:
            for curve in ("scribble", "lasso"):
                if self.markups.get(curve) is not None:
                    self.markups[curve].RemoveAllControlPoints()
        self.tool = tool
        self.boxPlacement.reset()
        for name, (_className, button, _key) in TOOLS.items():
            getattr(self.ui, button).checked = name == tool
        logic = slicer.app.applicationLogic()
        if tool is None:
            self.placeMode.give_back(logic.GetInteractionNode(), logic.GetSelectionNode(), keepMode)
        else:  # the node is made once Slicer's state is kept: the Markups logic makes each new node the active one
            self.placeMode.take(logic.GetInteractionNode(), logic.GetSelectionNode(), TOOLS[tool][0],
                                lambda: self.markupsNode(tool).GetID())

    def onInteractionModeChanged(self):
        """Another module, the toolbar or a right-click left place mode: our tool buttons follow."""
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        if self.tool and interaction.GetCurrentInteractionMode() != interaction.Place:
            self.setTool(None, keepMode=True)

    def onSceneClose(self):
        """Close Scene removes our prompt nodes, and the scene hands their IDs to the next nodes made: forgotten."""
        self.setTool(None)
        self.panel.scene_closed()  # the prompts shown, queued or on the server were the closed scene's segment's
        interaction = slicer.app.applicationLogic().GetInteractionNode()  # a singleton: it stays, and so do its observers
        for node, tag in self.observations:
            if node is not interaction:
                node.RemoveObserver(tag)
        self.observations = [(node, tag) for node, tag in self.observations if node is interaction]
        self.markups = {}

    def markupsNode(self, tool):
        node = self.markups.get(tool)
        if node is None or not slicer.mrmlScene.IsNodePresent(node):  # by ID, it could be another node now
            node = slicer.mrmlScene.AddNewNodeByClass(TOOLS[tool][0], f"AI {tool} prompt")
            node.SetSaveWithScene(False)
            events = {"point": [node.PointPositionDefinedEvent],
                      "box": [node.PointPositionDefinedEvent, vtk.vtkCommand.ModifiedEvent]}.get(tool, [])
            for event in events:
                self.observations.append((node, node.AddObserver(event, lambda caller, ev, t=tool: self.onPlaced(t))))
            self.markups[tool] = node
            interaction = slicer.app.applicationLogic().GetInteractionNode()
            if not any(n is interaction for n, _ in self.observations):
                self.observations.append((interaction, interaction.AddObserver(
                    interaction.EndPlacementEvent, lambda caller, ev: self.onPlacementEnded())))
                self.observations.append((interaction, interaction.AddObserver(
                    interaction.InteractionModeChangedEvent, lambda caller, ev: self.onInteractionModeChanged())))
        return node

    def onPlaced(self, tool):
        """Inside the markups node's own event: Slicer's placing widget goes on using the node after it
        (vtkSlicerMarkupsWidget::PlacePoint), so the prompt is read now and the node changed only afterwards.
        Only while that tool is chosen: a point placed otherwise is not a prompt."""
        if tool != self.tool:
            return
        node = self.markups[tool]
        if tool == "point":
            position = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(node.GetNumberOfControlPoints() - 1, position)
            self.submit("point", ras=tuple(position))
            qt.QTimer.singleShot(0, node.RemoveAllControlPoints)
        elif tool == "box":
            box = self.boxPlacement.update(node)
            if box:
                self.submit("box", ras_min=box[0], ras_max=box[1])
                qt.QTimer.singleShot(0, lambda: self.replaceBox(node))

    def replaceBox(self, node):
        """A box ROI accepts a single point once defined (UpdateControlPointsFromBoxROI): the next box needs a
        fresh ROI, made active for placing."""
        if self.markups.get("box") is node:
            slicer.mrmlScene.RemoveNode(self.markups.pop("box"))
            # A mouse move before this ran has Slicer make an empty ROI for the next box (persistent place mode).
            made = slicer.mrmlScene.GetNodeByID(slicer.app.applicationLogic().GetSelectionNode().GetActivePlaceNodeID())
            if made and made.IsA("vtkMRMLMarkupsROINode") and not made.GetNumberOfControlPoints():
                slicer.mrmlScene.RemoveNode(made)
            if self.tool == "box":
                self.setTool("box")

    def onPlacementEnded(self):
        """Curves are finished by the user (right-click): then they become a prompt."""
        for tool in ("scribble", "lasso"):
            node = self.markups.get(tool)
            if node is not None and node.GetNumberOfControlPoints() >= (2 if tool == "scribble" else 3):
                points = curve_points_ras(node)  # the spline Slicer drew, not the control polygon
                self.submit(tool, ras_points=tuple(tuple(p) for p in points))
                node.RemoveAllControlPoints()

    def submit(self, kind, **geometry):
        self.panel.submit(kind, **geometry)
        self.timer.start()

    def tick(self):
        with errorsShown(_("The AI prompt failed."), waitCursor=False):
            wasConnected = self.panel.connected
            self.panel.tick()
            if self.panel.connected and not wasConnected:
                self.onTargetChanged()
        if not self.panel.busy and self.panel.heartbeat is None:  # the pod's warnings are shown while connected
            self.timer.stop()
        self.ui.promptStatusLabel.text = self.panel.status
        self.ui.cancelPromptButton.enabled = self.panel.can_cancel
        self.ui.disconnectButton.enabled = self.panel.connected or self.panel.connecting  # abandons a connect
        self.ui.undoButton.enabled, self.ui.redoButton.enabled = self.panel.can_undo, self.panel.can_redo
        self.ui.latencyLabel.text = (_("Last prompt: {latency}").format(latency=self.panel.last_latency)
                                     if self.panel.last_latency else "")

    def onCancel(self):
        self.panel.cancel()
        self.tick()

    def onSavePrompts(self):
        segmentation = self.ui.promptSegmentSelector.currentNode()
        if not segmentation or not self.panel.session:
            return
        path = qt.QFileDialog.getSaveFileName(None, _("Save prompts"), "prompts.json", "JSON (*.json)")
        if path:
            segments = segmentation.GetSegmentation()
            prompts = [SegmentPrompts(segments.GetNthSegment(i).GetName(),
                                      self.panel.session.prompts_of(segments.GetNthSegmentID(i), segmentation))
                       for i in range(segments.GetNumberOfSegments())]
            with errorsShown(_("Could not save the prompts."), waitCursor=True):
                save_prompt_file(path, [p for p in prompts if p.prompts])
