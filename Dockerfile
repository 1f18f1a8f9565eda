# syntax=docker/dockerfile:1
# One image with every Cairn binary: cairn-engine, cairn-agent, cairn-csi,
# cairnctl and cairn.
#   docker build -t cairn:0.1.0 .
# The tag matches [workspace.package] version in Cargo.toml, which the
# manifests reference (manifests/test/validate.py checks both).

# Build stage: the toolchain pinned in rust-toolchain.toml, on the same Debian
# release as the runtime stage so the binaries link against the same glibc.
FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
# Exactly the build CI runs.
RUN scripts/build-release.sh

# Runtime stage: the binaries plus the host tools the node plugin runs:
# nvme-cli (nvme connect/disconnect), e2fsprogs and xfsprogs (mkfs, fsck,
# resize), util-linux (blkid, mount, findmnt) and kmod (modprobe nvme-tcp).
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        nvme-cli \
        e2fsprogs \
        xfsprogs \
        util-linux \
        mount \
        kmod \
        ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/cairn-engine /usr/local/bin/cairn-engine
COPY --from=build /src/target/release/cairn-agent /usr/local/bin/cairn-agent
COPY --from=build /src/target/release/cairn-csi /usr/local/bin/cairn-csi
COPY --from=build /src/target/release/cairnctl /usr/local/bin/cairnctl
COPY --from=build /src/target/release/cairn /usr/local/bin/cairn
# NVMe-oF/TCP, engine gRPC, agent gRPC.
EXPOSE 8420 10124 10125
CMD ["cairn"]
