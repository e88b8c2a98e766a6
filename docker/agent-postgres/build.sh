#!/usr/bin/env sh
# Build the agent-postgres image with the io.baqup.* labels of spec section 8, produced from its
# schema by `baqup labels`. Prints the docker build line; --build runs it.
# Run from the repository root, with baqup installed (./examples/quickstart does that).
set -eu
schema=docker/agent-postgres/agent-schema.json
version=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['x-baqup-agent']['version'])" "$schema")
tag="${TAG:-ghcr.io/baqup/agent-postgres:$version}"
labels=$(baqup labels --schema "$schema" --format docker)
line="docker build -f docker/agent-postgres/Dockerfile $labels -t $tag ."
printf '%s\n' "$line"
if [ "${1:-}" = "--build" ]; then
  eval "$line"
fi
