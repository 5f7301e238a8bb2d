"""Build hook for the native control loop; metadata lives in pyproject.toml."""

from setuptools import setup

setup()
