# syntax=docker/dockerfile:1
# The coordinator and the worker in one image, for deploy/ (the pods choose the program
# with `command:`). Dependencies are compiled in a layer of their own, from cargo-chef's
# recipe of the manifests and Cargo.lock, so a change to the source rebuilds only the
# workspace's crates.
#
#   docker build -t lockstep:0.1.0 .

FROM rust:1.95-bookworm AS chef
RUN cargo install --locked cargo-chef --version 0.1.78
WORKDIR /src

# The recipe: every manifest and Cargo.lock, nothing that changes with the source.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# The same profile, packages and targets as the build below, or its dependencies would
# be compiled again.
RUN cargo chef cook --release --locked -p coordinator -p worker --bins --recipe-path recipe.json
COPY . .
# The line CI compiles (.ci/run); scripts/check-deploy.sh checks that they are the same.
RUN cargo build --release --locked -p coordinator -p worker --bins

# glibc 2.36, as in the bookworm builder; no shell, no package manager; uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /src/target/release/coordinator /src/target/release/worker /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/coordinator"]
