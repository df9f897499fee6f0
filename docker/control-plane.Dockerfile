# The control plane image: `herald` on a distroless base, running as a non-root user.
# Not built by CI here (the build machines have no container engine); build with
#   docker build -f docker/control-plane.Dockerfile -t herald:dev .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p herald-control-plane --bin herald \
 && cp target/release/herald /herald

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /herald /usr/local/bin/herald
USER 65532:65532
EXPOSE 7070 9090
ENTRYPOINT ["/usr/local/bin/herald"]
CMD ["serve"]
