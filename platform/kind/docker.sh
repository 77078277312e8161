#!/usr/bin/env bash
# Makes sure a Docker engine answers (`docker info`), for machines where nothing else starts one: Debian's
# docker.io installed with apt when missing, dockerd started in the background (no systemd here), its log in
# ${KUBELOOP_CACHE:-~/.cache/kubeloop}/docker/dockerd.log. On a machine whose Docker already runs this does nothing.
#
# Where CAP_SYS_RESOURCE is missing from the capability bounding set (some sandboxes), `--privileged` containers
# fail ("unable to apply caps", moby#42906) and kind passes --privileged to every node it creates and execs in:
# dockerd then gets a default runtime that is runc with that one capability removed from what it is asked for.
set -euo pipefail
CACHE=${KUBELOOP_CACHE:-$HOME/.cache/kubeloop}
STATE="$CACHE/docker"
if docker info >/dev/null 2>&1; then exit 0; fi
mkdir -p "$STATE"

if ! command -v dockerd >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "docker.sh: no Docker engine; install Docker (or run as root to apt-get docker.io)" >&2; exit 1; }
    echo "docker.sh: installing Debian's docker.io ..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io jq >"$STATE/apt.log" 2>&1 \
        || { tail -20 "$STATE/apt.log" >&2; exit 1; }
fi

capbnd=$(awk '/^CapBnd:/ {print $2}' /proc/self/status)
if (( (16#$capbnd >> 24 & 1) == 0 )); then
    wrapper=/usr/local/sbin/runc-without-sys-resource
    cat >"$wrapper" <<'SH'
#!/bin/sh
# runc, with CAP_SYS_RESOURCE removed from a container's (create/run) or an exec's (--process) capabilities:
# this machine's bounding set lacks it, so asking for it (as --privileged does) fails. Written by kind/docker.sh.
drop() {  # drop FILE JQ-PATH: remove CAP_SYS_RESOURCE from every capability set at JQ-PATH of FILE
    jq "$2 |= (if . then map_values(map(select(. != \"CAP_SYS_RESOURCE\"))) else . end)" "$1" >"$1.kubeloop" \
        && mv "$1.kubeloop" "$1"
}
bundle=. process= prev=
for arg in "$@"; do
    case "$prev" in --bundle|-b) bundle=$arg ;; --process|-p) process=$arg ;; esac
    case "$arg" in --bundle=*) bundle=${arg#--bundle=} ;; --process=*) process=${arg#--process=} ;; esac
    prev=$arg
done
for arg in "$@"; do
    case "$arg" in
        create|run) [ ! -f "$bundle/config.json" ] || drop "$bundle/config.json" .process.capabilities; break ;;
        exec) [ -z "$process" ] || drop "$process" .capabilities; break ;;
    esac
done
exec runc "$@"
SH
    chmod +x "$wrapper"
    mkdir -p /etc/docker
    if ! grep -q runc-without-sys-resource /etc/docker/daemon.json 2>/dev/null; then
        echo "docker.sh: CAP_SYS_RESOURCE is not in this machine's bounding set: dockerd's default runtime drops it"
        jq -n --arg path "$wrapper" '{"runtimes": {"kubeloop-runc": {"path": $path}}, "default-runtime": "kubeloop-runc"}' \
            >/etc/docker/daemon.json
    fi
fi

echo "docker.sh: starting dockerd (log: $STATE/dockerd.log)"
setsid nohup dockerd >"$STATE/dockerd.log" 2>&1 </dev/null &
for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && { echo "docker.sh: $(docker version --format 'Docker engine {{.Server.Version}}')"; exit 0; }
    sleep 1
done
echo "docker.sh: dockerd did not answer in 60 s; last lines of $STATE/dockerd.log:" >&2
tail -20 "$STATE/dockerd.log" >&2
exit 1
