"""The fake model servers as other suites use them: scripted over HTTP from outside their process."""

from __future__ import annotations

import asyncio
import json
import sys

import httpx

from activities.runners.base import Capability, RunnerTask, no_progress
from activities.runners.llm import LLMRunner
from genloop.settings import REPO_ROOT
from tests.helpers.fake_models import reply_to_json, write_files


async def test_a_fake_server_in_its_own_process_is_scripted_over_http():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.helpers.fake_models", "anthropic", cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        assert line.startswith("FAKE_MODEL_BASE_URL="), line
        base_url = line.split("=", 1)[1]
        async with httpx.AsyncClient(base_url=base_url) as http:
            script = {"reset": True, "replies": [reply_to_json(write_files({"app.py": "x\n"}))]}
            assert (await http.post("/_fake/script", json=script)).json() == {"queued": 1}
            runner = LLMRunner.for_endpoint(provider="anthropic", base_url=base_url, api_key="k")
            result = await runner.run(RunnerTask(kind=Capability.NEW_APP, goal="x"), no_progress)
            assert result.files == {"app.py": "x\n"}
            seen = (await http.get("/_fake/requests")).json()["requests"]
        assert len(seen) == 1 and json.dumps(seen[0]["body"]).count("write_files") >= 1
    finally:
        proc.terminate()
        await proc.wait()
