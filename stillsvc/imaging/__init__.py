"""Image data: one raw layout, its stream format, and the encoders every front-end uses.

Raw image layout
================

Everything in the service that carries pixels uses one layout, described by
:class:`ImageInfo`: rows top to bottom, no padding between rows, each row
``bytes_per_line`` long.

* ``color``: interleaved R, G, B samples; ``gray``: one sample per pixel.
  Samples are 8 bits, or 16 bits stored big-endian (most significant byte
  first).
* ``lineart``: 1 bit per pixel, most significant bit = leftmost pixel, every row
  padded with zero bits to a whole byte.  The PBM convention is used
  throughout: **bit 1 = black, bit 0 = white**.  Encoders whose format uses the
  opposite convention (PNG, JPEG via Pillow) invert on output; TIFF
  (PhotometricInterpretation WhiteIsZero) and PDF (``/Decode [1 0]``) declare
  the convention instead.

The raw stream format is in :mod:`.raw`, the encoders in :mod:`.encoders`; the
simulated scanner's test pattern lives with it (:mod:`stillsvc.drivers.sim.pattern`).
"""

from stillsvc.imaging.encoders import (
    Encoder,
    JpegEncoder,
    PdfEncoder,
    PngEncoder,
    PnmEncoder,
    RawEncoder,
    TiffEncoder,
    make_encoder,
)
from stillsvc.imaging.info import COLOR_MODES, FORMATS, MULTIPAGE_FORMATS, RAW_HEADER, RAW_MAGIC, RAW_VERSION, ImageInfo
from stillsvc.imaging.raw import parse_raw

__all__ = [
    "COLOR_MODES", "FORMATS", "MULTIPAGE_FORMATS", "RAW_MAGIC", "RAW_VERSION", "RAW_HEADER", "ImageInfo",
    "parse_raw", "Encoder", "RawEncoder", "PnmEncoder", "PngEncoder", "TiffEncoder", "JpegEncoder", "PdfEncoder",
    "make_encoder",
]
