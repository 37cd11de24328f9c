# vlcp on CUDA. Build: docker build -t vlcp .
# Run:   docker run --gpus all -v "$PWD/cache:/cache" -v "$PWD/data:/data" -v "$HOME/.cache/huggingface:/hf" \
#          -v "$PWD/out:/out" vlcp distill --data imagenette --ipc 10 --out /out/imagenette-ipc10
# The torch the README installs (PyPI's Linux wheels bundle CUDA; the host needs only the NVIDIA driver and
# the container toolkit), and every other package at the version in constraints.txt, the tested set.
FROM python:3.11-slim-bookworm

ENV VLCP_CACHE_DIR=/cache \
    VLCP_DATA_DIR=/data \
    HF_HOME=/hf \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /opt/vlcp
COPY constraints.txt ./
RUN pip install --no-cache-dir -c constraints.txt torch==2.14.1 torchvision==0.29.1
COPY setup.cfg pyproject.toml README.md ./
COPY vlcp ./vlcp
RUN pip install --no-cache-dir -c constraints.txt .

VOLUME ["/cache", "/data", "/hf", "/out"]
WORKDIR /work
ENTRYPOINT ["vlcp"]
CMD ["--help"]
