"""The C extensions; everything else about the package is in pyproject.toml.

``moviematch_ml.runtime._trees`` evaluates the tree models several times faster than numpy,
``moviematch_ml.runtime._codec`` runs the per-movie loops of /predict-batch and the fold-in (docs/performance.md).
Both are optional: where no C compiler is available the package still installs, and the same work is done in numpy
and Python (``moviematch_ml.runtime.native`` holds both).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "moviematch_ml.runtime._trees",
            sources=["src/moviematch_ml/runtime/_trees.c"],
            # -O3 vectorises the per-tree AND loops; no -march: a wheel or image must run on any x86-64 or ARM CPU.
            extra_compile_args=["-O3", "-std=c11"],
            optional=True,
        ),
        Extension(
            "moviematch_ml.runtime._codec",
            sources=["src/moviematch_ml/runtime/_codec.c"],
            extra_compile_args=["-O2", "-std=c11"],
            optional=True,
        ),
    ]
)
