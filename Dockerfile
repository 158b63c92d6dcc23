# walvault, built from this repository. The daemon runs as an unprivileged user;
# the PostgreSQL client programs are included for `restore --replay`.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked && strip target/release/walvault

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates postgresql-15 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/walvault --create-home walvault
COPY --from=build /src/target/release/walvault /usr/local/bin/walvault
USER walvault
ENV WALVAULT_POSTGRES_BIN_DIR=/usr/lib/postgresql/15/bin \
    WALVAULT_WAL_SPOOL_DIR=/var/lib/walvault/spool
EXPOSE 9187
ENTRYPOINT ["walvault"]
CMD ["daemon"]
