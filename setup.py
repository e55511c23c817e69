"""The one compiled part of ckpt: byte planes moved by vectorized C loops (ckpt/codecs/_planes.c).

Optional: without a C compiler the install goes on and :mod:`ckpt.codecs.planes` uses numpy
(the same stored format, slower). Everything else is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ckpt.codecs._planes",
            sources=["ckpt/codecs/_planes.c"],
            extra_compile_args=["-O3"],  # gcc and clang vectorize the byte loops at -O3
            optional=True,
        )
    ]
)
