# syntax=docker/dockerfile:1
#
# Vestibule container image (needs BuildKit, the default builder of current Docker).
#
#   docker build -t vestibule .                                  # the proxy (last stage, "runtime")
#   docker build --build-arg PGO=0 -t vestibule .                # the same without the training run
#   docker build --target sample-api -t vestibule-sample-api .   # the demo API of deploy/compose
#
# The runtime image holds one static-ish binary on distroless/cc (glibc, libgcc, CA certificates,
# tzdata, no shell, no package manager) and runs as the distroless "nonroot" user, 65532:65532.
# Mount the configuration at /etc/vestibule/config.toml and pass secrets as environment variables
# (see docs/deployment.md).

# Keep >= rust-version in Cargo.toml. The builder must be Debian 12 (bookworm) because the runtime
# is distroless *debian12*: a binary linked against a newer glibc would not start there.
ARG RUST_VERSION=1.95
# PGO=1 (the default): the profile-guided build of scripts/build-pgo, which trains an instrumented
# build on a short benchmark run inside the build stage (nginx, Redis, wrk and the test OpenID
# provider, none of which reach the image) and needs network access for their packages. It is
# the binary docs/benchmarks.md measures. PGO=0: the plain `cargo build --release`, the same
# program, ~15 % more CPU per proxied request.
ARG PGO=1

FROM rust:${RUST_VERSION}-slim-bookworm AS build
ARG PGO
# Node.js for the test OpenID provider of the training run (bookworm's own is too old).
COPY --from=node:20-bookworm-slim /usr/local/bin/node /usr/local/bin/node
COPY --from=node:20-bookworm-slim /usr/local/lib/node_modules/npm /usr/local/lib/node_modules/npm
RUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm
# What the training run needs (scripts/bench would install them itself; here they get their own
# layer). procps: pgrep.
RUN set -eux; \
    if [ "$PGO" = 1 ]; then \
      apt-get update; \
      apt-get install -y --no-install-recommends nginx-light wrk redis-server redis-tools curl \
        python3 procps openssl ca-certificates; \
      rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY . .
# The cargo registry and the target directory live in BuildKit cache mounts, so a rebuild after a
# source change recompiles only this crate, never the dependencies. A cache mount is not part of
# the image, hence the binaries are copied out to /out. Touching the crate roots forces cargo to
# rebuild this crate even if a checkout left source mtimes older than the cached build (and
# build-pgo's binary older than the sources, so that it trains again).
RUN --mount=type=cache,id=vestibule-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=vestibule-cargo-git,target=/usr/local/cargo/git/db,sharing=locked \
    --mount=type=cache,id=vestibule-target,target=/src/target,sharing=locked \
    set -eux; \
    touch src/main.rs src/lib.rs; \
    mkdir -p /out; \
    cargo build --release --locked --example sample_api; \
    cp target/release/examples/sample_api /out/; \
    if [ "$PGO" = 1 ]; then \
      cp "$(scripts/build-pgo --print-path)" /out/vestibule; \
    else \
      cargo build --release --locked --bin vestibule; \
      cp target/release/vestibule /out/; \
    fi

# The sample API of the compose demo: a resource server that validates the access tokens the BFF
# attaches. Not for production.
FROM gcr.io/distroless/cc-debian12:nonroot AS sample-api
COPY --from=build /out/sample_api /usr/local/bin/sample-api
USER 65532:65532
EXPOSE 5001
ENTRYPOINT ["/usr/local/bin/sample-api"]
CMD ["--help"]

# The default target: the proxy.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
LABEL org.opencontainers.image.title="vestibule" \
      org.opencontainers.image.description="Backend-for-Frontend reverse proxy: server-side OpenID Connect login, encrypted sessions, tokens never reach the browser." \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/vestibule /usr/local/bin/vestibule
ENV VESTIBULE_CONFIG=/etc/vestibule/config.toml
# Relative paths in the configuration (e.g. static_dir = "./public") resolve here, next to it.
WORKDIR /etc/vestibule
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
# 8080: the public listener. 9091: the admin listener (/healthz, /readyz, /metrics); it defaults to
# 127.0.0.1:9091, which is enough for this HEALTHCHECK (it runs inside the container), but set
# [admin] listen = "0.0.0.0:9091" wherever something outside the container probes or scrapes it.
EXPOSE 8080 9091
# Exec form, no shell (there is none). If you move the admin listener, override the health check.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/vestibule", "health", "--url", "http://127.0.0.1:9091/healthz"]
ENTRYPOINT ["/usr/local/bin/vestibule"]
CMD ["--config", "/etc/vestibule/config.toml"]
