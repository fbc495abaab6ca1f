"""What a hostile web page or a broken dependency can do to the API (docs/security.md, "API"):
DNS rebinding (a foreign Host), cross-site POSTs from pages in the user's browser (headless Chromium
loading a page from a sandbox preview and from another local origin), and a trigger while the
database is down (nothing starts, a retry makes exactly one build)."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import threading
import uuid
from pathlib import Path

import pytest
from e2b import AsyncSandbox
from sqlalchemy.engine import make_url

from genloop.http import preview_client
from sandbox_host.testing import free_port
from tests.api.conftest import SLOW_MARKER, SQLITE_ONLY, new_project, running_api, temporal_address
from tests.helpers.databases import postgres_databases
from tests.reliability.harness import wait_until
from tests.reliability.tcp_proxy import TcpProxy

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium is not installed (.ci/run installs it)")


@contextlib.asynccontextmanager
async def open_api(tmp_path, temporal_env, task_queue, db_url):
    """An API without a token, as `genloop up` runs it on loopback: the case a web page can attack."""
    async with running_api(
        tmp_path,
        token=None,
        TEMPORAL_ADDRESS=temporal_address(temporal_env),
        GENLOOP_TEMPORAL_TASK_QUEUE=task_queue,
        GENLOOP_DATABASE_URL=db_url,
    ) as server:
        yield server


@SQLITE_ONLY
async def test_foreign_host_is_refused_before_anything_else(api):
    async with api.client() as client:
        for method, path in (("GET", "/healthz"), ("GET", "/v1/builds/b-x"), ("POST", "/v1/projects/p/builds")):
            for host in ("evil.example", "evil.example:8000", "127.0.0.1.nip.io", "8080-abc.localhost"):
                response = await client.request(method, path, json={"goal": "x"}, headers={"Host": host})
                assert response.status_code == 421, (method, path, host, response.text)
                assert response.json()["error"]["code"] == "misdirected_request"
        for host in ("127.0.0.1", "localhost", f"localhost:{client.base_url.port}", "[::1]"):
            assert (await client.get("/healthz", headers={"Host": host})).status_code == 200, host


@SQLITE_ONLY
async def test_cross_site_posts_are_refused_without_a_token(tmp_path, temporal_env, worker, migrated_db_url):
    async with (
        open_api(tmp_path, temporal_env, worker.task_queue, migrated_db_url) as server,
        server.client() as client,
    ):
        project = new_project()
        own_origin = server.url
        refused = [
            {"Origin": "http://evil.example"},
            {"Origin": "http://8080-abc.localhost:49983"},  # a preview page: same site as localhost, not same origin
            {"Origin": "null"},
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site"},
            {"Origin": own_origin, "Sec-Fetch-Site": "cross-site"},
        ]
        for headers in refused:
            response = await client.post(f"/v1/projects/{project}/builds", json={"goal": "x"}, headers=headers)
            assert response.status_code == 403, (headers, response.text)
            assert response.json()["error"]["code"] == "forbidden"
        text = await client.post(
            f"/v1/projects/{project}/builds", content=b'{"goal": "x"}', headers={"Content-Type": "text/plain"}
        )
        assert text.status_code == 415
        assert await worker.repo.list_jobs(project) == []
        # The same request from the API's own origin (or from a non-browser client) goes through.
        for headers in ({"Origin": own_origin, "Sec-Fetch-Site": "same-origin"}, {}):
            accepted = await client.post(f"/v1/projects/{project}/builds", json={"goal": "x"}, headers=headers)
            assert accepted.status_code == 202, accepted.text


ATTACK_PAGE = """<!doctype html><html><body><pre id="out">running</pre><script>
const target = "{api}/v1/builds/{build_id}/cancel";
const out = [];
Promise.allSettled([
  fetch(target, {{method: "POST", mode: "no-cors"}}),
  fetch(target, {{method: "POST", mode: "no-cors", body: JSON.stringify({{reason: "pwned"}})}}),
  fetch(target, {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "application/json"}}, body: "{{}}"}}),
  fetch(target, {{method: "POST", headers: {{"Content-Type": "application/json"}}, body: "{{}}"}}),
  fetch("{api}/v1/builds/{build_id}").then(r => r.text()),
]).then(results => {{
  document.getElementById("out").textContent = JSON.stringify(
    results.map(r => r.status + ":" + (typeof r.value === "string" ? "read" : "")));
}});
</script></body></html>"""


async def _chromium(url: str, profile: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    stdout, _ = await asyncio.wait_for(proc.communicate(), 90)
    return stdout.decode()


@contextlib.contextmanager
def _local_page(html: str):
    """A page on another local origin (its own port), as any local web server would serve it."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


