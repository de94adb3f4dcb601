from setuptools import setup

setup(
    name="lapdtr",
    version="0.1.0",
    description="Energy-aware, elastic, distributed vision models on torch.distributed (LAP-DTR)",
    python_requires=">=3.10",
    packages=[
        "lapdtr", "lapdtr.models", "lapdtr.profile", "lapdtr.energy", "lapdtr.plan",
        "lapdtr.runtime", "lapdtr.elastic", "lapdtr.summarize", "lapdtr.transfer", "lapdtr.data",
        "lapdtr.kernels", "lapdtr.configs",
    ],
    package_dir={"lapdtr.kernels": "kernels", "lapdtr.configs": "configs"},
    package_data={"lapdtr.configs": ["*.yaml", "devices/*.yaml"]},
    install_requires=[
        "torch>=2.4", "timm>=1.0.15", "torchvision", "numpy", "scipy", "pyyaml", "safetensors",
        "matplotlib", "tqdm", "psutil", "scikit-learn",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout", "hypothesis", "nvidia-ml-py"],
        "nvml": ["nvidia-ml-py"],
    },
    entry_points={"console_scripts": ["lapdtr=lapdtr.cli:main"]},
)
