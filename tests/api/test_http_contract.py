"""The HTTP contract of the API process: validation, errors, authentication, health, OpenAPI and
start-up checks. Every mistake is a 4xx with the JSON error body, never a 500."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from sandbox_host.testing import free_port
from tests.api.conftest import REPO_ROOT, SQLITE_ONLY, api_env, new_project, running_api, temporal_address

JSON = {"Content-Type": "application/json"}
BUILDS = "/v1/projects/p-contract/builds"


def body(goal: object = "an app", **extra: object) -> bytes:
    return json.dumps({"goal": goal, **extra}).encode()


# (method, path, headers, content, expected status, expected error code)
MATRIX = [
    pytest.param("POST", BUILDS, JSON, b'{"goal": "an app"', 400, "malformed_json", id="malformed-json"),
    pytest.param("POST", BUILDS, JSON, b'{"goal": NaN}', 400, "malformed_json", id="nan"),
    pytest.param("POST", BUILDS, JSON, b"\xff\xfe{}", 400, "malformed_json", id="not-utf8"),
    pytest.param("POST", BUILDS, JSON, b"", 400, "malformed_json", id="empty-body"),
    pytest.param("POST", BUILDS, JSON, body(colour="red"), 422, "validation_failed", id="unknown-field"),
    pytest.param("POST", BUILDS, JSON, b"{}", 422, "validation_failed", id="missing-goal"),
    pytest.param("POST", BUILDS, JSON, b'["an app"]', 422, "validation_failed", id="not-an-object"),
    pytest.param("POST", BUILDS, JSON, body(""), 422, "validation_failed", id="empty-goal"),
    pytest.param("POST", BUILDS, JSON, body(" \t\n\u3000"), 422, "validation_failed", id="blank-goal"),
    pytest.param("POST", BUILDS, JSON, body("x" * 4001), 422, "validation_failed", id="goal-too-long"),
    pytest.param("POST", BUILDS, JSON, body("a\u0000b"), 422, "validation_failed", id="nul-in-goal"),
    pytest.param("POST", BUILDS, JSON, b'{"goal": "\\ud800"}', 422, "validation_failed", id="lone-surrogate"),
    pytest.param("POST", BUILDS, JSON, body(42), 422, "validation_failed", id="goal-not-a-string"),
    pytest.param("POST", BUILDS, JSON, body(runner="llm"), 422, "validation_failed", id="runner-not-offered"),
    pytest.param("POST", BUILDS, JSON, body("x" * 11 * 1024 * 1024), 413, "payload_too_large", id="oversized-body"),
    pytest.param(
        "POST", BUILDS, {"Content-Type": "text/plain"}, body(), 415, "unsupported_media_type", id="text-plain"
    ),
    pytest.param("POST", BUILDS, {}, body(), 415, "unsupported_media_type", id="no-content-type"),
    pytest.param(
        "POST",
        BUILDS,
        {"Content-Type": "application/json; charset=latin-1"},
        body(),
        415,
        "unsupported_media_type",
        id="latin1-charset",
    ),
    pytest.param("POST", "/v1/projects/bad%20id/builds", JSON, body(), 400, "invalid_parameter", id="bad-project-id"),
    pytest.param(
        "POST", f"/v1/projects/{'p' * 65}/builds", JSON, body(), 400, "invalid_parameter", id="long-project-id"
    ),
    pytest.param(
        "POST",
        BUILDS,
        {**JSON, "Idempotency-Key": "has space"},
        body(),
        400,
        "invalid_parameter",
        id="bad-idempotency-key",
    ),
    pytest.param("GET", "/v1/builds/b-unknown", {}, None, 404, "not_found", id="unknown-build"),
    pytest.param("GET", "/v1/builds/b-unknown/events", {}, None, 404, "not_found", id="unknown-build-events"),
    pytest.param("GET", "/v1/builds/bad.id", {}, None, 400, "invalid_parameter", id="bad-build-id"),
    pytest.param("GET", "/v1/builds/b-unknown/", {}, None, 404, "not_found", id="trailing-slash"),
    pytest.param("GET", "/v2/nothing", {}, None, 404, "not_found", id="unknown-route"),
    pytest.param("DELETE", "/v1/builds/b-unknown", {}, None, 405, "method_not_allowed", id="wrong-method"),
    pytest.param("GET", f"{BUILDS}?limit=0", {}, None, 400, "invalid_parameter", id="limit-zero"),
    pytest.param("GET", f"{BUILDS}?limit=ten", {}, None, 400, "invalid_parameter", id="limit-not-a-number"),
    pytest.param("GET", f"{BUILDS}?limit=101", {}, None, 400, "invalid_parameter", id="limit-too-big"),
    pytest.param("GET", f"{BUILDS}?limit=1&limit=2", {}, None, 400, "invalid_parameter", id="limit-twice"),
    pytest.param("GET", f"{BUILDS}?page=2", {}, None, 400, "invalid_parameter", id="unknown-query-param"),
    pytest.param("GET", f"{BUILDS}?cursor=no.pe", {}, None, 400, "invalid_parameter", id="bad-cursor"),
    pytest.param("GET", "/v1/builds/b-unknown/logs", {}, None, 404, "not_found", id="unknown-build-logs"),
    pytest.param("POST", "/v1/builds/b-unknown/cancel", JSON, None, 404, "not_found", id="cancel-unknown"),
    pytest.param(
        "POST", "/v1/builds/b-unknown/cancel", {}, None, 415, "unsupported_media_type", id="cancel-without-content-type"
    ),
]


@SQLITE_ONLY
@pytest.mark.parametrize(("method", "path", "headers", "content", "status", "code"), MATRIX)
async def test_client_mistakes(http, method, path, headers, content, status, code):
    response = await http.request(method, path, headers=headers, content=content)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert set(response.json()) == {"error"} and set(error) == {"code", "message"}


@SQLITE_ONLY
async def test_wrong_method_names_the_allowed_ones(http):
    response = await http.delete("/v1/builds/b-unknown")
    assert response.status_code == 405 and "GET" in response.headers["allow"]


@SQLITE_ONLY
async def test_oversized_chunked_body_is_refused_while_streaming(http):
    async def chunks():
        for _ in range(11 * 1024):
            yield b"x" * 1024

    response = await http.post(BUILDS, headers=JSON, content=chunks())
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"


@SQLITE_ONLY
async def test_cancel_body_is_validated(http, worker):
    build_id = f"b-{new_project()}"
    await worker.repo.create_job(build_id, "p-contract", "a row only")
    bad = await http.post(f"/v1/builds/{build_id}/cancel", json={"reason": "x", "force": True})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_failed"
    wrong_type = await http.post(
        f"/v1/builds/{build_id}/cancel", content=b"reason", headers={"Content-Type": "text/plain"}
    )
    assert wrong_type.status_code == 415


# --- authentication -----------------------------------------------------------------------------


@SQLITE_ONLY
async def test_token_required(api):
    async with api.client(anonymous=True) as anonymous, api.client(token="wrong-" + api.token) as wrong:
        for client in (anonymous, wrong):
            for method, path in (("POST", BUILDS), ("GET", "/v1/builds/b-x"), ("GET", "/no/such/route")):
                response = await client.request(method, path, json={"goal": "an app"})
                assert response.status_code == 401, (method, path)
                assert response.headers["www-authenticate"] == "Bearer"
                assert response.json()["error"]["code"] == "unauthorized"
                assert api.token not in response.text
        # Probes and the API description stay open.
        assert (await anonymous.get("/healthz")).status_code == 200
        assert (await anonymous.get("/openapi.json")).status_code == 200
    async with api.client() as authorized:
        accepted = await authorized.post(f"/v1/projects/{new_project()}/builds", json={"goal": "an app"})
        assert accepted.status_code == 202, accepted.text
        assert accepted.headers["location"] == f"/v1/builds/{accepted.json()['build_id']}"
    assert api.token not in api.log()


@SQLITE_ONLY
async def test_without_a_token_no_auth_is_required(tmp_path, temporal_env, worker, migrated_db_url):
    async with (
        running_api(
            tmp_path,
            token=None,
            TEMPORAL_ADDRESS=temporal_address(temporal_env),
            GENLOOP_TEMPORAL_TASK_QUEUE=worker.task_queue,
            GENLOOP_DATABASE_URL=migrated_db_url,
        ) as server,
        server.client() as client,
    ):
        response = await client.post(f"/v1/projects/{new_project()}/builds", json={"goal": "an open app"})
        assert response.status_code == 202, response.text
        assert "security" not in (await client.get("/openapi.json")).json()


# --- health, OpenAPI, start-up ------------------------------------------------------------------


@SQLITE_ONLY
async def test_healthz(http):
    response = await http.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "components": {"database": {"status": "ok"}, "temporal": {"status": "ok"}},
    }


@SQLITE_ONLY
async def test_openapi_describes_every_route(http):
    response = await http.get("/openapi.json")
    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"].startswith("3.1")
    assert {path: set(ops) - {"parameters"} for path, ops in doc["paths"].items()} == {
        "/v1/projects/{project_id}/builds": {"post", "get"},
        "/v1/builds/{build_id}": {"get"},
        "/v1/builds/{build_id}/events": {"get"},
        "/v1/builds/{build_id}/logs": {"get"},
        "/v1/builds/{build_id}/cancel": {"post"},
        "/v1/builds/{build_id}/preview/wake": {"post"},
        "/v1/builds/{build_id}/preview/pause": {"post"},
        "/v1/projects/{project_id}": {"get"},
        "/v1/builds/{build_id}/files": {"get"},
        "/v1/builds/{build_id}/files/{path}": {"get"},
        "/v1/builds/{build_id}/diff": {"get"},
        "/healthz": {"get"},
        "/openapi.json": {"get"},
    }
    schemas = doc["components"]["schemas"]
    body = doc["paths"]["/v1/projects/{project_id}/builds"]["post"]["requestBody"]["content"]["application/json"]
    assert [ref["$ref"].rsplit("/", 1)[1] for ref in body["schema"]["oneOf"]] == [
        "NewApp",
        "ChangeApp",
        "EditFiles",
        "RestoreVersion",
    ]
    trigger = schemas["NewApp"]
    assert trigger["additionalProperties"] is False and trigger["required"] == ["goal"]
    assert trigger["properties"]["goal"]["maxLength"] == 4000
    assert schemas["RestoreVersion"]["required"] == ["base"] and schemas["EditFiles"]["required"] == ["edits"]
    runner = trigger["properties"]["runner"]
    assert runner.get("enum", [runner.get("const")]) == ["template"]  # pydantic writes one value as const
    assert schemas["ErrorBody"]["additionalProperties"] is False
    assert {"401", "500"} <= set(doc["paths"]["/v1/builds/{build_id}"]["get"]["responses"])
    assert doc["security"] == [{"bearer": []}] and doc["paths"]["/healthz"]["get"]["security"] == []
    # Every reference resolves.
    refs = {r.rsplit("/", 1)[1] for r in _refs(doc)}
    assert refs <= set(schemas), refs - set(schemas)


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


async def test_refuses_to_serve_the_network_without_a_token(tmp_path):
    env = api_env(GENLOOP_API_HOST="0.0.0.0", GENLOOP_API_PORT=str(free_port()), GENLOOP_DATA_DIR=str(tmp_path))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "api",
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert "GENLOOP_API_TOKEN is not set" in stderr.decode() and "0.0.0.0" in stderr.decode()


@SQLITE_ONLY
async def test_temporal_down_means_503_and_nothing_runs(tmp_path, worker, migrated_db_url):
    project_id = new_project()
    async with (
        running_api(
            tmp_path, token=None, TEMPORAL_ADDRESS=f"127.0.0.1:{free_port()}", GENLOOP_DATABASE_URL=migrated_db_url
        ) as server,
        server.client() as client,
    ):
        response = await client.post(f"/v1/projects/{project_id}/builds", json={"goal": "an app"})
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "service_unavailable" and response.headers["retry-after"]
        assert "127.0.0.1" not in response.text

        health = await client.get("/healthz")
        assert health.status_code == 503
        assert health.json()["components"] == {"database": {"status": "ok"}, "temporal": {"status": "unavailable"}}
    # The row written before the start is closed, so nothing lingers as queued and a start that
    # happened after all would fail at STARTING instead of running unseen.
    [job] = await worker.repo.list_jobs(project_id)
    assert job.status == "failed" and job.error_message == response.json()["error"]["message"]


async def test_database_down_means_503(tmp_path, temporal_env):
    unreachable = f"postgresql+asyncpg://genloop@127.0.0.1:{free_port()}/genloop"
    async with (
        running_api(
            tmp_path, token=None, TEMPORAL_ADDRESS=temporal_address(temporal_env), GENLOOP_DATABASE_URL=unreachable
        ) as server,
        server.client() as client,
    ):
        response = await client.get("/v1/builds/b-anything")
        assert response.status_code == 503 and response.json()["error"]["code"] == "service_unavailable"
        health = await client.get("/healthz")
        assert health.status_code == 503
        assert health.json()["components"] == {"database": {"status": "unavailable"}, "temporal": {"status": "ok"}}
