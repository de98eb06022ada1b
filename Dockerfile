# syntax=docker/dockerfile:1
#
# balancer with its pool of test workers in one container:
#   docker build -t balancer .
#   docker run --rm -p 8080:8080 balancer
# tini is PID 1 (signal forwarding and zombie reaping), balancer its only child, the workers balancer's.

# Build stage: the compiled build (README, "Compiled build"): the request path compiled by mypyc into
# a wheel. gcc only here; the final image gets the wheel, not the compiler. Same base image, so the
# wheel's ABI is the one it runs on.
FROM python:3.12-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# mypy pinned as in the Makefile: the generated C is mypyc's. The package's dependencies go in first,
# because mypyc type-checks against them.
RUN pip install --no-cache-dir 'mypy==2.4.1' 'types-PyYAML>=6' 'setuptools>=77'
COPY pyproject.toml setup.py README.md ./
COPY balancer/ balancer/
COPY backends/ backends/
RUN pip install --no-cache-dir . \
    && BALANCER_COMPILE=1 pip wheel --no-cache-dir --no-build-isolation --no-deps -w /wheels .

FROM python:3.12-slim

# pip compiles .pyc at install time; at run time site-packages is read-only to the unprivileged user,
# so don't try. Unbuffered output so `docker logs` is live.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# tini from Debian rather than a downloaded binary: signed by the distribution, one package.
# PID 1 gets no default signal handlers from the kernel and must reap orphans; a Python process is
# bad at both, tini does exactly that. The apt lists are removed in the same layer so they never land
# in the image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

# A fixed, unprivileged uid/gid so mounted files can be given to it; no login shell, no home.
RUN groupadd --system --gid 10001 balancer \
    && useradd --system --uid 10001 --gid balancer --no-create-home --shell /usr/sbin/nologin balancer

# The compiled wheel from the build stage, installed as a regular package (its dependencies from the
# index); no source tree is left in the image: the workers run `python -m backends`, which must find
# the installed copy.
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels

COPY config/docker.yaml /etc/balancer/balancer.yaml

WORKDIR /
USER balancer

# 8080: the proxy. 8081: the admin API, bound to 127.0.0.1 by config/docker.yaml, so listed here for
# documentation only; publishing it needs admin.host changed as well.
EXPOSE 8080 8081

# slim has no curl: ask python. An empty ProxyHandler ignores any http_proxy in the environment, which
# would otherwise send a loopback request to a proxy. Any exception (refused, timeout, non-2xx raised
# as HTTPError) leaves python with status 1, which Docker reads as "unhealthy"; the excepthook turns
# the traceback into one line, since Docker keeps only the last 4 KiB of a probe's output.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as r; sys.excepthook = lambda t, e, tb: print('unhealthy:', e, file=sys.stderr); sys.exit(0 if r.build_opener(r.ProxyHandler({})).open('http://127.0.0.1:8081/healthz', timeout=2).status == 200 else 1)"]

# `docker stop` sends SIGTERM to tini, which forwards it to balancer only (no `-g`): balancer then
# stops its workers in order. Workers whose balancer dies anyway exit on their own (parent-death
# signal) and tini reaps them. Give `docker stop -t` more than balancer's own shutdown deadline.
STOPSIGNAL SIGTERM

# Exec form throughout: with a shell form, /bin/sh would be PID 1's child and swallow SIGTERM.
ENTRYPOINT ["/usr/bin/tini", "--", "balancer"]
CMD ["run", "-c", "/etc/balancer/balancer.yaml"]
