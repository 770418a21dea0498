"""The transfer syntaxes (pixel encodings) Slicer 5.10 reads: its DICOM reader is ITK 5.4's GDCMImageIO, with GDCM
3.0.24, whose codecs (RAW, JPEG, JPEG-LS, JPEG 2000 through OpenJPEG, RLE) decode the syntaxes below and no other.
GDCM knows HTJ2K only from 3.0.25 on, so an HTJ2K series must be transcoded before Slicer 5.10 can load it."""

from pydicom.uid import UID

from ..core.files import printable

DECODABLE = {
    "1.2.840.10008.1.2": "implicit VR little endian",
    "1.2.840.10008.1.2.1": "explicit VR little endian",
    "1.2.840.10008.1.2.1.99": "deflated explicit VR little endian",
    "1.2.840.10008.1.2.2": "explicit VR big endian",
    "1.2.840.113619.5.2": "GE implicit VR big endian",
    "1.2.840.10008.1.2.4.50": "JPEG baseline",
    "1.2.840.10008.1.2.4.51": "JPEG extended",
    "1.2.840.10008.1.2.4.52": "JPEG extended (process 3 and 5)",
    "1.2.840.10008.1.2.4.53": "JPEG spectral selection",
    "1.2.840.10008.1.2.4.55": "JPEG full progression",
    "1.2.840.10008.1.2.4.57": "JPEG lossless",
    "1.2.840.10008.1.2.4.70": "JPEG lossless (selection value 1)",
    "1.2.840.10008.1.2.4.80": "JPEG-LS lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS near-lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.4.92": "JPEG 2000 part 2 lossless",
    "1.2.840.10008.1.2.4.93": "JPEG 2000 part 2",
    "1.2.840.10008.1.2.5": "RLE lossless",
}
# Pixel data as it is stored (deflate compresses the whole dataset, which pydicom inflates as it reads); pydicom does
# not know GE's private syntax, and cannot say whether it is compressed.
UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
                "1.2.840.113619.5.2"}
# Names of recent syntaxes that pydicom 2.4 (Slicer's) does not know.
_NAMES = {
    "1.2.840.10008.1.2.4.201": "HTJ2K lossless", "1.2.840.10008.1.2.4.202": "HTJ2K lossless RPCL",
    "1.2.840.10008.1.2.4.203": "HTJ2K", "1.2.840.10008.1.2.4.110": "JPEG XL lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG recompression", "1.2.840.10008.1.2.4.112": "JPEG XL",
    "1.2.840.10008.1.2.8.1": "deflated image frame compression",
}
# JPEG's DCT processes lose detail by their nature; other syntaxes may, which the header's LossyImageCompression says.
LOSSY_JPEG = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.52", "1.2.840.10008.1.2.4.53",
              "1.2.840.10008.1.2.4.55"}
CANNOT_DECODE = "which Slicer 5.10 cannot decode"
ASK_FOR_DECODABLE = "have the series sent uncompressed (explicit VR little endian) or as JPEG 2000"


def undecodable(uid) -> str:
    """'encoded as NAME (UID), which Slicer 5.10 cannot decode' for a syntax outside DECODABLE; '' for one in it,
    or for none given (pydicom reads such a file as implicit VR little endian)."""
    uid = str(uid or "").strip()
    if not uid or uid in DECODABLE:
        return ""
    name = _NAMES.get(uid) or UID(uid).name
    encoding = f"encoded as {name} ({uid})" if name != uid else f"encoded in transfer syntax {printable(uid)}"
    return f"{encoding}, {CANNOT_DECODE}"


def lossy_compression(uid, flag) -> str:
    """How the pixels lost detail to compression, where the header says they did (LossyImageCompression (0028,2110)
    '01', kept when they were decompressed later) or the syntax is lossy by its nature; '' otherwise."""
    uid = str(uid or "").strip()
    if uid in LOSSY_JPEG:
        return DECODABLE[uid]
    if str(flag or "").strip() == "01":
        return "a lossy compression" if uid in UNCOMPRESSED else DECODABLE.get(uid, undecodable(uid) or uid)
    return ""
