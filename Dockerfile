# One image for every service: worker, Flower and the API.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 DEEPE_METHOD_STORE=/app/method_store DEEPE_STORAGE=/data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY deepe_tasks ./deepe_tasks
RUN pip install --no-cache-dir '.[train,gpu,monitor,api,s3]'
COPY method_store ./method_store
CMD ["deepe", "worker"]
