# syntax=docker/dockerfile:1
#
# balancer in one image, run as a non-root user under tini:
#   docker build -t balancer:0.1.0 .
#   docker run --rm --read-only -p 8080:8080 balancer:0.1.0
# Needs BuildKit (the default builder of Docker 23 and later): the RUN steps use --mount.
#
# Two stages on the same base image, so the compiled wheel's ABI is the one it runs on:
#   build  compiles the request path with mypyc (README, "Compiled build") into a wheel; gcc only here.
#   final  installs the pinned dependencies, then the wheel, read through a bind mount of the build
#          stage, so neither the wheel nor a source tree is left in any layer.
# In both stages the dependency layer comes before anything from balancer/ or backends/: a code change
# rebuilds only the layers after it. The dependencies are the pins of config/constraints.txt (the
# runtime closure of pyproject.toml's dependencies; its header says how to regenerate it), so every
# build installs the same versions; tests/test_image.py checks the pins against pyproject's ranges.

# An exact patch release on an exact Debian release: a rebuild gets the same Python and the same libc.
# Bump it on purpose, and test the compiled build on the new one.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The dependencies first: mypyc type-checks against them. The compiler is pinned as in the Makefile
# (the generated C is mypyc's), setuptools and the stubs as in .venv-native, where the compiled test
# pass runs. The cache mount keeps downloads between builds without putting them in a layer.
COPY config/constraints.txt config/constraints.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r config/constraints.txt \
        'mypy==2.4.1' 'types-PyYAML==6.0.12.20261122' 'setuptools==84.2.1'
# Then the sources. --no-deps: the dependencies are the ones above; --no-build-isolation: the pinned
# setuptools and mypy above, not whatever the index offers today.
COPY pyproject.toml setup.py README.md ./
COPY balancer/ balancer/
COPY backends/ backends/
RUN BALANCER_COMPILE=1 pip wheel --no-cache-dir --no-build-isolation --no-deps -w /wheels .


FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG SOURCE_URL=https://example.invalid/balancer
ARG REVISION=unknown
LABEL org.opencontainers.image.title="balancer" \
      org.opencontainers.image.description="An HTTP reverse-proxy load balancer with a supervised worker pool, configured by one YAML file" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}"

# pip compiles .pyc at install time; at run time nothing is written (the image runs with
# --read-only, and readOnlyRootFilesystem in Kubernetes), so Python must not try. Unbuffered output
# so that `docker logs` is live.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# tini from Debian rather than a downloaded binary: signed by the distribution, one package.
# PID 1 gets no default signal handlers from the kernel and must reap orphans; a Python process is
# bad at both, tini does exactly that. The apt lists go in the same layer, so they never land in the image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

# A fixed, unprivileged uid/gid so that mounted files can be given to it; no login shell, no home.
RUN groupadd --system --gid 10001 balancer \
    && useradd --system --uid 10001 --gid balancer --no-create-home --shell /usr/sbin/nologin balancer

# The dependency layer: the pinned set, read through a bind mount (nothing of it stays in the image).
# It changes only when config/constraints.txt does.
RUN --mount=type=bind,source=config/constraints.txt,target=/tmp/config/constraints.txt \
    --mount=type=cache,target=/root/.cache/pip \
    pip install -r /tmp/config/constraints.txt

# The compiled wheel, read from the build stage through a bind mount. --no-index: everything it needs
# must already be installed from the pins above, or this step fails (a lock missing a dependency is
# caught here, not at run time). The workers run `python -m backends`, which finds this installed copy.
RUN --mount=type=bind,from=build,source=/wheels,target=/tmp/wheels \
    --mount=type=bind,source=config/constraints.txt,target=/tmp/config/constraints.txt \
    pip install --no-cache-dir --no-index -c /tmp/config/constraints.txt /tmp/wheels/*.whl

# The default configuration; mount your own file over it (a ConfigMap does, in config/kubernetes/).
COPY config/docker.yaml /etc/balancer/balancer.yaml

WORKDIR /
USER 10001:10001

# 8080: the proxy. 8082: the monitor listener (/healthz, /readyz, /metrics), which Kubernetes probes
# and Prometheus scrapes. The admin API (8081) stays on 127.0.0.1 inside the container: not exposed.
EXPOSE 8080 8082

# slim has no curl: ask python. An empty ProxyHandler ignores any http_proxy in the environment, which
# would otherwise send a loopback request to a proxy. Any exception (refused, timeout, non-2xx raised
# as HTTPError) leaves python with status 1, which Docker reads as "unhealthy"; the excepthook turns
# the traceback into one line, since Docker keeps only the last 4 KiB of a probe's output.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as r; sys.excepthook = lambda t, e, tb: print('unhealthy:', e, file=sys.stderr); sys.exit(0 if r.build_opener(r.ProxyHandler({})).open('http://127.0.0.1:8082/healthz', timeout=2).status == 200 else 1)"]

# `docker stop` sends SIGTERM to tini, which forwards it to balancer only (no `-g`): balancer then
# drains and stops its workers in order. Workers whose balancer dies anyway exit on their own
# (parent-death signal) and tini reaps them. Give `docker stop -t` more than shutdown.drain_timeout.
STOPSIGNAL SIGTERM

# Exec form throughout: with the shell form, /bin/sh would be PID 1's child and swallow SIGTERM.
ENTRYPOINT ["/usr/bin/tini", "--", "balancer"]
CMD ["run", "-c", "/etc/balancer/balancer.yaml"]
