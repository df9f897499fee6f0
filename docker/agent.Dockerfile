# The agent image: `herald-agent` on a distroless base, running as a non-root user.
# Not built by CI here (the build machines have no container engine); build with
#   docker build -f docker/agent.Dockerfile -t herald-agent:dev .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p herald-agent --bin herald-agent \
 && cp target/release/herald-agent /herald-agent

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /herald-agent /usr/local/bin/herald-agent
USER 65532:65532
EXPOSE 9091
ENTRYPOINT ["/usr/local/bin/herald-agent"]
