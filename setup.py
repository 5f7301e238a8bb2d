"""Build hook for the native control loop; metadata lives in pyproject.toml."""

from setuptools import Extension, setup

fastloop = Extension(
    "gateway.control._fastloop",
    sources=["gateway/control/_fastloop.c", "gateway/control/fl_law.c"],
    depends=["gateway/control/fl_law.h", "gateway/control/fl_sync.h"],
    # -ffp-contract=off keeps a*b+c as two roundings, as numpy does, so the
    # C law and the numpy reference agree to the last bit on every target.
    extra_compile_args=[
        "-O2",
        "-Wall",
        "-Wextra",
        "-Wno-unused-parameter",
        "-std=gnu11",
        "-ffp-contract=off",
    ],
    libraries=["pthread", "rt", "m"],
)

setup(ext_modules=[fastloop])
