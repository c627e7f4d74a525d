"""Packaging for ijepa-hf.

The `configuration/` data folder (model presets, training recipes, accelerate configs) ships inside the wheel as
`modeling_ijepa._configuration`, so presets resolve by name after a regular (non-editable) install too.
"""

from setuptools import setup


setup(
    name="ijepa-hf",
    version="0.1.0",
    description=(
        "I-JEPA (Assran et al., CVPR 2023) for the Hugging Face ecosystem: models, masking, pre-training and "
        "evaluation."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "modeling_ijepa",
        "modeling_ijepa.data",
        "modeling_ijepa.evaluation",
        "modeling_ijepa.masking",
        "modeling_ijepa._configuration",
    ],
    package_dir={"modeling_ijepa": "modeling_ijepa", "modeling_ijepa._configuration": "configuration"},
    package_data={
        "modeling_ijepa": ["metrics/accuracy/*.py"],
        "modeling_ijepa._configuration": ["models/*.json", "recipes/*.yaml", "accelerate/*.yaml", "slurm/*.sbatch"],
    },
    include_package_data=True,
    # torch is deliberately unpinned: GPU users bring their own CUDA build; CI installs the CPU wheel first.
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "datasets>=3.0",
        "evaluate>=0.4",
        "safetensors>=0.4",
        "pillow>=10",
        "simplejpeg>=1.8",
        "numpy",
        "pyyaml",
        "matplotlib",
        "tqdm",
        "scikit-learn>=1.3",
    ],
    # ruff is pinned: its rules and formatting change between releases, and CI lints with it.
    extras_require={"dev": ["pytest>=8", "scikit-learn>=1.3", "ruff==0.17.6"]},
)
