"""zfkeras: Zeiler & Fergus (2013) in TensorFlow/Keras.

The library is the package `zfkeras`. The command-line tools in tools/ and the
serving code in export/ install as `zfkeras_tools` and `zfkeras_export`, so the
generic folder names never claim the top-level names `tools` or `export`.
"""

from setuptools import find_packages, setup

# Exact pins: zfkeras.distribute patches private code of this Keras release.
REQUIRES = [
    "tensorflow==2.21.0",
    "keras==3.15.1",
    "tensorflow-datasets==4.9.10",
    "tensorboard==2.21.0",
    "importlib_resources>=6",
    "numpy>=1.26,<3",
    "matplotlib>=3.8",
    "absl-py>=2.1",
    "pillow>=10",
]

setup(
    name="zfkeras",
    version="0.1.0",
    description="ZFNet, AlexNet and the Zeiler & Fergus deconvnet in TensorFlow/Keras",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["zfkeras", "zfkeras.*"]) + ["zfkeras_tools", "zfkeras_export"],
    package_dir={"zfkeras_tools": "tools", "zfkeras_export": "export"},
    package_data={"zfkeras_tools": ["configs/*.cfg"]},
    install_requires=REQUIRES,
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6", "ruff>=0.5"],
        "lite": ["ai-edge-litert==2.3.0"],
    },
    entry_points={
        "console_scripts": [
            "zfkeras-train=zfkeras_tools.train:run",
            "zfkeras-evaluate=zfkeras_tools.evaluate:run",
            "zfkeras-deconv=zfkeras_tools.deconv:run",
            "zfkeras-dataset-images=zfkeras_tools.dataset_images:run",
            "zfkeras-mine-top9=zfkeras_tools.mine_top9:run",
            "zfkeras-evolution=zfkeras_tools.evolution:run",
            "zfkeras-occlusion=zfkeras_tools.occlusion:run",
            "zfkeras-invariance=zfkeras_tools.invariance:run",
            "zfkeras-compare-filters=zfkeras_tools.compare_filters:run",
            "zfkeras-correspondence=zfkeras_tools.correspondence:run",
            "zfkeras-probe=zfkeras_tools.probe:run",
            "zfkeras-export=zfkeras_tools.export:run",
            "zfkeras-predict=zfkeras_tools.predict:run",
        ]
    },
)
