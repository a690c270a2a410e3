"""Installs the `frameselect_jax` library; every dependency version is pinned here, once."""

from setuptools import find_packages, setup

CORE = [
  "jax==0.10.2",
  "jaxlib==0.10.2",
  "flax==0.12.8",
  "optax==0.2.8",
  "orbax-checkpoint==0.12.8",
  "ml-collections==1.1.0",
  "absl-py==2.5.1",
  "numpy==2.4.6",
  "ml-dtypes==0.6.0",  # comes with jax; used to read bfloat16 safetensors without torch
  "safetensors==0.8.0",
  "transformers==5.23.0",  # tokenizers and configs only; no torch needed
  "tensorflow-datasets==4.9.10",
  "grain==0.2.18",
  "decord==0.6.0",
  "av==18.1.0",
  "tqdm==4.70.1",
  "tensorboardX==2.6.5",  # TensorBoard event files without TensorFlow (train/metrics.py)
  "matplotlib==3.11.2",
  "pillow==13.0.0",  # thumbnails and JPEG frames in records
  "pyarrow==26.0.1",  # Video-MME's annotation file is parquet (frameselect_jax/videoqa.py)
  "sentencepiece==0.2.3",  # SigLIP's own tokenizer (the text tower of the similarity peers)
  "openai==3.57.0",  # the OpenAI-compatible backend (frameselect_jax/mllm.py): vLLM, SGLang, ...
]
EXTRAS = {
  # PyTorch reference outputs in tests and the PyTorch backends (CPU build).
  "torch": ["torch==2.13.0"],
  # TPU runtime: ahead-of-time compilation for TPU topologies from a CPU host.
  # libtpu 0.0.42.1 is the build jax[tpu]==0.10.2 resolves to (it requires libtpu==0.0.42.*).
  "tpu": ["jax[tpu]==0.10.2", "libtpu==0.0.42.1"],
  # The formatter and linter (`make lint`, configured in .ruff.toml).
  "lint": ["ruff==0.17.6"],
  "test": [
    "pytest==9.2.0",
    "pytest-xdist==3.8.0",
    "hypothesis==6.170.15",
    "psutil==7.2.2",  # the planner test finds its compile worker processes
    # libtpu here too: the AOT-compile tests (tests/test_train_compile.py) need it, no TPU.
    "libtpu==0.0.42.1",
    # `transformers serve` (the real OpenAI-compatible server the backend is tested against):
    # transformers' "serving" extra, pinned.
    "fastapi==0.165.0",
    "uvicorn==0.54.0",
    "starlette==1.10.0",
    "pydantic==2.14.4",
    "rich==15.0.0",
    "accelerate==1.15.0",
  ],
}

setup(
  name="frameselect_jax",
  version="0.1.0",
  description="Question-aware video frame selection (M-LLM selector, CVPR 2025) in JAX/Flax NNX",
  packages=find_packages(include=["frameselect_jax", "frameselect_jax.*"]),
  python_requires=">=3.10",
  install_requires=CORE,
  extras_require=EXTRAS,
  entry_points={"console_scripts": ["frameselect=frameselect_jax.cli:run"]},
)
