"""Read mammography DICOM files the way a viewer displays them.

:func:`read_pixels` returns the image in *presentation space*: stored values decoded (pydicom's
pixel backends handle JPEG, JPEG-LS, JPEG 2000 and RLE through the installed pylibjpeg / pyjpegls
plugins), passed through the modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence) and,
for MONOCHROME1 images, mirrored so that higher values are brighter (dense tissue bright) as in a
MONOCHROME2 image. :func:`display_window` returns the DICOM display window in that same space, so a
MONOCHROME1 file and its MONOCHROME2 twin give the same pixels *and* the same window.

:func:`check_complete` catches files cut short: pydicom reads a truncated file without complaint
(the last value is simply shorter), so the declared element lengths are compared with the file size.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut
from pydicom.pixels.utils import get_expected_length

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_UNDEFINED_LENGTH = 0xFFFFFFFF


class DicomReadError(ValueError):
    """A DICOM file cannot be turned into a presentation-space image; the message says why."""


class TruncatedFileError(DicomReadError):
    """The file ends before the data its header declares."""


def read_dataset(path: str | Path) -> Dataset:
    """Read a DICOM Part 10 file (header and pixel data); raise on a non-DICOM or truncated file.

    ``pydicom.errors.InvalidDicomError`` (no DICM preamble / File Meta) propagates unchanged so the
    caller can tell "not DICOM" from other failures. The file is read in one call and parsed from
    memory (pydicom otherwise issues a read per element); ``ds.filename`` is the path as usual.
    """
    data = Path(path).read_bytes()
    ds = pydicom.dcmread(DicomBytesIO(data))
    ds.filename = os.fspath(path)
    check_complete(ds, len(data))
    return ds


# Values longer than this stay in the file when only the header is wanted (read_header): the
# pixel data (a 2850 x 2394 16-bit frame is 13.6 MB, a 96-row test image 15 KB) and any other
# bulk value (ICC profile, overlay); the attributes ingest reads are a few bytes each, and a
# deferred value that is used after all is read from the file then.
DEFERRED_VALUE_BYTES = 4096


def read_header(path: str | Path) -> Dataset:
    """Read a DICOM Part 10 file's header; the pixel data stay in the file until they are used.

    Like :func:`read_dataset` (same errors, the same truncation check: a deferred element still
    declares its length and where its value starts), but values over
    :data:`DEFERRED_VALUE_BYTES` are not read: ``ds.PixelData`` reads them from ``ds.filename``
    when asked, and :func:`read_pixels` reads native pixel data straight into an array. Ingest
    needs no pixel value of a native file (:func:`check_pixel_data` checks its length), and
    preprocessing reads them once, without pydicom's copy of the whole file.
    """
    ds = pydicom.dcmread(path, defer_size=DEFERRED_VALUE_BYTES)
    check_complete(ds, os.stat(path).st_size)
    return ds


def _deferred_pixel_data(ds: Dataset) -> RawDataElement | None:
    """The PixelData element when its value is still in the file (read_header), else None."""
    element = ds.get_item("PixelData", keep_deferred=True)
    if isinstance(element, RawDataElement) and element.value is None:
        return element
    return None


def _pixel_data_length(ds: Dataset) -> int:
    """Bytes of pixel data, without reading a deferred value."""
    deferred = _deferred_pixel_data(ds)
    return deferred.length if deferred is not None else len(ds.PixelData)


def check_complete(ds: Dataset, size: int) -> None:
    """Raise :class:`TruncatedFileError` when a top-level element runs past the end of the file.

    ``size`` is the file's size in bytes. Elements still held raw (pydicom converts
    lazily) remember where their value starts (``value_tell``) and how long the header says it is;
    a value that would end after the last byte of the file means the file was cut short.
    """
    for raw in ds.values():  # the elements as stored: converted ones are DataElement, skipped
        if not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED_LENGTH:
            continue
        end = raw.value_tell + raw.length
        if end > size:
            raise TruncatedFileError(
                f"truncated file: element {raw.tag} declares {raw.length} bytes ending at byte {end}, "
                f"but the file has only {size} bytes"
            )


def stored_value_range(ds: Dataset) -> tuple[int, int]:
    """Smallest and largest value the stored pixels can hold (BitsStored, PixelRepresentation)."""
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def presentation_range(ds: Dataset) -> tuple[float, float]:
    """The stored-value range mapped through the modality LUT: the span MONOCHROME1 mirrors over."""
    lo, hi = stored_value_range(ds)
    rescale = _rescale(ds)
    if rescale is not None:  # what apply_modality_lut computes, without an array round trip
        slope, intercept = rescale
        ends = (lo * slope + intercept, hi * slope + intercept)
        return float(min(ends)), float(max(ends))
    ends = np.asarray(apply_modality_lut(np.array([lo, hi]), ds), dtype=np.float64)
    return float(ends.min()), float(ends.max())


def _rescale(ds: Dataset) -> tuple[float, float] | None:
    """``(slope, intercept)`` when the modality LUT is a rescale (or nothing: ``(1, 0)``); None for a
    Modality LUT Sequence or anything :func:`apply_modality_lut` should judge itself."""
    if ds.get("ModalityLUTSequence"):
        return None
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = ds.RescaleSlope, ds.RescaleIntercept
        if isinstance(slope, (int, float)) and isinstance(intercept, (int, float)):
            return float(slope), float(intercept)
        return None
    return 1.0, 0.0


def _photometric(ds: Dataset) -> str:
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in MONOCHROME:
        raise DicomReadError(
            f"PhotometricInterpretation {photometric or 'missing'!r} is not MONOCHROME1 or MONOCHROME2"
        )
    return photometric


# (BitsAllocated, PixelRepresentation) -> little-endian dtype of native (uncompressed) pixel data
_NATIVE_DTYPES = {(8, 0): "<u1", (8, 1): "<i1", (16, 0): "<u2", (16, 1): "<i2", (32, 0): "<u4", (32, 1): "<i4"}


def _native_frame(ds: Dataset) -> np.ndarray | None:
    """Stored values of one little-endian native grey-scale frame, exactly as ``ds.pixel_array``.

    Native pixel data is the values themselves, so this is a read-only view on ``ds.PixelData``,
    or one ``np.fromfile`` of them when :func:`read_header` left them in the file (unused high bits
    are cleared as pydicom does, on a copy, only when some pixel has them set).
    It skips pydicom's decoder set-up, which costs about as much as parsing the whole header of a
    small image. Returns None for anything else (compressed, big endian, several frames or
    samples, unusual bit depths, short pixel data, unreadable attributes): :func:`read_pixels`
    then asks pydicom, which also words the errors.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None or syntax.is_encapsulated or not syntax.is_little_endian:
        return None
    try:
        if int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            return None
        allocated = int(ds.get("BitsAllocated") or 0)
        signed = int(ds.get("PixelRepresentation", 0) or 0)
        stored_bits = int(ds.get("BitsStored") or allocated)
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        return None
    dtype = _NATIVE_DTYPES.get((allocated, signed))
    if dtype is None or not 0 < stored_bits <= allocated or rows < 1 or columns < 1:
        return None
    count = rows * columns
    deferred = _deferred_pixel_data(ds)
    if deferred is not None:  # read_header left the values in the file: one read, no copy via bytes
        if deferred.length < count * allocated // 8 or not isinstance(ds.filename, str):
            return None
        stored = np.fromfile(ds.filename, dtype=dtype, count=count, offset=deferred.value_tell)
        if stored.size != count:  # the file shrank since its header was read
            return None
    else:
        data = ds.PixelData
        if not isinstance(data, bytes) or len(data) < count * allocated // 8:
            return None
        stored = np.frombuffer(data, dtype=dtype, count=count)
    stored = stored.reshape(rows, columns)
    if stored_bits < allocated:
        lo, hi = stored_value_range(ds)
        if stored.max() > hi or (signed and stored.min() < lo):
            shift = allocated - stored_bits  # pydicom's correct_unused_bits
            stored = np.right_shift(np.left_shift(stored, shift), shift)
    return stored


