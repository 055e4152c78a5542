from setuptools import setup

# cffi has no declarative hook; build_ext.py lists one extension module per ISA level.
setup(cffi_modules=__import__("build_ext").cffi_modules())
