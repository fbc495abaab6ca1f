"""`sandbox_host.preview_domain`: a host on another machine advertises previews under a name the
other machines resolve (wildcard DNS), and serves them under that name; any other name stays 421."""

from __future__ import annotations

import asyncio

import httpx

from sandbox_host.testing import running_host
from tests.helpers.sandboxes import SERVER, sandbox

DOMAIN = "sandboxes.machine-b.test"


async def test_previews_are_advertised_and_served_under_the_preview_domain(tmp_path):
    async with running_host(tmp_path, preview_domain=DOMAIN) as host, sandbox(host.sdk_options()) as sb:
        preview_host = sb.get_host(8080)
        assert preview_host == f"8080-{sb.sandbox_id}.{DOMAIN}"
        await sb.files.write_files([
            {"path": "/home/user/project/server.py", "data": SERVER},
            {"path": "/home/user/project/content.txt", "data": "served under the preview domain"},
        ])
        await sb.commands.run("cd /home/user/project && python3 server.py 8080", background=True, timeout=0)
        # As a machine whose DNS maps *.sandboxes.machine-b.test to this host would send it.
        async with httpx.AsyncClient(base_url=host.url, timeout=5) as http:
            for _ in range(200):
                page = await http.get("/", headers={"Host": preview_host})
                if page.status_code == 200:
                    break
                await asyncio.sleep(0.05)
            assert (page.status_code, page.text) == (200, "served under the preview domain")
            foreign = await http.get("/", headers={"Host": f"8080-{sb.sandbox_id}.elsewhere.test"})
            assert foreign.status_code == 421
