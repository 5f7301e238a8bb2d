"""The bessgw daemon: configuration, control, supervision, service and commissioning CLI."""

import os

# OpenBLAS starts a worker thread per core with its own buffers when numpy loads. The
# gateway's arrays are small, and once the fast loop locks the memory those buffers stay
# resident (40 MiB measured on 2 cores), so use one thread unless the environment sets it.
# This runs before any gateway module imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
