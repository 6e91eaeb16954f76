"""The optional C extension; everything else about the package is in pyproject.toml.

`ltoflow._native` runs the loops ltoflow runs once per file or record (scan, layout, reading
and hashing, catalog encoding and decoding, verify's segment hashes) in C (see
ltoflow/_native.c). It needs a C compiler, Python's headers and OpenSSL's (libssl-dev). When
they are missing the build says so and goes on without it: ltoflow then does the same work in
Python, about half as fast on many small files.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ltoflow._native",
            sources=["ltoflow/_native.c"],
            libraries=["crypto"],
            extra_link_args=["-pthread"],
            extra_compile_args=[
                "-O2", "-pthread", "-Wall", "-Wextra", "-Wno-missing-field-initializers",
            ],
            optional=True,
        )
    ]
)
