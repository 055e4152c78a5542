import os
import sys

from setuptools import setup

# cffi has no declarative hook; build_ext.py lists one extension module per ISA level.
# (setuptools.build_meta does not put this directory on sys.path, so do it here.)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build_ext  # noqa: E402

setup(cffi_modules=build_ext.cffi_modules(), cmdclass=build_ext.cmdclass())