async def _sandbox_page(host, html: str) -> tuple[AsyncSandbox, str]:
    sandbox = await AsyncSandbox.create(timeout=300, **host.sdk_options())
    await sandbox.files.write("/home/user/site/index.html", html)
    await sandbox.commands.run("cd /home/user/site && python3 -m http.server 8080", background=True, timeout=0)
    url = f"http://{sandbox.get_host(8080)}/"

    async def serving() -> bool:
        async with preview_client(timeout=5) as client:
            return (await client.get(url)).status_code == 200

    await wait_until(serving, "the attack page to be served from the sandbox")
    return sandbox, url


@SQLITE_ONLY
@needs_chromium
async def test_pages_in_the_browser_cannot_cancel_a_build(
    tmp_path, temporal_env, worker, migrated_db_url, sandbox_host
):
    async with (
        open_api(tmp_path, temporal_env, worker.task_queue, migrated_db_url) as server,
        server.client() as client,
    ):
        accepted = await client.post(f"/v1/projects/{new_project()}/builds", json={"goal": f"a slow app {SLOW_MARKER}"})
        build_id = accepted.json()["build_id"]
        await wait_until(lambda: _stage_is(client, build_id, "code"), "the build to reach CODE")
        page = ATTACK_PAGE.format(api=server.url, build_id=build_id)
        sandbox, preview_page = await _sandbox_page(sandbox_host, page)
        try:
            with _local_page(page) as local_page:
                for origin, url in (("sandbox preview", preview_page), ("another local origin", local_page)):
                    dom = await _chromium(url, tmp_path / f"chromium-{origin.replace(' ', '-')}")
                    assert "running" not in dom, (origin, dom)  # the page's requests all completed
                    # Nothing the page sent changed the build, and it could not read it either.
                    build = (await client.get(f"/v1/builds/{build_id}")).json()
                    assert build["stage"] == "code", (origin, build)
                    assert '"fulfilled:read"' not in dom, (origin, dom)
        finally:
            await sandbox.kill()
        # The page's POSTs reached the API and were refused there (not lost on the way).
        refused = [line for line in server.log().splitlines() if f"/v1/builds/{build_id}/cancel" in line]
        assert refused and all(" 415" in line or " 403" in line or " 405" in line for line in refused), refused
        assert (await client.post(f"/v1/builds/{build_id}/cancel", json={})).status_code == 202


async def _stage_is(client, build_id: str, stage: str) -> bool:
    return (await client.get(f"/v1/builds/{build_id}")).json()["stage"] == stage


async def test_trigger_with_the_database_down_starts_nothing(tmp_path, temporal_env):
    """The row is written before the workflow starts: a 503 means no build exists anywhere, and the
    client's retry (no Idempotency-Key) makes exactly one."""
    from migrations.apply import upgrade
    from persistence.repository import JobRepository

    async with postgres_databases() as databases:
        url = await databases.create()
        await upgrade(url)
        parsed = make_url(url)
        proxy = TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432)
        await proxy.start()
        proxied = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        repo = JobRepository.from_url(url)
        project = new_project()
        try:
            # No worker polls this queue: the test is about what gets started, not about the build.
            queue = f"no-worker-{uuid.uuid4().hex}"
            async with open_api(tmp_path, temporal_env, queue, proxied) as server, server.client() as client:
                proxy.cut()
                down = await client.post(f"/v1/projects/{project}/builds", json={"goal": "an app"})
                assert down.status_code == 503, down.text
                proxy.restore()
                retried = await client.post(f"/v1/projects/{project}/builds", json={"goal": "an app"})
                assert retried.status_code == 202, retried.text
                build_id = retried.json()["build_id"]

                async def started() -> list[str]:
                    return [w.id async for w in temporal_env.client.list_workflows(f'ProjectId = "{project}"')]

                assert await wait_until(started, "the build's workflow to be listed") == [build_id]
                assert [job.id for job in await repo.list_jobs(project)] == [build_id]
                await temporal_env.client.get_workflow_handle(build_id).terminate("test over")
        finally:
            await repo.aclose()
            await proxy.close()
