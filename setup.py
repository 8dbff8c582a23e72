from setuptools import find_packages, setup

setup(
    name="vtn-tf",
    version="0.1.0",
    description="Volume Tweening Network: unsupervised 3-D medical image registration in TensorFlow 2 / Keras 3",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vtn_tf", "vtn_tf.*", "data_prep", "data_prep.*"]),
    # One TensorFlow distribution, `tensorflow`, in every install: it runs on the CPU as it
    # is, and the `gpu` extra only adds its CUDA libraries (`tensorflow[and-cuda]`), so no
    # install ever holds two distributions of the `tensorflow` package (as tensorflow-cpu
    # plus tensorflow would).
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.10,<4",
        "numpy>=1.26,<3",
        "nibabel>=5.2,<6",
        "SimpleITK>=2.3,<3",
        "absl-py>=2.1,<3",
        "tensorboard>=2.19,<3",
        "scipy>=1.11,<2",
        # ISA-L's gzip: the .nii.gz outputs (two 3-component fields per pair) written 20x faster
        # than with zlib at the same level, in the same format (docs/performance.md).
        "isal>=1.6,<2",
    ],
    extras_require={
        "test": ["pytest>=8,<10", "ruff>=0.6,<1", "mypy>=1.11,<3"],
        "plot": ["matplotlib>=3.8,<4"],
        "gpu": ["tensorflow[and-cuda]>=2.21,<2.22"],
        "baselines": ["antspyx>=0.5,<1", "itk-elastix>=0.20,<1"],
    },
    entry_points={
        "console_scripts": [
            "vtn-train=vtn_tf.cli.train:run",
            "vtn-evaluate=vtn_tf.cli.evaluate:run",
            "vtn-register=vtn_tf.cli.register:run",
            "vtn-export=vtn_tf.cli.export:run",
            "vtn-prepare=data_prep.__main__:main",
            "vtn-demo=vtn_tf.cli.demo:run",
        ]
    },
)
