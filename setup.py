"""Packaging is configured in pyproject.toml; this only adds what its tables cannot express: the
benchmark scripts in ``benchmarks/`` ship inside the wheel as ``voxflow/_benchmarks`` (for ``voxflow bench``)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["voxflow", "voxflow.*"]), "voxflow._benchmarks"],
    package_dir={"voxflow._benchmarks": "benchmarks"},
)
