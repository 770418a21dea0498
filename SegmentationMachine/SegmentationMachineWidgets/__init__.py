"""The module's section bindings (Qt), in a package: Slicer loads every .py file directly in a module folder
as a module of its own, so only SegmentationMachine.py sits there."""

import contextlib


@contextlib.contextmanager
def errorsShown(message: str, waitCursor: bool = False):
    """Shows an error as slicer.util.tryWithErrorDisplay does, then carries on: that one re-raises
    (Base/Python/slicer/util.py), which would skip the rest of a timer tick or a button's update."""
    import slicer

    try:
        with slicer.util.tryWithErrorDisplay(message, waitCursor=waitCursor):
            yield
    except Exception:  # already shown to the user, with its details
        pass


def setPlainText(edit, text: str):
    """Only where it changed: setting a text box's text resets the user's scroll and selection in it, and the
    inbox updates the panel every 250 ms."""
    if edit.plainText != text:
        edit.plainText = text


def labelChoices(combo, choices: dict):
    """connectGui fills a Choice's combo box with its raw values ("bone", "LPS") and reads it back by index: each of
    those items then says what it is, with a tooltip. choices: value → (text, tooltip)."""
    import qt

    for index in range(combo.count):
        if combo.itemText(index) in choices:  # not yet relabelled (connectGui refills only when it connects)
            text, tooltip = choices[combo.itemText(index)]
            combo.setItemText(index, text)
            combo.setItemData(index, tooltip, qt.Qt.ToolTipRole)


def timer(interval_ms: int, slot):
    """A QTimer that calls slot every interval_ms once started, never inside itself: a slot that runs Qt's event loop
    (the DICOM indexer waits in one while the inbox loads a series) was called again halfway, and the older series
    ended up loaded last, shown and chosen for prompts."""
    import qt

    running = []

    def once():
        if not running:
            running.append(slot)
            try:
                slot()
            finally:
                running.clear()

    result = qt.QTimer()
    result.setInterval(interval_ms)
    result.timeout.connect(once)
    return result


SETTINGS_ORCASLICER = "SegmentationMachine/OrcaSlicerPath"


def sendToOrcaSlicer(export):
    """export (ExportPanel): its last export to OrcaSlicer; where OrcaSlicer is not found, the user is asked where it
    is (the answer kept in Slicer's settings). OrcaSlicer gets Slicer's startup environment: Slicer's launcher puts
    its own libraries on the library path."""
    import qt
    import slicer
    from slicer.i18n import tr as _

    environment = dict(slicer.util.startupEnvironment())
    export.send_to_printer(slicer.util.settingsValue(SETTINGS_ORCASLICER, ""), environment)
    if export.orcaslicer_missing:
        path = qt.QFileDialog.getOpenFileName(None, _("Where is OrcaSlicer? (its program, or OrcaSlicer.app)"))
        if path:
            qt.QSettings().setValue(SETTINGS_ORCASLICER, path)
            export.send_to_printer(path, environment)
