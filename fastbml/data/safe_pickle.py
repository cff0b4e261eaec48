"""Dataset pickles read without executing code: only numpy arrays, lists, dicts and scalars.

`pickle.load` runs whatever callable a file names; `load` builds only the few globals a pickled
numpy array, dtype or scalar needs (and OrderedDict), and refuses anything else with an
`UnpicklingError` that names the global. Python 2 pickles (MulT's MOSI/MOSEI files) are read
with latin-1 strings, as numpy needs.
"""

from __future__ import annotations

import codecs
import collections
import pickle
from typing import BinaryIO

import numpy as np

# (module, name) -> object, for every global a pickled array / dtype / scalar refers to.
_ALLOWED: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): codecs.encode,  # bytes in protocol 2 pickles
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_module, "_reconstruct")] = np._core.multiarray._reconstruct
    _ALLOWED[(_module, "scalar")] = np._core.multiarray.scalar
for _module in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_module, "_frombuffer")] = np._core.numeric._frombuffer
for _name in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
              "uint16", "uint32", "uint64", "bool_"):
    _ALLOWED[("numpy", _name)] = getattr(np, _name)
_ALLOWED[("numpy.dtypes", "Float32DType")] = type(np.dtype(np.float32))


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: a dataset pickle may hold only numpy "
                "arrays, lists, dicts and scalars") from None


def load(fh: BinaryIO) -> object:
    """Unpickle a dataset file restricted to numpy arrays, lists, dicts and scalars."""
    return _Restricted(fh, encoding="latin1").load()