def _modality_lut_float32(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """``apply_modality_lut(stored, ds)`` as float32, without pydicom's float64 copy when it is identity."""
    if _rescale(ds) == (1.0, 0.0):
        return stored.astype(np.float32)
    return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)


def read_pixels(source: str | Path | Dataset, out: np.ndarray | None = None) -> np.ndarray:
    """The image in presentation space as float32 (rows, columns): dense tissue bright.

    Applies the modality LUT, then mirrors MONOCHROME1 images over :func:`presentation_range`
    (``lo + hi - value``), which maps a MONOCHROME1 file whose stored values are ``max - s`` onto
    exactly the pixels of its MONOCHROME2 twin with stored values ``s``. Raises
    :class:`DicomReadError` for pixel data that cannot be decoded or is not one grey-scale frame.

    ``out``: a float32 array (any strides: a mirrored view, a region of a larger one) of the
    image's shape to write the values into and return, instead of a new array: the same values,
    without a full-size intermediate where the modality LUT is the identity.
    """
    ds = read_dataset(source) if isinstance(source, (str, Path)) else source
    photometric = _photometric(ds)
    if "PixelData" not in ds:
        raise DicomReadError("no pixel data")
    stored = _native_frame(ds)
    if stored is None:
        try:
            stored = ds.pixel_array
        except Exception as exc:  # every decoder plugin raises its own type; the message is the reason
            raise DicomReadError(f"corrupt pixel data: {exc}") from exc
    if stored.ndim != 2:
        raise DicomReadError(f"expected one grey-scale frame, got pixel array of shape {stored.shape}")
    if out is not None and (out.shape != stored.shape or out.dtype != np.float32):
        raise ValueError(f"read_pixels: out is {out.dtype} {out.shape}, not float32 {stored.shape}")
    mirror = np.float32(sum(presentation_range(ds))) if photometric == "MONOCHROME1" else None
    if out is not None and _rescale(ds) == (1.0, 0.0):  # identity LUT: cast straight into out
        if mirror is None:
            np.copyto(out, stored, casting="unsafe")  # exactly stored.astype(np.float32)
        else:
            np.subtract(mirror, stored, out=out, dtype=np.float32)  # float32(lo + hi) - float32(s), as below
        return out
    pixels = _modality_lut_float32(stored, ds)
    if mirror is not None:
        pixels = mirror - pixels
    if out is not None:
        out[...] = pixels
        return out
    return pixels


