#!/usr/bin/env bash
# Download the wheels that the GPU benchmark (benchmarks/gpu.py) needs beyond a CUDA PyTorch image
# (which usually carries torch, torchvision, transformers, timm and numpy), for a host without a
# network. Usage: scripts/offline_wheels.sh DIR [PYTHON_VERSION]   (default 3.12)
# On the host: pip install --no-index --no-deps --target SITE DIR/*.whl; PYTHONPATH=SITE:src python benchmarks/gpu.py
set -euo pipefail
dir=${1:?usage: scripts/offline_wheels.sh DIR [PYTHON_VERSION]}
version=${2:-3.12}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
# open_clip (a peer of the image, train sections), its tokenizer's ftfy; the service's stack (serve section)
for package in open_clip_torch==3.3.0 ftfy wcwidth fastapi starlette uvicorn httptools python-multipart \
    faiss-cpu annotated-types pydantic pydantic-core typing-inspection; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    "${platforms[@]}" -d "$dir" "$package"
done
ls "$dir"
