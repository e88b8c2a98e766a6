#!/usr/bin/env sh
# Build the agent-fs image with the io.baqup.* labels of spec section 8, produced from its
# schema by `baqup labels`. Prints the docker build line; --build runs it.
# Run from the repository root, with baqup installed (./examples/quickstart does that).
#   DOCKER   the engine command (default docker; the container tests use podman)
#   TAG      the image tag (default ghcr.io/baqup/agent-fs:VERSION)
#   further arguments after --build are passed to the engine's build (--build-arg BASE=...)
set -eu
schema=docker/agent-fs/agent-schema.json
version=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['x-baqup-agent']['version'])" "$schema")
tag="${TAG:-ghcr.io/baqup/agent-fs:$version}"
labels=$(baqup labels --schema "$schema" --format docker)
build=no
if [ "${1:-}" = "--build" ]; then
  build=yes
  shift
fi
extra=""
for arg in "$@"; do
  extra="$extra '$(printf '%s' "$arg" | sed "s/'/'\\\\''/g")'"
done
line="${DOCKER:-docker} build -f docker/agent-fs/Dockerfile $labels -t $tag$extra ."
printf '%s\n' "$line"
if [ "$build" = yes ]; then
  eval "$line"
fi
