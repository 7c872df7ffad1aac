"""janus_rt: builds the pybind11 extension janus_rt._C from csrc/ and installs kernels/ as janus_rt.kernels."""
import glob
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

here = os.path.dirname(os.path.abspath(__file__))

# One extension, one .cpp per op plus bindings.cpp; OpenMP for the CPU kernels, native ISA where allowed.
# -ffp-contract=off: no implicit a*b+c fusion, so scalar code rounds like the PyTorch references (cfg_sample
# must match them bit for bit); the vector kernels use explicit FMA intrinsics.
cxx_flags = ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"]
if os.environ.get("JANUS_RT_PORTABLE", "0") != "1":
    cxx_flags.append("-march=native")
# Extra flags for tuning builds, after the defaults (setuptools does not pass CFLAGS to this compile), e.g.
# JANUS_RT_CXXFLAGS="-DJR_LINEAR_RN_BF16DOT=4 -mno-avx512bf16" python setup.py build_ext --inplace
cxx_flags += os.environ.get("JANUS_RT_CXXFLAGS", "").split()
ext = Pybind11Extension(
    "janus_rt._C",
    sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
    include_dirs=["csrc"],
    depends=sorted(glob.glob(os.path.join("csrc", "*.h"))),  # a header edit rebuilds every .cpp
    extra_compile_args=cxx_flags,
    extra_link_args=["-fopenmp"],
)

setup(
    name="janus_rt",
    version="0.1.0",
    description="A lean, fast runtime for DeepSeek Janus-Pro: Triton kernels, paged KV cache, CPU kernels, training.",
    packages=["janus_rt", "janus_rt.models", "janus_rt.engine", "janus_rt.train", "janus_rt.kernels"],
    package_dir={"janus_rt.kernels": "kernels"},
    package_data={"janus_rt": ["assets/*/*"]},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "numpy",
        "safetensors>=0.4",
        "tokenizers>=0.21",  # decoders.DecodeStream
        "Pillow>=10",
        "tqdm",
        "prometheus_client>=0.17",  # serve's GET /metrics
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "transformers>=5.0",
                              "openai>=1.0"]},  # (serve's OpenAI-compatible endpoints, tested through its SDK)
    entry_points={"console_scripts": ["janus-rt=janus_rt.cli:main"]},
)
