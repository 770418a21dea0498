"""The Cloud GPU section's binding: widgets built here, all behaviour in CloudPanel (the library).

RunPod calls run on worker threads; a QTimer polls the panel. When a pod's server is ready the AI
prompts section is filled in and connected. Closing Slicer's window terminates the pods this
session started, after a confirmation whose default is to terminate (only an explicit No keeps them).
"""

import logging

import ctk
import qt
import slicer
from slicer.i18n import tr as _

from SegmentationMachineLib.cloud.cloudgpu import Limits, MODES
from SegmentationMachineLib.cloud.pods import VOLUME_USD_PER_GB_MONTH, PodSpec
from SegmentationMachineLib.panels.cloud import CloudPanel
from SegmentationMachineLib.panels.remembered import BUDGET_USD, IDLE_MINUTES, LIFETIME_HOURS, CloudChoices

from . import errorsShown, packages, timer


QUIT_SLOT = "_segmentationMachineQuitSlot"  # where the connected quit slot is kept, on the slicer module


class _WindowCloseFilter(qt.QObject):
    """Asks about running pods while the main window can still show a dialog (not at aboutToQuit). The
    close can still be cancelled after this (qSlicerMainWindow::closeEvent asks about unsaved data), so
    pods are terminated only at aboutToQuit, the real quit."""

    def __init__(self, onClose):
        qt.QObject.__init__(self)
        self.onClose = onClose

    def eventFilter(self, watched, event):
        if event.type() == qt.QEvent.Close:
            self.onClose()
        return False  # Slicer closes as usual


