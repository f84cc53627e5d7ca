# The creditflow image: one image, three roles (see docker-compose.yml):
#   creditflow migrate | creditflow api | creditflow worker
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Only what the package needs: a change to tests or docs does not invalidate the install layer.
COPY pyproject.toml README.md requirements.lock ./
COPY creditflow/ creditflow/
COPY workflows/ workflows/
COPY activities/ activities/
COPY workers/ workers/
# requirements.lock pins every production distribution to the versions the tests ran against (deploy/lock.py);
# the dev extra (embedded PostgreSQL, Temporal dev/test servers, localstripe) is not installed.
RUN pip install -c requirements.lock . \
    && useradd --system --no-create-home --uid 10001 creditflow

USER creditflow
# In a container the API must listen on all interfaces (the settings default is 127.0.0.1).
ENV CREDITFLOW_API_HOST=0.0.0.0 \
    CREDITFLOW_API_PORT=8000
EXPOSE 8000
ENTRYPOINT ["creditflow"]
CMD ["api"]
