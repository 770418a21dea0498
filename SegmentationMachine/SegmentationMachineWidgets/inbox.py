"""The Inbox section's Slicer side: a delivered series into Slicer's DICOM database and the scene, and into the
slice views. What is loaded, and whether it becomes the source volume, is InboxPanel's (the library)."""

import logging

import slicer

from SegmentationMachineLib.core.errors import UserError
from SegmentationMachineLib.dicom.volumes import load_series
from SegmentationMachineLib.panels.inbox import unexpected_failure


def loadDelivery(context, delivery, copyFiles=False):
    """Adds the delivered files (only those) to Slicer's DICOM database, then loads the series (not shown: see
    showVolume). context: the module logic's SceneContext; copyFiles: the database keeps its own copy (files the inbox
    removes later: an unpacked zip's). Raises UserError, whose sentence goes into the series' row: also for a bug of
    ours, which would otherwise leave the timer tick, and the series (and the others of that tick) with no row."""
    files = [str(path) for path in delivery.series.files]
    try:
        import ctk
        indexer = ctk.ctkDICOMIndexer()
        # The database is an argument (ctkDICOMIndexer has no database property; DICOMUtils does the same).
        indexer.addListOfFiles(slicer.dicomDatabase, files, copyFiles)
        indexer.waitForImportFinished()
    except Exception as error:  # the database is a convenience: the scene still gets the series
        logging.warning("Could not add %s to the DICOM database: %s", delivery.series.name, error)
    try:
        return load_series(context, delivery.series)  # its notes go to the inbox's row
    except UserError:
        raise
    except Exception as error:  # the details to the log only: an error's text may quote a header value
        logging.exception("Loading %s failed", delivery.series.name)
        raise UserError(unexpected_failure(delivery.series.name)) from error


def showVolume(volume):
    """The Volumes logic loads without showing: the series goes into the slice views."""
    slicer.util.setSliceViewerLayers(background=volume, fit=True)
