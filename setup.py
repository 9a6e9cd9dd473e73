"""megatron-mhc: mHC (manifold-constrained hyper-connections) for Megatron-LM core_v0.19.0.

The build system and tool settings are in pyproject.toml; the package layout is here. The
repository's top-level ``kernels/`` and ``patches/`` folders ship inside the package as
``megatron_mhc.kernels`` and ``megatron_mhc.patches`` (``package_dir``), so a wheel, an sdist and
an editable install all import the kernels and find the patch files. The kernels' subpackages
(``kernels/triton/``, ``kernels/tilelang/``, one module per op) are found under ``kernels/``.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'^__version__ = "([^"]+)"',
                    (HERE / "megatron_mhc" / "_version.py").read_text(), re.M).group(1)

setup(
    name="megatron-mhc",
    version=VERSION,
    description="Manifold-Constrained Hyper-Connections (mHC) for Megatron-LM / Megatron-Core",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_mhc", "megatron_mhc.*"])
    + ["megatron_mhc.kernels", "megatron_mhc.patches"]
    + [f"megatron_mhc.kernels.{name}" for name in find_packages(HERE / "kernels")],
    package_dir={"megatron_mhc.kernels": "kernels", "megatron_mhc.patches": "patches"},
    package_data={
        "megatron_mhc": ["data/*.gz", "data/*.md"],
        "megatron_mhc.patches": ["*.md", "*/*.patch", "*/*.json"],
        "megatron_mhc.kernels.cuda": ["*.cu"],
    },
    install_requires=["torch>=2.6", "megatron-core>=0.19.0,<0.20", "numpy", "tqdm", "psutil"],
    extras_require={
        "triton": ["triton>=3.2"],
        "tilelang": ["tilelang", "tile-kernels"],
        "te": ["transformer-engine[pytorch]"],
        "corpus": ["tokenizers"],
        "plots": ["matplotlib"],
        "dev": ["pytest>=8", "pytest-timeout", "pytest-random-order>=1.1", "matplotlib",
                "triton>=3.2", "tokenizers", "ruff==0.17.6", "build", "setuptools>=77"],
    },
    entry_points={"console_scripts": ["megatron-mhc=megatron_mhc.tools.cli:main"]},
)
