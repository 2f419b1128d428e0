from setuptools import find_packages, setup

setup(
    name="minigen",
    version="0.1.0",
    description="Readable, exact, pure-PyTorch Stable Diffusion / SDXL / FLUX with first-class personalization controls",
    packages=[*find_packages(include=["minigen", "minigen.*"]), "minigen.weights"],
    # the toy models: weights/ installed as the package minigen.weights, its files as package data
    package_dir={"minigen.weights": "weights"},
    package_data={"minigen.weights": ["README.md", "*.safetensors", "toy-flux/**/*", "toy-sd-ip-adapter/**/*", "toy-flux-omini/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "safetensors",
        "transformers",
        "sentencepiece",
        "einops",
        "numpy",
        "pillow",
        "huggingface_hub",
        "tqdm",
    ],
    extras_require={"test": ["pytest", "diffusers>=0.30", "torch_kmeans==0.2.0"]},
)
