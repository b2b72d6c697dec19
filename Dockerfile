# voice-relay image: the static (musl) binary on an empty base. No shell, no libc, no
# CA certificates (the server makes no outbound TLS connections).
#
# Build context: the repository after `bash scripts/dist.sh`, which leaves the binary
# for each architecture in dist/image/<amd64|arm64>/voice-relay. Nothing is pulled.
#   docker buildx build --platform linux/amd64,linux/arm64 -t "$(cat packaging/image-name)" .
#   podman build --format docker --platform linux/arm64 -t voice-relay .   (docker format keeps HEALTHCHECK)
#
# State (the self-signed certificate and its CA) lives in /data; a Home Assistant
# options file at /data/options.json is read at start.
#
# Home Assistant reads the io.hass.* labels of an add-on's image; its architecture names
# differ from Docker's (arm64 is aarch64), so each platform starts from its own stage.
# Declared before the first FROM so that FROM base-${TARGETARCH} can use it (buildah needs
# that; BuildKit sets it either way).
ARG TARGETARCH
FROM scratch AS base-amd64
LABEL io.hass.arch="amd64"
FROM scratch AS base-arm64
LABEL io.hass.arch="aarch64"

FROM base-${TARGETARCH}
ARG TARGETARCH
ARG VERSION=dev
LABEL io.hass.type="addon" \
      io.hass.version="${VERSION}" \
      org.opencontainers.image.title="voice-relay" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT AND LGPL-2.0-or-later"
COPY dist/image/${TARGETARCH}/voice-relay /voice-relay
ENV VOICE_RELAY_DATA_DIR=/data
VOLUME ["/data"]
WORKDIR /data
# HTTP + WebSocket signalling on tcp, every WebRTC peer on the one udp socket.
EXPOSE 8080/tcp 8080/udp
# The probe reads the same environment and options file as the server (not the flags
# given after the image name): set a non-default port through those.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/voice-relay", "health"]
ENTRYPOINT ["/voice-relay"]
