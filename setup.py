"""Build the Cython kernels under qmigx/_core.

A failed extension build fails the install: qmigx has no silent
pure-Python fallback. (The plain-Python twins in qmigx/reference are test
oracles, selected only with QMIGX_NO_EXTENSIONS=1 at run time.)

Environment:
    QMIGX_DEBUG_BUILD=1   -O0 -g, Cython bounds checks on (for debugging).
    QMIGX_ANNOTATE=1      write Cython's HTML annotation next to each .pyx.
    QMIGX_ONLY=a,b        build only these kernels (development convenience).
"""

import glob
import os
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("QMIGX_DEBUG_BUILD") == "1"

if sys.platform == "win32":  # pragma: no cover - not a supported host
    compile_args = ["/O2"]
elif DEBUG:
    compile_args = ["-O0", "-g3", "-UNDEBUG"]
else:
    # -O3 and nothing machine specific: SIMD paths are compiled with
    # per-function target attributes and chosen at run time.
    compile_args = ["-O3", "-DNDEBUG", "-fno-strict-aliasing"]

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
    "freethreading_compatible": True,
}

extensions = [
    Extension(
        "qmigx._core." + os.path.splitext(os.path.basename(path))[0],
        [path],
        include_dirs=[numpy.get_include(), "qmigx/_core"],
        extra_compile_args=compile_args,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for path in sorted(glob.glob("qmigx/_core/*.pyx"))
    if not os.environ.get("QMIGX_ONLY")
    or os.path.basename(path)[:-4] in os.environ["QMIGX_ONLY"].split(",")
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        annotate=os.environ.get("QMIGX_ANNOTATE") == "1",
    ),
)
