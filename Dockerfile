# vlcp on a CUDA PyTorch base. Build: docker build -t vlcp .
# Run:   docker run --gpus all -v "$PWD/cache:/cache" -v "$PWD/data:/data" -v "$HOME/.cache/huggingface:/hf" \
#          -v "$PWD/out:/out" vlcp distill --data imagenette --ipc 10 --out /out/imagenette-ipc10
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV VLCP_CACHE_DIR=/cache \
    VLCP_DATA_DIR=/data \
    HF_HOME=/hf \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /opt/vlcp
COPY setup.cfg pyproject.toml README.md vlcp.py ./
COPY vlcp ./vlcp
RUN pip install --no-cache-dir .

VOLUME ["/cache", "/data", "/hf", "/out"]
WORKDIR /work
ENTRYPOINT ["vlcp"]
CMD ["--help"]
