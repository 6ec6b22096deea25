"""The C extension; everything else about the package is in pyproject.toml.

``moviematch_ml._trees`` evaluates the tree models several times faster than numpy (docs/performance.md). It is
optional: where no C compiler is available the package still installs, and ``model.TreeEnsemble`` runs on numpy.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "moviematch_ml._trees",
            sources=["src/moviematch_ml/_trees.c"],
            # -O3 vectorises the per-tree AND loops; no -march: a wheel or image must run on any x86-64 or ARM CPU.
            extra_compile_args=["-O3", "-std=c11"],
            optional=True,
        )
    ]
)
