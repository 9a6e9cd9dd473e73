"""megatron-mhc: mHC (manifold-constrained hyper-connections) for Megatron-LM core_v0.19.0."""

from setuptools import find_packages, setup

packages = find_packages(include=["megatron_mhc", "megatron_mhc.*"]) + ["megatron_mhc.kernels"]

setup(
    name="megatron-mhc",
    version="0.1.0",
    description="Manifold-Constrained Hyper-Connections (mHC) for Megatron-LM / Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.12",
    packages=packages,
    # Kernel sources live in the top-level kernels/ folder; megatron_mhc/kernels is a symbolic
    # link to it, so they ship (and import, installed or not) as megatron_mhc.kernels.
    package_data={
        "megatron_mhc": ["data/*.gz", "data/*.md", "patches/*/*.patch", "patches/*/*.json"]
    },
    install_requires=["torch>=2.6", "megatron-core==0.19.0", "numpy", "tqdm", "psutil"],
    extras_require={
        "triton": ["triton>=3.2"],
        "tilelang": ["tilelang", "tile-kernels"],
        "te": ["transformer-engine[pytorch]"],
        "corpus": ["tokenizers"],
        "dev": ["pytest>=8", "pytest-timeout", "matplotlib", "triton>=3.2", "tokenizers"],
    },
    entry_points={"console_scripts": ["megatron-mhc=megatron_mhc.cli:main"]},
)
