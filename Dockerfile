FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY service service
COPY parsers parsers
COPY pipelines pipelines
COPY migrations migrations
# torch from PyTorch's own index: the CPU build by default (small); a GPU image is built with
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0 \
    && pip install --no-cache-dir -c constraints.txt . \
    && useradd --system --uid 1000 pacs && mkdir -p /data && chown pacs /data
USER pacs
ENV PACS_DATA_DIR=/data PACS_LOG_FORMAT=json OMP_WAIT_POLICY=PASSIVE
EXPOSE 11112
ENTRYPOINT ["pacs-annotate"]
CMD ["serve"]
