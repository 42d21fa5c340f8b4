"""Builds keystile's optional C extension, ``keystile._speedups`` (the cache-hit path).

Everything else is in pyproject.toml. As MarkupSafe does, a failed build is not an error:
without a compiler (or with ``KEYSTILE_NO_EXTENSION=1``) keystile installs with its
pure-Python path, which ``keystile._accel`` then picks at import.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except PlatformError as exc:
            _warn(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except (CCompilerError, ExecError, PlatformError, ValueError) as exc:
            _warn(exc)


def _warn(exc: Exception) -> None:
    print(
        f"WARNING: keystile._speedups was not built ({exc}); keystile runs its pure-Python "
        "cache-hit path.",
        file=sys.stderr,
    )


extensions = []
if os.environ.get("KEYSTILE_NO_EXTENSION") != "1" and sys.implementation.name == "cpython":
    extensions.append(
        Extension(
            "keystile._speedups",
            ["src/keystile/_speedups.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    )

setup(ext_modules=extensions, cmdclass={"build_ext": OptionalBuildExt})
