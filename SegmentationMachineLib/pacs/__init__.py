"""PACS: DICOMweb source and destination (dicomweb.py) and a DICOM node that receives C-STORE (dicomnode.py)."""
