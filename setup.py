"""Build script. Pure Python for now: the `pgnas_fast._C` extension (csrc/, kernels/) arrives with
the C++/CUDA backend issue, and the package works without it (the `reference` backend)."""
from setuptools import setup

setup()
