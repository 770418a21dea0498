"""The Cloud GPU section's binding: widgets built here, all behaviour in CloudPanel (the library).

RunPod calls run on worker threads; a QTimer polls the panel. When a pod's server is ready the AI
prompts section is filled in and connected. Quitting Slicer terminates the pods this session
started, after a confirmation whose default is to terminate.
"""

import ctk
import qt
import slicer
from slicer.i18n import tr as _

from SegmentationMachineLib.cloudgpu import MODES, Limits
from SegmentationMachineLib.cloudpanel import CloudPanel


class CloudSection:
    def __init__(self, parentLayout, promptTools):
        self.panel = CloudPanel()
        self.promptTools = promptTools
        box = ctk.ctkCollapsibleButton()
        box.text = _("Cloud GPU (RunPod)")
        box.collapsed = True
        parentLayout.addWidget(box)
        form = qt.QFormLayout(box)

        self.keyEdit = qt.QLineEdit()
        self.keyEdit.echoMode = qt.QLineEdit.Password
        self.keyEdit.placeholderText = _("saved in the keychain") if self.panel.has_key else _("RunPod API key")
        self.saveKeyButton = qt.QPushButton(_("Save key"))
        self.forgetKeyButton = qt.QPushButton(_("Forget key"))
        form.addRow(_("API key:"), self.row(self.keyEdit, self.saveKeyButton, self.forgetKeyButton))

        self.gpuCombo = qt.QComboBox()
        self.refreshButton = qt.QPushButton(_("Refresh"))
        form.addRow(_("GPU:"), self.row(self.gpuCombo, self.refreshButton))
        self.modeCombo = qt.QComboBox()
        self.modeCombo.addItems(list(MODES))
        self.modeCombo.toolTip = _("server: nnInteractive for this Slicer; desktop: also Slicer in the browser")
        self.idleSpin = qt.QSpinBox()
        self.idleSpin.setRange(5, 240)
        self.idleSpin.value = 15
        self.idleSpin.suffix = _(" min idle")
        self.idleSpin.toolTip = _("The pod terminates itself after this long without a connected client.")
        self.budgetSpin = qt.QDoubleSpinBox()
        self.budgetSpin.setRange(0, 1000)
        self.budgetSpin.prefix = "$ "
        self.budgetSpin.specialValueText = _("no budget")
        self.budgetSpin.toolTip = _("The pod terminates itself once it has cost this much.")
        form.addRow(_("Mode:"), self.row(self.modeCombo, self.idleSpin, self.budgetSpin))

        self.startButton = qt.QPushButton(_("Start"))
        self.cancelButton = qt.QPushButton(_("Cancel"))
        self.stopButton = qt.QPushButton(_("Stop"))
        self.stopButton.toolTip = _("No GPU billing; the volume is kept (and billed a little) until Terminate.")
        self.terminateButton = qt.QPushButton(_("Terminate"))
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
        form.addRow(_("Still running:"), self.row(self.earlierList, self.useEarlierButton, self.terminateEarlierButton))

        self.saveKeyButton.connect("clicked(bool)", self.onSaveKey)
        self.forgetKeyButton.connect("clicked(bool)", lambda: self.act(self.panel.forget_key))
        self.refreshButton.connect("clicked(bool)", lambda: self.act(self.panel.refresh))
        self.startButton.connect("clicked(bool)", self.onStart)
        self.cancelButton.connect("clicked(bool)", lambda: self.act(self.panel.cancel))
        self.stopButton.connect("clicked(bool)", lambda: self.act(self.panel.stop))
        self.terminateButton.connect("clicked(bool)", lambda: self.act(self.panel.terminate))
        self.desktopButton.connect("clicked(bool)", lambda: self.openUrl(self.panel.pod.desktop_url))
        self.filesButton.connect("clicked(bool)", lambda: self.openUrl(self.panel.pod.files_url))
        self.desktopPasswordButton.connect("clicked(bool)", lambda: self.copySecret("SM_VNC_PASSWORD"))
        self.filesPasswordButton.connect("clicked(bool)", lambda: self.copySecret("SM_FILES_PASSWORD"))
        self.useEarlierButton.connect("clicked(bool)", lambda: self.act(self.panel.connect_earlier, self.earlierId()))
        self.terminateEarlierButton.connect("clicked(bool)", lambda: self.act(self.panel.terminate, self.earlierId()))
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.timeout.connect(self.tick)
        slicer.app.connect("aboutToQuit()", self.onQuit)
        if self.panel.has_key:
            self.act(self.panel.refresh)
        self.updateGui()

    @staticmethod
    def row(*widgets):
        holder = qt.QWidget()
        layout = qt.QHBoxLayout(holder)
        layout.setContentsMargins(0, 0, 0, 0)
        for widget in widgets:
            layout.addWidget(widget)
        return holder

    def act(self, action, *args):
        with slicer.util.tryWithErrorDisplay(_("Cloud GPU failed."), waitCursor=True):
            action(*args)
        self.timer.start()
        self.updateGui()

    def onSaveKey(self):
        self.act(self.panel.save_key, self.keyEdit.text)
        self.keyEdit.text = ""  # the key is not kept in the widget

    def onStart(self):
        budget = self.budgetSpin.value or None
        limits = Limits(idle_timeout_s=self.idleSpin.value * 60, budget_usd=budget)
        self.act(self.panel.start, self.gpuCombo.currentData, self.modeCombo.currentText, limits)

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
        if [self.earlierList.item(i).data(qt.Qt.UserRole) for i in range(self.earlierList.count)] != [
                pod.id for pod, _cost in panel.earlier]:  # rebuilt only on change: the selection survives ticks
            self.earlierList.clear()
            for pod, cost in panel.earlier:
                item = qt.QListWidgetItem(f"{pod.id} {pod.gpu}: ${cost:.2f} so far")
                item.setData(qt.Qt.UserRole, pod.id)
                self.earlierList.addItem(item)
        starting = panel.starting
        self.startButton.enabled = panel.has_key and bool(panel.gpus) and not panel.busy and panel.pod is None
        self.cancelButton.enabled = starting
        self.stopButton.enabled = self.terminateButton.enabled = panel.pod is not None and not panel.busy
        desktop = panel.pod is not None and panel.pod.mode == "desktop"
        for button in (self.desktopButton, self.filesButton, self.desktopPasswordButton, self.filesPasswordButton):
            button.enabled = desktop
        self.useEarlierButton.enabled = self.terminateEarlierButton.enabled = bool(panel.earlier) and not panel.busy
        self.forgetKeyButton.enabled = panel.has_key
        self.progressBar.value = int(100 * panel.phase_fraction)
        self.progressBar.visible = starting
        self.statusLabel.text = panel.status
        self.balanceLabel.text = panel.balance

    def onQuit(self):
        if not self.panel.started_here:
            return
        answer = qt.QMessageBox.question(
            slicer.util.mainWindow(), _("Cloud GPU"),
            _("Terminate the {n} pod(s) this session started? They bill until terminated.").format(
                n=len(self.panel.started_here)),
            qt.QMessageBox.Yes | qt.QMessageBox.No, qt.QMessageBox.Yes)
        if answer == qt.QMessageBox.Yes:
            problems = self.panel.terminate_started_here()
            if problems:
                slicer.util.errorDisplay(_("Could not terminate: {p}. Terminate them in the RunPod console.").format(
                    p="; ".join(problems)))

    def cleanup(self):
        self.timer.stop()