class CloudSection:
    def __init__(self, place, promptTools):
        """place(box) puts the section's collapsible button into the module panel."""
        self.panel = CloudPanel()
        self.choices = CloudChoices.load(qt.QSettings())  # as the user left them (the library reads them back safely)
        self.promptTools = promptTools
        box = ctk.ctkCollapsibleButton()
        box.text = _("Cloud GPU (RunPod)")
        box.collapsed = True
        place(box)
        form = qt.QFormLayout(box)

        self.keyEdit = qt.QLineEdit()
        self.keyEdit.echoMode = qt.QLineEdit.Password
        self.keyEdit.placeholderText = _("saved; type a new one to replace it") if self.panel.has_key else _("RunPod API key")
        self.saveKeyButton = qt.QPushButton(_("Save key"))
        self.forgetKeyButton = qt.QPushButton(_("Forget key"))
        form.addRow(_("API key:"), self.row(self.keyEdit, self.saveKeyButton, self.forgetKeyButton))

        self.gpuCombo = qt.QComboBox()
        self.refreshButton = qt.QPushButton(_("Refresh"))
        form.addRow(_("GPU:"), self.row(self.gpuCombo, self.refreshButton))
        self.modeCombo = qt.QComboBox()
        self.modeCombo.addItems(list(MODES))
        self.modeCombo.currentIndex = MODES.index(self.choices.mode)
        self.modeCombo.toolTip = _("server: nnInteractive for this Slicer; desktop: also Slicer in the browser")
        self.idleSpin = qt.QSpinBox()
        self.idleSpin.setRange(*IDLE_MINUTES)
        self.idleSpin.value = self.choices.idle_minutes
        self.idleSpin.suffix = _(" min idle")
        # How the pod agent ends a pod: a desktop pod's volume holding the user's files is kept, and bills on.
        volumeCost = _("${cost:.2f}/GB/month ({size} GB: ${month:.2f}/month)").format(
            cost=VOLUME_USD_PER_GB_MONTH, size=PodSpec.volume_gb, month=PodSpec.volume_gb * VOLUME_USD_PER_GB_MONTH)
        self.idleSpin.toolTip = _(
            "The pod ends after this long in which nothing used it (a prompt, a press here, an upload, an open "
            "desktop). A server pod is terminated then; a desktop pod with your files on its volume is stopped, and its "
            "volume bills {volumeCost} until you terminate it.").format(volumeCost=volumeCost)
        self.budgetSpin = qt.QDoubleSpinBox()
        self.budgetSpin.setRange(*BUDGET_USD)
        self.budgetSpin.value = self.choices.budget_usd
        self.budgetSpin.prefix = "$ "
        self.budgetSpin.specialValueText = _("no budget")
        self.budgetSpin.toolTip = _(
            "The pod ends once it has cost this much. A server pod is terminated then; a desktop pod with your files on "
            "its volume is stopped, and its volume bills {volumeCost} until you terminate it.").format(
                volumeCost=volumeCost)
        self.lifetimeSpin = qt.QSpinBox()
        self.lifetimeSpin.setRange(*LIFETIME_HOURS)
        self.lifetimeSpin.value = self.choices.lifetime_hours
        self.lifetimeSpin.suffix = _(" h at most")
        self.lifetimeSpin.toolTip = _(
            "The pod ends after this long in any case. A server pod is terminated then; a desktop pod with your files "
            "on its volume is stopped, and its volume bills {volumeCost} until you terminate it.").format(
                volumeCost=volumeCost)
        self.wipeCheckBox = qt.QCheckBox(_("wipe uploads at end"))
        self.wipeCheckBox.toolTip = _(
            "Desktop: before the pod ends (idle time, lifetime, budget, Stop, Slicer's quit), its agent deletes the "
            "uploaded DICOM on its volume (inbox, uploads, Slicer's DICOM database); exports and scenes stay. RunPod's "
            "own stop at the maximum lifetime cannot wipe, nor can a Stop the agent does not answer (said then): "
            "Terminate deletes the whole volume.")
        form.addRow(_("Mode:"), self.row(self.modeCombo, self.idleSpin, self.lifetimeSpin, self.budgetSpin,
                                         self.wipeCheckBox))

        self.startButton = qt.QPushButton(_("Start"))
        self.cancelButton = qt.QPushButton(_("Cancel"))
        self.stopButton = qt.QPushButton(_("Stop"))
        self.stopButton.toolTip = _("No GPU billing; the volume is kept, and bills {volumeCost} until Terminate (a pod "
                                    "started to wipe its uploads at its end has them wiped first).").format(
            volumeCost=volumeCost)
        self.terminateButton = qt.QPushButton(_("Terminate"))
        self.terminateButton.toolTip = _("Ends the pod and deletes its volume: a desktop pod's uploads, scenes and "
                                         "exports go with it (asked first). Stop keeps them.")
        form.addRow(self.row(self.startButton, self.cancelButton, self.stopButton, self.terminateButton))
        self.progressBar = qt.QProgressBar()
        self.progressBar.setRange(0, 100)
        form.addRow(self.progressBar)
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.balanceLabel = qt.QLabel()
        form.addRow(self.statusLabel)
        form.addRow(self.balanceLabel)

        self.desktopButton = qt.QPushButton(_("Open desktop"))
        self.filesButton = qt.QPushButton(_("Open file upload"))
        self.desktopPasswordButton = qt.QPushButton(_("Copy desktop password"))
        self.filesPasswordButton = qt.QPushButton(_("Copy upload password"))
        self.filesPasswordButton.toolTip = _("File upload user: sm")
        form.addRow(self.row(self.desktopButton, self.filesButton, self.desktopPasswordButton, self.filesPasswordButton))
        self.earlierList = qt.QListWidget()
        self.earlierList.setMaximumHeight(70)
        self.useEarlierButton = qt.QPushButton(_("Connect"))
        self.terminateEarlierButton = qt.QPushButton(_("Terminate"))
        self.terminateEarlierButton.toolTip = self.terminateButton.toolTip
        form.addRow(_("Still running:"), self.row(self.earlierList, self.useEarlierButton, self.terminateEarlierButton))

        self.saveKeyButton.connect("clicked(bool)", self.onSaveKey)
        self.forgetKeyButton.connect("clicked(bool)", lambda: self.act(self.panel.forget_key))
        self.refreshButton.connect("clicked(bool)", lambda: self.act(self.panel.refresh))
        self.startButton.connect("clicked(bool)", self.onStart)
        self.cancelButton.connect("clicked(bool)", lambda: self.act(self.panel.cancel))
        self.stopButton.connect("clicked(bool)", lambda: self.act(self.panel.stop))
        self.terminateButton.connect("clicked(bool)", lambda: self.onTerminate(self.panel.pod.pod_id))
        self.desktopButton.connect("clicked(bool)", lambda: self.openUrl(self.panel.pod.desktop_url))
        self.filesButton.connect("clicked(bool)", lambda: self.openUrl(self.panel.pod.files_url))
        self.desktopPasswordButton.connect("clicked(bool)", lambda: self.copySecret("SM_VNC_PASSWORD"))
        self.filesPasswordButton.connect("clicked(bool)", lambda: self.copySecret("SM_FILES_PASSWORD"))
        self.useEarlierButton.connect("clicked(bool)", lambda: self.act(self.panel.connect_earlier, self.earlierId()))
        self.terminateEarlierButton.connect("clicked(bool)", lambda: self.onTerminate(self.earlierId()))
        self.earlierList.connect("itemSelectionChanged()", self.updateGui)
        # Remembered as the user changes them ("activated": not as the GPU list is filled in)
        for combo in (self.gpuCombo, self.modeCombo):
            combo.connect("activated(int)", self.rememberChoices)
        for spin in (self.idleSpin, self.lifetimeSpin, self.budgetSpin):
            spin.connect("valueChanged(double)" if spin is self.budgetSpin else "valueChanged(int)",
                         self.rememberChoices)
        self.timer = timer(200, self.tick)
        self.endAtQuit = True  # no surprise bill: only an explicit "keep running" keeps this session's pods
        self.keepDesktopFilesAtQuit = True  # desktop pods are stopped, not terminated, unless asked
        self.closeFilter = _WindowCloseFilter(self.onWindowClose)
        if slicer.util.mainWindow():  # none in generic tests (--no-main-window): aboutToQuit still terminates
            slicer.util.mainWindow().installEventFilter(self.closeFilter)
        # One quit slot at a time: a developer reload leaves the previous section's connected (cleanup() must).
        previous = getattr(slicer, QUIT_SLOT, None)
        if previous is not None:
            slicer.app.disconnect("aboutToQuit()", previous)
        slot = self.onAboutToQuit
        setattr(slicer, QUIT_SLOT, slot)  # the slicer module outlives reloads of this one
        slicer.app.connect("aboutToQuit()", slot)
        box.connect("contentsCollapsed(bool)", self.onExpanded)
        self.updateGui()

    def onExpanded(self, collapsed):
        """RunPod is asked only once the section is opened (Slicer starts without the SDK or the network)."""
        if not collapsed and self.panel.has_key and not self.panel.gpus and not self.panel.busy:
            self.act(self.panel.refresh)

    @staticmethod
    def row(*widgets):
        holder = qt.QWidget()
        layout = qt.QHBoxLayout(holder)
        layout.setContentsMargins(0, 0, 0, 0)
        for widget in widgets:
            layout.addWidget(widget)
        return holder

    def act(self, action, *args):
        with errorsShown(_("Cloud GPU failed."), waitCursor=True):
            action(*args)
        self.timer.start()
        self.updateGui()

    def rememberChoices(self, *_changed):
        choices = CloudChoices(gpu=self.gpuCombo.currentData or self.choices.gpu, mode=self.modeCombo.currentText,
                               idle_minutes=self.idleSpin.value, lifetime_hours=self.lifetimeSpin.value,
                               budget_usd=self.budgetSpin.value)
        choices.save(qt.QSettings(), self.choices)
        self.choices = choices

    def onSaveKey(self):
        self.act(self.panel.save_key, self.keyEdit.text)
        self.keyEdit.text = ""  # the key is not kept in the widget

    def onStart(self):
        # A server pod is there for the AI prompts: their packages are asked for before billing starts, not after.
        if self.modeCombo.currentText == "server" and not packages.ensure(packages.AI, _("The AI prompt tools")):
            return
        budget = self.budgetSpin.value or None
        limits = Limits(self.idleSpin.value * 60, self.lifetimeSpin.value * 3600, budget, self.wipeCheckBox.checked)
        self.act(self.panel.start, self.gpuCombo.currentData, self.modeCombo.currentText, limits)

    def onTerminate(self, podId):
        """Asks first (Yes/No; No is the default and Escape's): terminating deletes the pod's volume."""
        box = qt.QMessageBox(qt.QMessageBox.Question, _("Cloud GPU"), self.panel.terminate_question(podId),
                             qt.QMessageBox.Yes | qt.QMessageBox.No, slicer.util.mainWindow())
        box.setDefaultButton(qt.QMessageBox.No)
        box.setEscapeButton(qt.QMessageBox.No)
        if box.exec_() == qt.QMessageBox.Yes:
            self.act(self.panel.terminate, podId)

    def earlierId(self):
        item = self.earlierList.currentItem()
        return item.data(qt.Qt.UserRole) if item else None

    def openUrl(self, url):
        qt.QDesktopServices.openUrl(qt.QUrl(url))

    def copySecret(self, name):
        """Passwords go to the clipboard, never into a URL or onto the screen."""
        slicer.app.clipboard().setText(self.panel.pod.secrets[name])
        self.statusLabel.text = _("Password copied: paste it at the login prompt.")

    def tick(self):
        ready = self.panel.tick()
        if ready is not None:
            self.promptTools.connectTo(ready.server_url, ready.secrets["SM_NNI_API_KEY"])
        if not self.panel.busy and self.panel.heartbeat is None:
            self.timer.stop()
        self.updateGui()

    def updateGui(self):
        panel = self.panel
        if self.gpuCombo.count != len(panel.gpus):
            self.gpuCombo.clear()
            for gpu in panel.gpus:
                self.gpuCombo.addItem(f"{gpu.name} — {gpu.memory_gb} GB — ${gpu.secure_price:.2f}/h", gpu.id)
            self.gpuCombo.currentIndex = self.choices.gpu_index(panel.gpus)  # the cheapest where it is gone
        if [self.earlierList.item(i).data(qt.Qt.UserRole) for i in range(self.earlierList.count)] != [
                pod.id for pod, _cost in panel.earlier]:  # rebuilt only on change: the selection survives ticks
            self.earlierList.clear()
            for pod, cost in panel.earlier:
                state = (f"stopped, {pod.stopped_cost()}" if pod.status == "EXITED" else
                         f"{pod.status}: ${cost:.2f} since its last start" if pod.runtime_ready else
                         pod.status)  # RunPod reports no uptime (yet): "$0.00" would be wrong
                item = qt.QListWidgetItem(f"{pod.id} {pod.gpu} {state}")
                item.setData(qt.Qt.UserRole, pod.id)
                self.earlierList.addItem(item)
        idle = not panel.busy  # one RunPod action at a time: everything else waits
        self.saveKeyButton.enabled = self.refreshButton.enabled = idle
        self.forgetKeyButton.enabled = idle and panel.has_key
        self.startButton.enabled = idle and panel.has_key and bool(panel.gpus) and panel.pod is None
        self.cancelButton.enabled = panel.starting
        self.stopButton.enabled = self.terminateButton.enabled = idle and panel.pod is not None
        desktop = panel.pod is not None and panel.pod.mode == "desktop"
        for button in (self.desktopButton, self.filesButton, self.desktopPasswordButton, self.filesPasswordButton):
            button.enabled = desktop
        self.useEarlierButton.enabled = self.terminateEarlierButton.enabled = idle and self.earlierId() is not None
        self.progressBar.value = int(100 * panel.phase_fraction)
        self.progressBar.visible = panel.starting
        self.statusLabel.text = panel.status
        self.balanceLabel.text = panel.balance

    def onWindowClose(self):
        if not (self.panel.started_here or self.panel.starting):
            return
        count, desktops = len(self.panel.started_here) + int(self.panel.starting), self.panel.desktops_started_here()
        box = qt.QMessageBox(qt.QMessageBox.Question, _("Cloud GPU"), _(
            "End the {n} pod(s) this session started when Slicer quits? They bill until ended.").format(n=count),
            qt.QMessageBox.NoButton, slicer.util.mainWindow())
        end = box.addButton(_("Stop desktop pods, terminate the others") if desktops else _("Terminate"),
                            qt.QMessageBox.AcceptRole)
        terminate = box.addButton(_("Terminate all"), qt.QMessageBox.DestructiveRole) if desktops else None
        keep = box.addButton(_("Keep running"), qt.QMessageBox.RejectRole)
        box.setInformativeText(_(
            "A stopped desktop pod keeps your uploads, scenes and exports on its volume, which bills ${cost:.2f}/GB/month "
            "until you terminate it; terminating deletes them. Closing this dialog or pressing Escape ends them as the "
            "first button does.").format(cost=VOLUME_USD_PER_GB_MONTH) if desktops else _(
            "Closing this dialog or pressing Escape ends them as the first button does."))
        box.setDefaultButton(end)
        box.setEscapeButton(end)  # never "keep running" by accident
        box.exec_()
        self.endAtQuit = box.clickedButton() != keep
        self.keepDesktopFilesAtQuit = box.clickedButton() != terminate

    def onAboutToQuit(self):
        if not self.endAtQuit:
            return
        problems = self.panel.end_started_here(self.keepDesktopFilesAtQuit)
        if problems:
            logging.error("Could not end: %s. End them in the RunPod console.", "; ".join(problems))

    def cleanup(self):
        self.timer.stop()
        if slicer.util.mainWindow():
            slicer.util.mainWindow().removeEventFilter(self.closeFilter)
        # aboutToQuit stays connected: at a real quit Slicer's own slot, connected first when the application was
        # made, unloads the modules, which calls this cleanup() before our slot's turn; a slot disconnected here
        # would then never run, and this session's pods would bill on (qSlicerCoreApplication::onAboutToQuit).
