# statsite-proxy as a container image (issue 17): the single binary on a distroless base.
#
#   docker build -t statsite-proxy .
#   docker run --rm -p 8150:8150/tcp -p 8150:8150/udp -p 127.0.0.1:8151:8151/tcp \
#     -v "$PWD/statsite-proxy-conf:/etc/statsite-proxy:ro" statsite-proxy
#
# The build stage runs `deno task compile`, which fetches the npm dependencies and Deno's
# runtime (denort, from dl.deno.land): the build needs network access. It builds for the
# platform of the build (docker build --platform linux/arm64 builds an aarch64 image).
#
# Configuration: the image holds the example configuration in /etc/statsite-proxy, which
# listens on 127.0.0.1 and forwards to 127.0.0.1:8125-8127; inside a container that reaches
# nothing. Mount a folder of your own on /etc/statsite-proxy with a statsite-proxy.ini that
# says bind_address = 0.0.0.0 and admin_bind = 0.0.0.0 (the admin endpoint is unauthenticated:
# publish it on the host's loopback only, as above) and a servers.conf with your statsite
# servers. Another file: docker run ... statsite-proxy run -f /etc/statsite-proxy/other.ini
#
# UDP receive buffer: the native receiver asks for udp_receive_buffer_bytes (8 MiB). Beyond
# the host's net.core.rmem_max it needs CAP_NET_ADMIN (SO_RCVBUFFORCE); otherwise it gets at
# most rmem_max (the size granted is in the log and /health). The image runs as a non-root
# user, and Docker gives a non-root process none of the capabilities of --cap-add (it sets
# no ambient capabilities). So either raise the limit on the host:
#   sysctl -w net.core.rmem_max=8388608
# or run the proxy as root with that one capability added:
#   docker run --user 0:0 --cap-add NET_ADMIN ...

FROM denoland/deno:2.9.6 AS build
WORKDIR /src
COPY deno.json deno.lock main.ts ./
COPY src/ src/
COPY scripts/compile.ts scripts/
RUN deno task compile

# glibc is needed: the binary is built for *-unknown-linux-gnu.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/dist/statsite-proxy /usr/local/bin/statsite-proxy
COPY config/statsite-proxy.ini config/servers.conf /etc/statsite-proxy/
USER 65532:65532
EXPOSE 8150/tcp 8150/udp 8151/tcp
ENTRYPOINT ["/usr/local/bin/statsite-proxy"]
CMD ["run", "-f", "/etc/statsite-proxy/statsite-proxy.ini"]
