"""Input: DICOM folders by content, series, volumes (DICOM, NIfTI, NRRD), safe zips, the phantom."""
