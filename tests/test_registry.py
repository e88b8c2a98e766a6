"""Controller pre-flight against a real registry (issue 18, INTERFACE.md section 15).

A real `docker-registry` (CNCF distribution) on loopback, images pushed through its
upload API (tests/registry.py), a real token server, and hostile HTTP servers of the
test for what a well-behaved registry never does (bad bytes, redirects, 429/5xx).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from baqup_supervisor.config import load_agent_schema
from baqup_supervisor.errors import BaqupError
from baqup_supervisor.info import image_labels
from baqup_supervisor.preflight import parse_env_file
from baqup_supervisor.registry import (
    find_credentials,
    inspect_image,
    parse_challenge,
    parse_image,
    preflight,
    resolve_image,
)
from tests.conftest import REPO, free_port, run_baqup
from tests.registry import (
    DOCKER_MANIFEST,
    Registry,
    Seen,
    Server,
    TokenServer,
    blob_requests,
    digest_of,
    htpasswd_auth,
    push_image,
    push_index,
    start_registry,
    tls_files,
)

SCHEMA_FILE = REPO / "docker/agent-fs/agent-schema.json"
USER, PASSWORD = "ops", "s3cret-Registry-Pass"


@pytest.fixture(scope="module")
def labels() -> dict[str, str]:
    """The labels `baqup labels` prints for agent-fs."""
    return image_labels(load_agent_schema(SCHEMA_FILE))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    server = start_registry(tmp_path_factory.mktemp("registry"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    directory = tmp_path_factory.mktemp("basic-registry")
    server = start_registry(directory, htpasswd_auth(directory, {USER: PASSWORD}))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def token_setup(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Registry, TokenServer]]:
    directory = tmp_path_factory.mktemp("token-registry")
    tokens = TokenServer(directory, users={USER: PASSWORD})
    server = start_registry(directory, tokens.auth_config())
    yield server, tokens
    server.stop()
    tokens.stop()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The controller's environment: no BAQUP_*, a private HOME and cache."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BAQUP_", "DOCKER_"))}
    clean.update(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    return clean


def basic(user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def baqup(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    done = run_baqup(args, env, tool=True, timeout=60)
    return done.returncode, done.stdout, done.stderr


def fails(exit_code: int, **kwargs: Any) -> BaqupError:
    with pytest.raises(BaqupError) as caught:
        resolve_image(**kwargs)
    assert int(caught.value.exit_code) == exit_code, caught.value.message
    return caught.value


# ---------------------------------------------------------------------------
# pure parsers


def test_image_references_follow_docker_rules() -> None:
    ref = parse_image("127.0.0.1:5000/baqup/agent-fs")
    assert (ref.registry, ref.repository, ref.reference) == (
        "127.0.0.1:5000",
        "baqup/agent-fs",
        "latest",
    )
    hub = parse_image("postgres:16")
    assert (hub.registry, hub.repository, hub.api_host) == (
        "docker.io",
        "library/postgres",
        "registry-1.docker.io",
    )
    pinned = parse_image(f"ghcr.io/baqup/agent-fs:1.2@sha256:{'a' * 64}")
    assert pinned.reference == f"sha256:{'a' * 64}"
    assert parse_image("localhost/x").registry == "localhost"
    for bad in ("Upper/Case", "ghcr.io/x@sha256:short", "ghcr.io/x:bad tag"):
        with pytest.raises(BaqupError) as caught:
            parse_image(bad)
        assert int(caught.value.exit_code) == 64
        assert bad in caught.value.message


def test_challenges_with_quoted_commas() -> None:
    found = parse_challenge(
        'Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push"'
    )
    assert found is not None
    assert found.scheme == "bearer"
    assert dict(found.params) == {
        "realm": "https://auth.example/token",
        "service": "reg",
        "scope": "repository:a/b:pull,push",
    }
    assert parse_challenge('Basic realm="x"') is not None
    assert parse_challenge("Negotiate abc") is None


def test_env_file_is_dockers_format() -> None:
    text = "# comment\n\nA=1\n  B = x\nC=has=equals and 'quotes'\nFROM_ENV\nUNSET_ONE\n"
    with pytest.raises(BaqupError, match="line 4"):
        parse_env_file(text, "f.env", {})
    good = "# comment\n\nA=1\nC=has=equals and 'quotes'\nFROM_ENV\nUNSET_ONE\nE=\n"
    assert parse_env_file(good, "f.env", {"FROM_ENV": "v"}) == {
        "A": "1",
        "C": "has=equals and 'quotes'",
        "FROM_ENV": "v",
        "E": "",
    }


def test_credentials_from_env_and_docker_config(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    assert find_credentials("reg.example", env) is None
    with pytest.raises(BaqupError, match="BAQUP_SECRET_REGISTRY_PASSWORD is required"):
        find_credentials("reg.example", {**env, "BAQUP_REGISTRY_USERNAME": "u"})
    (tmp_path / ".docker").mkdir()
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    config = {"auths": {"https://reg.example": {"auth": auth}, "other": {"auth": "!!"}}}
    (tmp_path / ".docker/config.json").write_text(json.dumps(config))
    found = find_credentials("reg.example", env)
    assert found is not None
    assert (found.username, found.password.reveal()) == (USER, PASSWORD)
    with pytest.raises(BaqupError, match="not base64") as caught:
        find_credentials("other", env)
    assert PASSWORD not in caught.value.message


# ---------------------------------------------------------------------------
# anonymous registry: inspect, preflight, cache


def test_inspect_reads_labels_and_schema_without_a_layer(
    registry: Registry, labels: dict[str, str], env: dict[str, str]
) -> None:
    pushed = push_image(registry.url, "baqup/agent-fs", "1.0", labels)
    code, out, err = baqup(["inspect", f"{registry.host}/baqup/agent-fs:1.0", "--insecure"], env)
    assert code == 0, err
    document = json.loads(out)
    assert set(document) == {"image", "digest", "labels", "schema", "info"}
    assert document["digest"] == pushed.digest
    assert document["labels"] == labels
    assert document["schema"] == json.loads(SCHEMA_FILE.read_text())
    assert document["info"]["agent"] == "agent-fs"
    assert document["info"]["roles"] == ["snapshot", "restore"]
    log = registry.access_log()
    assert blob_requests(log, pushed.config), "the config blob was read"
    assert blob_requests(log, pushed.layer) == [], "a layer was downloaded"


def test_docker_v2_manifest_type(
    registry: Registry, labels: dict[str, str], env: dict[str, str]
) -> None:
    pushed = push_image(registry.url, "baqup/docker-v2", "1", labels, media=DOCKER_MANIFEST)
    document = inspect_image(f"{registry.host}/baqup/docker-v2:1", insecure=True, environ=env)
    assert document["digest"] == pushed.digest
    assert document["labels"]["io.baqup.type"] == "fs"


def test_preflight_matches_validate_inside_the_image(
    registry: Registry,
    labels: dict[str, str],
    env: dict[str, str],
    job_env: dict[str, str],
    tmp_path: Path,
) -> None:
    push_image(registry.url, "baqup/agent-fs", "pre", labels)
    image = f"{registry.host}/baqup/agent-fs:pre"
    job = {k: v for k, v in job_env.items() if k.startswith("BAQUP_")}
    for case, extra in (("valid", {"BAQUP_SOURCE_PATH": "/data"}), ("invalid", {})):
        env_file = tmp_path / f"{case}.env"
        env_file.write_text(
            "# the job\n" + "".join(f"{k}={v}\n" for k, v in {**job, **extra}.items())
        )
        code, out, err = baqup(["preflight", image, "--insecure", "--env-file", str(env_file)], env)
        inside = run_baqup(["--validate", "--schema", str(SCHEMA_FILE)], {**env, **job, **extra})
        assert out == inside.stdout, err
        assert code == inside.returncode == (0 if case == "valid" else 64)
    problems = json.loads(out)["errors"]
    assert [p["variable"] for p in problems] == ["BAQUP_SOURCE_PATH"]
    # Without --env-file the environment itself is validated.
    code, out, _ = baqup(
        ["preflight", image, "--insecure"], {**env, **job, "BAQUP_SOURCE_PATH": "/x"}
    )
    assert (code, json.loads(out)["valid"]) == (0, True)


def test_cache_per_digest_and_tag_reresolved(
    registry: Registry, labels: dict[str, str], env: dict[str, str]
) -> None:
    first = push_image(registry.url, "baqup/cached", "latest", labels)
    image = f"{registry.host}/baqup/cached:latest"
    assert resolve_image(image, insecure=True, environ=env).digest == first.digest
    before = len(registry.access_log().splitlines())
    again = resolve_image(image, insecure=True, environ=env)
    assert again.digest == first.digest
    fresh = [
        line for line in registry.access_log().splitlines()[before:] if line.startswith("127.")
    ]
    requests = [line.split('"')[1] for line in fresh]
    assert requests == ["GET /v2/ HTTP/1.1", "HEAD /v2/baqup/cached/manifests/latest HTTP/1.1"]
    cached = list((Path(env["XDG_CACHE_HOME"]) / "baqup/images").iterdir())
    assert [p.name.split(".")[0] for p in cached] == [first.digest.replace(":", "-")]
    # Pinned by digest: no request at all.
    before = len(registry.access_log())
    pinned = resolve_image(
        f"{registry.host}/baqup/cached@{first.digest}", insecure=True, environ=env
    )
    assert pinned.labels == labels
    assert len(registry.access_log()) == before
    # The tag moves: the next call sees the new image.
    moved = push_image(registry.url, "baqup/cached", "latest", {**labels, "io.baqup.version": "2"})
    assert resolve_image(image, insecure=True, environ=env).digest == moved.digest
    assert resolve_image(image, insecure=True, environ=env).labels["io.baqup.version"] == "2"


def test_index_resolved_to_platform(
    registry: Registry, labels: dict[str, str], env: dict[str, str]
) -> None:
    index, pushed = push_index(
        registry.url,
        "baqup/multi",
        "v1",
        {"amd64": labels, "arm64": {**labels, "io.baqup.version": "9.9-arm"}},
    )
    image = f"{registry.host}/baqup/multi:v1"
    amd = resolve_image(image, insecure=True, environ=env)
    arm = resolve_image(image, insecure=True, environ=env, platform="linux/arm64")
    assert (amd.digest, amd.manifest_digest) == (index, pushed["amd64"].digest)
    assert (arm.digest, arm.manifest_digest) == (index, pushed["arm64"].digest)
    assert arm.labels["io.baqup.version"] == "9.9-arm"
    code, _, err = baqup(["inspect", image, "--insecure", "--platform", "linux/s390x"], env)
    assert code == 64
    assert "linux/s390x" in err
    assert "linux/amd64, linux/arm64" in err
    for image_dict in pushed.values():
        assert blob_requests(registry.access_log(), image_dict.layer) == []


def test_missing_tag_is_64_naming_the_image(registry: Registry, env: dict[str, str]) -> None:
    image = f"{registry.host}/baqup/agent-fs:no-such-tag"
    code, out, err = baqup(["preflight", image, "--insecure"], env)
    assert code == 64
    assert_failure_report(out, image, 64)
    assert image in err
    assert "not found" in err
    code, out, err = baqup(["preflight", image, "--env-file", "/nonexistent/job.env"], env)
    assert code == 64
    assert_failure_report(out, image, 64)
    assert "/nonexistent/job.env: cannot be read" in err


def assert_failure_report(out: str, image: str, exit_code: int) -> None:
    """A failed inspect or preflight still prints its JSON report, naming the error."""
    report = json.loads(out)
    assert report["image"] == image
    assert report["error"]["exit_code"] == exit_code
    assert report["error"]["code"]
    assert report["error"]["message"]


def test_registry_down_is_69(env: dict[str, str]) -> None:
    image = f"127.0.0.1:{free_port()}/baqup/agent-fs:1"
    code, out, err = baqup(["preflight", image, "--insecure"], env)
    assert code == 69, err
    assert_failure_report(out, image, 69)
    assert "registry unavailable" in err


def test_plain_http_refused_without_insecure(registry: Registry, env: dict[str, str]) -> None:
    code, _, err = baqup(["inspect", f"{registry.host}/baqup/agent-fs:1.0"], env)
    assert code == 64
    assert "does not speak TLS" in err
    assert "--insecure" in err


@pytest.mark.parametrize(
    ("schema_label", "expected"),
    [
        ("{not json", "is not valid JSON"),
        ('{"type": 12}', "not a valid JSON Schema"),
        (None, "no io.baqup.schema label"),
    ],
)
def test_bad_schema_label_is_65(
    registry: Registry,
    labels: dict[str, str],
    env: dict[str, str],
    schema_label: str | None,
    expected: str,
) -> None:
    bad = {k: v for k, v in labels.items() if k != "io.baqup.schema"}
    if schema_label is not None:
        bad["io.baqup.schema"] = schema_label
    push_image(registry.url, "baqup/bad-label", "x", bad)
    code, _, err = baqup(["preflight", f"{registry.host}/baqup/bad-label:x", "--insecure"], env)
    assert code == 65, err
    assert expected in err


# ---------------------------------------------------------------------------
# authentication


def test_basic_auth_from_env_and_docker_config(
    basic_registry: Registry, labels: dict[str, str], env: dict[str, str]
) -> None:
    pushed = push_image(basic_registry.url, "baqup/private", "1", labels, auth=basic())
    image = f"{basic_registry.host}/baqup/private:1"
    code, _, err = baqup(["inspect", image, "--insecure"], env)
    assert code == 64
    assert "requires credentials" in err
    with_env = {**env, "BAQUP_REGISTRY_USERNAME": USER, "BAQUP_SECRET_REGISTRY_PASSWORD": PASSWORD}
    code, out, err = baqup(["inspect", image, "--insecure"], with_env)
    assert code == 0, err
    assert json.loads(out)["digest"] == pushed.digest
    assert PASSWORD not in out + err
    wrong = {**with_env, "BAQUP_SECRET_REGISTRY_PASSWORD": "wrong-" + PASSWORD}
    code, out, err = baqup(["preflight", image, "--insecure"], wrong)
    assert code == 64
    assert "denied access" in err
    assert USER in err
    assert "wrong-" not in out + err
    docker = Path(env["HOME"]) / ".docker"
    docker.mkdir(parents=True)
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (docker / "config.json").write_text(
        json.dumps({"auths": {basic_registry.host: {"auth": auth}}})
    )
    code, out, err = baqup(
        ["inspect", image, "--insecure"], {**env, "XDG_CACHE_HOME": "/nonexistent"}
    )
    assert code == 0, err
    assert PASSWORD not in out + err
    assert auth not in out + err


def test_bearer_token_flow_anonymous_and_with_credentials(
    token_setup: tuple[Registry, TokenServer], labels: dict[str, str], env: dict[str, str]
) -> None:
    registry, tokens = token_setup
    for repo in ("public/agent", "private/agent"):
        auth = {"Authorization": f"Bearer {tokens.push_token(repo)}"}
        push_image(registry.url, repo, "1", labels, auth=auth)
    seen_before = len(tokens.server.seen)
    code, out, err = baqup(["inspect", f"{registry.host}/public/agent:1", "--insecure"], env)
    assert code == 0, err
    asked = tokens.server.seen[seen_before:]
    assert len(asked) == 1
    assert "authorization" not in asked[0].headers
    assert "scope=repository%3Apublic%2Fagent%3Apull" in asked[0].path
    # Anonymously, the private repository is denied; with credentials it is read.
    code, _, err = baqup(["inspect", f"{registry.host}/private/agent:1", "--insecure"], env)
    assert code == 64
    assert "denied access" in err
    with_env = {**env, "BAQUP_REGISTRY_USERNAME": USER, "BAQUP_SECRET_REGISTRY_PASSWORD": PASSWORD}
    code, out, err = baqup(["inspect", f"{registry.host}/private/agent:1", "--insecure"], with_env)
    assert code == 0, err
    assert tokens.server.seen[-1].headers["authorization"].startswith("Basic ")
    wrong = {**with_env, "BAQUP_SECRET_REGISTRY_PASSWORD": "nope-nope"}
    code, out, err = baqup(["inspect", f"{registry.host}/private/agent:1", "--insecure"], wrong)
    assert code == 64
    assert "refused access" in err
    everything = out + err
    assert PASSWORD not in everything
    assert not any(token in everything for token in tokens.issued)


# ---------------------------------------------------------------------------
# hostile servers


def test_blob_whose_bytes_do_not_match_is_65(
    registry: Registry, labels: dict[str, str], env: dict[str, str]
) -> None:
    pushed = push_image(registry.url, "baqup/tampered", "1", labels)
    config = json.dumps({"config": {"Labels": {**labels, "io.baqup.type": "evil"}}}).encode()

    def tamper(seen: Seen) -> tuple[int, dict[str, str], bytes] | None:
        if seen.path.endswith(f"/blobs/{pushed.config}"):
            return 200, {"Content-Type": "application/octet-stream"}, config
        return None

    front = Server(rule=tamper, upstream=registry.url).start()
    try:
        error = fails(65, image=f"{front.host}/baqup/tampered:1", insecure=True, environ=env)
    finally:
        front.stop()
    assert pushed.config in error.message
    assert digest_of(config) in error.message
    assert not list(Path(env["XDG_CACHE_HOME"]).glob("baqup/images/*"))


def test_manifest_whose_bytes_do_not_match_is_65(
    registry: Registry, labels: dict[str, str], env: dict[str, str]
) -> None:
    pushed = push_image(registry.url, "baqup/tampered", "2", labels)
    forged = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST}).encode()

    def tamper(seen: Seen) -> tuple[int, dict[str, str], bytes] | None:
        if "/manifests/" in seen.path:
            return 200, {"Content-Type": DOCKER_MANIFEST}, forged
        return None

    front = Server(rule=tamper, upstream=registry.url).start()
    try:
        pinned = fails(
            65, image=f"{front.host}/baqup/tampered@{pushed.digest}", insecure=True, environ=env
        )
        # By tag, the registry's own Docker-Content-Digest is the claim checked.
        forged_header = Server(
            rule=lambda seen: (
                (200, {"Docker-Content-Digest": pushed.digest}, forged)
                if "/manifests/" in seen.path and seen.method == "GET"
                else None
            ),
            upstream=registry.url,
        ).start()
        try:
            tagged = fails(
                65, image=f"{forged_header.host}/baqup/tampered:2", insecure=True, environ=env
            )
        finally:
            forged_header.stop()
    finally:
        front.stop()
    for error in (pinned, tagged):
        assert pushed.digest in error.message
        assert digest_of(forged) in error.message


def test_a_registry_echoing_credentials_never_shows_them(env: dict[str, str]) -> None:
    def echo(seen: Seen) -> tuple[int, dict[str, str], bytes]:
        authorization = seen.headers.get("authorization")
        if authorization is None:
            return 401, {"WWW-Authenticate": 'Basic realm="echo"'}, b""
        decoded = base64.b64decode(authorization.split()[1]).decode()
        errors = [{"code": authorization}, {"code": decoded}]
        return 400, {"Content-Type": "application/json"}, json.dumps({"errors": errors}).encode()

    front = Server(rule=echo).start()
    credentials = {"BAQUP_REGISTRY_USERNAME": USER, "BAQUP_SECRET_REGISTRY_PASSWORD": PASSWORD}
    try:
        error = fails(
            65, image=f"{front.host}/baqup/x:1", insecure=True, environ={**env, **credentials}
        )
    finally:
        front.stop()
    assert "HTTP 400" in error.message
    assert PASSWORD not in error.message
    assert base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode() not in error.message
    assert PASSWORD not in str(error)


def test_redirect_to_another_origin_drops_authorization(
    basic_registry: Registry, labels: dict[str, str], env: dict[str, str]
) -> None:
    pushed = push_image(basic_registry.url, "baqup/redirected", "1", labels, auth=basic())
    from urllib.request import Request, urlopen

    with urlopen(
        Request(f"{basic_registry.url}/v2/baqup/redirected/blobs/{pushed.config}", headers=basic())
    ) as answer:
        config = answer.read()
    storage = Server(rule=lambda seen: (200, {}, config)).start()

    def redirect(seen: Seen) -> tuple[int, dict[str, str], bytes] | None:
        if "/blobs/" in seen.path:
            return 307, {"Location": f"{storage.url}/signed{seen.path}?sig=abc"}, b""
        return None

    front = Server(rule=redirect, upstream=basic_registry.url).start()
    credentials = {"BAQUP_REGISTRY_USERNAME": USER, "BAQUP_SECRET_REGISTRY_PASSWORD": PASSWORD}
    try:
        info = resolve_image(
            f"{front.host}/baqup/redirected:1", insecure=True, environ={**env, **credentials}
        )
    finally:
        front.stop()
        storage.stop()
    assert info.config_digest == pushed.config
    assert [s.path.split("?")[0] for s in storage.seen] == [
        f"/signed/v2/baqup/redirected/blobs/{pushed.config}"
    ]
    assert "authorization" not in storage.seen[0].headers
    assert all("authorization" in s.headers for s in front.seen if "/v2/baqup/" in s.path)


def test_429_and_5xx_are_retried_with_backoff(
    registry: Registry, labels: dict[str, str], env: dict[str, str]
) -> None:
    pushed = push_image(registry.url, "baqup/flaky", "1", labels)
    failures = {"manifests": [503, 502], "blobs": [429]}
    down: list[bool] = []

    def flaky(seen: Seen) -> tuple[int, dict[str, str], bytes] | None:
        if down:
            return 503, {}, b""
        for part, statuses in failures.items():
            if f"/{part}/" in seen.path and seen.method == "GET" and statuses:
                return statuses.pop(0), {"Retry-After": "0"}, b'{"errors":[{"code":"TOOMANY"}]}'
        return None

    front = Server(rule=flaky, upstream=registry.url).start()
    try:
        info = resolve_image(f"{front.host}/baqup/flaky:1", insecure=True, environ=env)
        assert info.digest == pushed.digest
        assert front.paths().count(f"/v2/baqup/flaky/blobs/{pushed.config}") == 2
        assert front.paths().count("/v2/baqup/flaky/manifests/1") == 4  # HEAD, 503, 502, 200
        # A registry that never recovers: 69 after the retries, not a hang.
        down.append(True)
        before = len(front.seen)
        error = fails(
            69, image=f"{front.host}/baqup/flaky:2", insecure=True, environ=env, retries=2
        )
        assert len(front.seen) - before == 3
    finally:
        front.stop()
    assert "HTTP 503" in error.message
    assert "after 3 attempts" in error.message


def test_preflight_api_for_a_controller(
    registry: Registry, labels: dict[str, str], env: dict[str, str], job_env: dict[str, str]
) -> None:
    push_image(registry.url, "baqup/agent-fs", "api", labels)
    info, config = preflight(
        f"{registry.host}/baqup/agent-fs:api", job_env, insecure=True, environ=env
    )
    assert info.labels == labels
    assert [p.variable for p in config.problems] == ["BAQUP_SOURCE_PATH"]


def test_tls_registry_verified_without_insecure(
    tmp_path: Path, labels: dict[str, str], env: dict[str, str]
) -> None:
    cert, key = tls_files(tmp_path)
    server = start_registry(tmp_path / "tls-registry", tls=(cert, key))
    try:
        trust = ssl.create_default_context(cafile=str(cert))
        pushed = push_image(server.url, "baqup/tls", "1", labels, context=trust)
        image = f"{server.host}/baqup/tls:1"
        code, out, err = baqup(["inspect", image], {**env, "SSL_CERT_FILE": str(cert)})
        assert code == 0, err
        assert json.loads(out)["digest"] == pushed.digest
        # Not trusted: refused, --insecure or not (it allows plain HTTP, not bad TLS).
        for extra in ([], ["--insecure"]):
            code, _, err = baqup(["inspect", image, *extra], env)
            assert code == 69, err
            assert "certificate" in err
    finally:
        server.stop()


def test_a_registry_that_never_answers_times_out(env: dict[str, str]) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the kernel; nothing ever answers
        image = f"127.0.0.1:{silent.getsockname()[1]}/baqup/x:1"
        error = fails(69, image=image, insecure=True, environ=env, timeout=0.2, retries=1)
    assert "timed out" in error.message
    assert "after 2 attempts" in error.message
