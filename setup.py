from setuptools import find_packages, setup

setup(
    name="diffusers-entprune",
    version="0.1.0.dev0",
    description="Entropy-guided adaptive depth pruning (EntPruner) for diffusers DiT and SiT models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    include_package_data=True,
    package_data={"diffusers_entprune": ["assets/**/*", "evaluate_modules/*/*.py"]},
    python_requires=">=3.10",
    install_requires=[
        # A range, not a pin: an existing torch is never replaced (see README for this machine's CPU build).
        "torch>=2.1",
        "diffusers>=0.32",
        "transformers>=4.40",
        "accelerate>=0.30",
        "peft>=0.11",
        "datasets>=2.19",
        "safetensors>=0.4",
        "evaluate>=0.4",
        "torchmetrics>=1.4",  # FID, KID, Inception Score (with our feature networks; no torch-fidelity needed)
        "huggingface_hub>=0.23",
        "numpy",
        "pillow",
        "matplotlib",
        "tqdm",
        "torchdiffeq>=0.2",  # SiTPipeline's dopri5 sampler (the solver SiT's own code uses)
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6"],
        # scripts/ that rebuild the embedded assets, and bench/
        "dev": ["pytest>=7", "hypothesis>=6", "scikit-learn>=1.3", "scipy", "psutil"],
    },
    entry_points={"console_scripts": ["entprune=diffusers_entprune.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
