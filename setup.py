from setuptools import find_packages, setup

# The Triton kernels live in the top-level folder kernels/ but install as dsrna.kernels
# (a top-level module named `kernels` belongs to another package).
setup(
    packages=find_packages(include=["dsrna", "dsrna.*"]) + ["dsrna.kernels"],
    package_dir={"dsrna": "dsrna", "dsrna.kernels": "kernels"},
)