def check_pixel_data(ds: Dataset) -> None:
    """Raise :class:`DicomReadError` unless the pixel data is one intact grey-scale frame.

    Compressed pixel data is decoded (only a decoder can tell it is intact). Native pixel data
    cannot be corrupt in any other way than its length, which is checked without decoding: that
    is all decoding it would check, and it halves the cost of ingesting a native file.
    """
    _photometric(ds)
    if "PixelData" not in ds:
        raise DicomReadError("no pixel data")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DicomReadError("expected one grey-scale frame")
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        read_pixels(ds)
        return
    expected, actual = get_expected_length(ds), _pixel_data_length(ds)
    if actual < expected:
        raise DicomReadError(f"corrupt pixel data: {actual} bytes where Rows x Columns x BitsAllocated need {expected}")


def _first(value: object) -> float:
    """WindowCenter/WindowWidth may hold several windows (multi-valued); the first is the default."""
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0]
    return float(value)


def display_window(ds: Dataset) -> tuple[float, float]:
    """The DICOM display window ``(center, width)`` in :func:`read_pixels` space.

    Taken from WindowCenter/WindowWidth (first value when several are given). For MONOCHROME1 the
    centre is mirrored like the pixels. Fallback when the file has no usable window: the full range
    of stored values through the modality LUT, i.e. clipping to it changes nothing and contrast
    stretching reduces to plain min-max normalisation (as the authors did for windowless JPEGs).
    """
    lo, hi = presentation_range(ds)
    try:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    except (AttributeError, IndexError, TypeError, ValueError):
        center, width = None, None
    if center is None or not np.isfinite(center) or not np.isfinite(width) or width < 1:
        return (lo + hi) / 2.0, hi - lo
    if _photometric(ds) == "MONOCHROME1":
        center = lo + hi - center
    return center, width
