# MuseTalk Studio in a container on an NVIDIA GPU (the NVIDIA Container Toolkit on the host).
#
#   docker build -t musetalk-studio .
#   docker run --gpus all -p 7860:7860 -v musetalk-data:/data musetalk-studio
#
# then open http://localhost:7860. The weights (about 3.6 GB) go to the /data volume the first
# time a job needs them (or on "Download weights"), and stay there; so do the prepared-face cache
# and the speech cache. To fetch the weights before the first visit:
#
#   docker run --rm -v musetalk-data:/data musetalk-studio musetalk download
#
# Settings are MUSETALK_* variables (docker run -e MUSETALK_MAX_SECONDS=300 ...): see the README.

# The CUDA runtime image gives the container toolkit what it needs to mount the host's driver;
# torch's wheel carries its own CUDA libraries, so any driver new enough for that wheel works.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.12 and the system's ffmpeg (the imageio-ffmpeg wheel stays as the fallback);
# libgl1 and libglib2.0-0 are what OpenCV (brought by MediaPipe) loads.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ffmpeg libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

# Everything runs as this user; /data (weights and caches) belongs to it.
RUN useradd --create-home --uid 1001 --shell /usr/sbin/nologin studio \
    && mkdir -p /data /opt/venv \
    && chown studio:studio /data /opt/venv
USER studio

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv "$VIRTUAL_ENV"

# torch first and on its own: the version pins the CUDA build that the default index serves.
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}"

WORKDIR /app
# Dependencies in their own layer (it changes rarely); one resolve keeps gradio on our numpy<2.
COPY --chown=studio:studio requirements.txt ./
RUN pip install -r requirements.txt "gradio>=6.31,<7"
COPY --chown=studio:studio . .
RUN pip install --no-deps .

ENV MUSETALK_MODELS_DIR=/data/models \
    MUSETALK_CACHE_DIR=/data/cache/avatars \
    MUSETALK_SPEECH_CACHE=/data/cache/speech \
    HF_HOME=/data/huggingface \
    XDG_CACHE_HOME=/data/cache \
    MUSETALK_WORK_DIR=/tmp/musetalk-studio \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False
VOLUME ["/data"]
EXPOSE 7860

# Healthy when the page answers (the first start loads the models, hence the grace period).
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/', timeout=8)"]

CMD ["python3", "app.py", "--host", "0.0.0.0", "--port", "7860"]
