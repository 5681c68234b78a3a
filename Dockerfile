# Clovisor's node agent image. Multi-stage: the Go build (no cgo: the BPF
# objects are generated and committed, so no clang is needed), then a
# minimal final image with the static binary only.
#
#   docker build -t clovisor/clovisor:dev .
#
# Pin the base images by digest in release builds (docker buildx imagetools
# inspect <image> prints it), e.g. golang:1.26-bookworm@sha256:...
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG TARGETARCH
RUN CGO_ENABLED=0 GOARCH=${TARGETARCH:-amd64} go build -trimpath -ldflags='-s -w' -o /out/clovisor ./cmd/clovisor

FROM gcr.io/distroless/static-debian12:nonroot AS final
COPY --from=build /out/clovisor /clovisor
# The agent needs capabilities (see deploy/clovisor.yaml), which a non-root
# user does not get from the container runtime: run as root, drop the rest.
USER 0:0
ENTRYPOINT ["/clovisor"]
