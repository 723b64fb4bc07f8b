"""Lets Dataflow workers install this package (``--setup_file ./setup.py``).

All metadata, dependencies and package data (the terminology tables) live in pyproject.toml.
"""
from setuptools import setup

setup()
