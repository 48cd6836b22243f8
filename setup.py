"""Package discovery (everything else is in pyproject.toml): the folder kernels/ installs as `superlinear_kernels`,
a rename that pyproject's `packages.find` cannot express, so every subpackage of both is found here instead of
being listed by hand (a new subpackage can then never be left out of the wheel)."""
from setuptools import find_packages, setup

setup(packages=["superlinear_kernels", *(f"superlinear_kernels.{p}" for p in find_packages("kernels")),
                *find_packages(include=["superlinear_lab", "superlinear_lab.*"])])
