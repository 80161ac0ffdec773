FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY service service
COPY parsers parsers
COPY pipelines pipelines
COPY migrations migrations
RUN pip install --no-cache-dir -c constraints.txt . \
    && useradd --system --uid 1000 pacs && mkdir -p /data && chown pacs /data
USER pacs
ENV PACS_DATA_DIR=/data PACS_LOG_FORMAT=json
EXPOSE 11112
ENTRYPOINT ["pacs-annotate"]
CMD ["serve"]
