"""b-bit integer codes packed densely into uint32 words along the last axis: the layout the
decode kernels read, defined in ``pallas_kernels.packing`` (kernels import nothing from
``lib``) and re-exported here for the stores and methods that pack.
"""

from kvlab.pallas_kernels.packing import (SUPPORTED_BITS, check_bits, check_packable, pack,
                                          packed_size, per_word, period, unpack)

__all__ = ["SUPPORTED_BITS", "check_bits", "check_packable", "pack", "packed_size", "per_word",
           "period", "unpack"]
