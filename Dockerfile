# Sidecar's image: one statically linked binary and the CA bundle, nothing else (no shell, no
# libc). The bundle (Mozilla's roots as Debian's ca-certificates ships them, at the path
# rustls-native-certs looks in) lets outbound TLS verify public servers when `upstream.tls.ca`
# is not set. Built by scripts/build-image, which compiles the binary (glibc, crt-static),
# strips it and runs `docker build` on a context directory holding only this file and the
# image's root filesystem: there is no registry to pull a build stage from, and target/ is
# gigabytes.
FROM scratch

ARG VERSION=dev
LABEL org.opencontainers.image.title="sidecar" \
      org.opencontainers.image.description="One small, fast binary beside your app: TLS, metrics, logs, readiness, drain and outbound calls" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# One COPY, one layer: /sidecar and /etc/ssl/certs/ca-certificates.crt.
COPY rootfs/ /

# The distroless "nonroot" IDs: no file in the image belongs to them, and Pod Security's
# "restricted" profile asks for a non-zero UID the image can name without an /etc/passwd.
USER 65532:65532

# admin (/live, /ready, /metrics) and the default inbound listener.
EXPOSE 15000 15006

# The binary runs: the image is whole. Liveness of the proxy itself is /live on the admin
# port, which Kubernetes probes; Docker cannot (no curl in the image).
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 CMD ["/sidecar", "version"]

ENTRYPOINT ["/sidecar"]
CMD ["run", "-c", "/etc/sidecar/config/sidecar.yaml"]
