"""The module's PACS parts: Send to PACS in Export and print (a DICOMweb server, its credentials, the send) and the
Inbox's button that shows what `segmentation-machine listen` received. Behaviour in PacsPanel and InboxPanel.

The SEG is written and stored on a worker thread (the module's GIL pump lends it the time); a QTimer finishes it.
Meanwhile Send to PACS reads Cancel, as the preset's Apply does.
"""

from pathlib import Path

import qt
import slicer
from slicer.i18n import tr as _

from SegmentationMachineLib.panels.pacs import PacsPanel

from . import errorsShown, packages, timer

SETTINGS_DICOMWEB_SERVER = "SegmentationMachine/DicomWebServer"


class PacsSection:
    def __init__(self, ui, parameterNodeGetter, contextGetter, inbox, startStopInbox):
        """inbox: the Inbox section's InboxPanel; startStopInbox(): its Start/Stop watching button's action."""
        self.ui = ui
        self.parameterNode = parameterNodeGetter
        self.context = contextGetter
        self.inbox = inbox
        self.startStopInbox = startStopInbox
        self.panel = PacsPanel(server=slicer.util.settingsValue(SETTINGS_DICOMWEB_SERVER, ""))
        self.timer = timer(100, self.tick)
        ui.dicomwebServerEdit.text = self.panel.server
        ui.dicomwebServerEdit.connect("textChanged(QString)", self.onServerChanged)
        ui.saveCredentialsButton.connect("clicked(bool)", self.onSaveCredentials)
        ui.forgetCredentialsButton.connect("clicked(bool)", self.onForgetCredentials)
        ui.sendToPacsButton.connect("clicked(bool)", self.onSend)
        ui.inboxReceivedButton.connect("clicked(bool)", self.onShowReceived)
        self.updateGui()

    def cleanup(self):
        self.panel.cancel()  # a send nobody would see end (reload, quit): it stops before its store, if it still can
        self.timer.stop()

    def updateGui(self):
        self.ui.sendToPacsButton.text = _("Cancel") if self.panel.task else _("Send to PACS")
        self.ui.sendToPacsButton.enabled = bool(self.panel.task) or self.panel.can_send()
        self.ui.pacsStatusLabel.text = self.panel.status

    def onServerChanged(self, text):
        self.panel.server = text
        qt.QSettings().setValue(SETTINGS_DICOMWEB_SERVER, text.strip())
        self.updateGui()

    def onSaveCredentials(self):
        edits = (self.ui.dicomwebTokenEdit, self.ui.dicomwebUserEdit, self.ui.dicomwebPasswordEdit)
        with errorsShown(_("Saving the credentials failed.")):
            if self.panel.save_credentials(*(edit.text for edit in edits)):
                for edit in edits:  # not left on screen
                    edit.clear()
        self.updateGui()

    def onForgetCredentials(self):
        with errorsShown(_("Forgetting the credentials failed.")):
            self.panel.forget_credentials()
        self.updateGui()

    def onSend(self):
        if self.panel.task:  # the button reads Cancel while a send runs: its sentence comes through tick
            self.panel.cancel()
            return self.updateGui()
        installed = packages.ensureSeg()  # highdicom, installed after asking (no wait cursor over the question)
        with errorsShown(_("Failed to start sending to the PACS."), waitCursor=True):
            parameterNode = self.parameterNode()
            self.panel.start(parameterNode.segmentation if parameterNode else None, self.context(), installed)
            if self.panel.task:
                self.timer.start()
        self.updateGui()

    def tick(self):
        if self.panel.task and self.panel.task.done():
            self.timer.stop()
            with errorsShown(_("Sending to the PACS failed.")):
                self.panel.finish()
            self.updateGui()

    def onShowReceived(self):
        """Points the inbox at the received folder of the listen OUTBOX the user chooses, and watches it."""
        chosen = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), _("The OUTBOX folder of segmentation-machine listen"))
        if not chosen:
            return
        if not self.inbox.point_at_received(Path(chosen)):
            self.ui.inboxStatusLabel.text = self.inbox.status
            return
        received = str(self.inbox.folder)
        if self.inbox.running:  # stops watching the other folder
            self.startStopInbox()
        self.ui.inboxFolderSelector.currentPath = received
        self.startStopInbox()  # the Start button's action: remembers the folder and starts watching it
