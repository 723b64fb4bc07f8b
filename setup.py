"""Lets Dataflow workers install this package (``--setup_file ./setup.py``).

All metadata, dependencies and package data (the terminology tables) live in pyproject.toml. The
one thing here is the optional compiled loop of the fast header scanner: where no C compiler is
present the build skips it and the scanner runs in pure Python, with the same results.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("beam_pipeline.dicom._walk", ["beam_pipeline/dicom/_walk.c"], optional=True)])
