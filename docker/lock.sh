#!/usr/bin/env sh
# Regenerate the hashed locks of the agent base image (Dockerfile.base) from pyproject.toml:
#   docker/requirements.lock        the runtime dependencies with the crypto and lz4 extras
#   docker/build-requirements.lock  the build system (setuptools, wheel) that builds our wheel
# Both are installed with --require-hashes. Needs pip-tools in the venv (not a dependency of
# the project): .venv/bin/pip install pip-tools. Resolves against the default index only
# (the machine's pip configuration and local wheel directories are left out).
set -eu
cd "$(dirname "$0")/.."
compile() {
  env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null CUSTOM_COMPILE_COMMAND=docker/lock.sh \
    .venv/bin/pip-compile --no-config --quiet --generate-hashes --strip-extras \
    --no-emit-index-url --no-emit-find-links "$@"
}
compile --extra crypto --extra lz4 -o docker/requirements.lock pyproject.toml
compile --only-build-deps --all-build-deps --allow-unsafe -o docker/build-requirements.lock pyproject.toml
