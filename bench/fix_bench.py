"""What one fix attempt costs: builds whose first app fails and is fixed on attempt 2, against the
same builds when the first app works, with an instant model.

    python -m bench fix

The real stack (bench.real_stack): the real LLMRunner (OpenAI wire protocol, streaming) against a
fake model server over loopback HTTP that answers at once (tests.helpers.fake_models), the e2b SDK
against a local sandbox host, SQLite, a file-backed dev server. FIXED builds get a broken app (it
exits at start) and then a one-line fix; GOOD builds get the fixed app at once. Builds alternate
(fixed, good, fixed, ...) so both see the same machine. Times come from the persisted transitions:
"first failure" is when the build re-entered CODE for the fix (the failure was recorded just
before), "READY" when it entered READY.
"""

from __future__ import annotations

import asyncio
import os
import time

from activities.runners.llm import LLMRunner
from bench import common
from bench.real_stack import RealStack, real_stack
from genloop.http import preview_client
from tests.helpers.fake_models import FAKE_KEY, FakeOpenAIServer, edit_file, write_files

BUILDS = max(5, int(20 * float(os.environ.get("BENCH_SCALE", "1"))))
WARMUP = 2
PROCFILE = "web: python3 app.py\n"
APP = """import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *args):
        pass

ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
"""
CRASH = "raise SystemExit('boom: missing DATABASE_URL')\n"


async def one(stack: RealStack, model: FakeOpenAIServer, http, *, broken: bool) -> dict[str, float]:
    if broken:
        model.script(write_files({"app.py": CRASH + APP, "Procfile": PROCFILE}), edit_file("app.py", CRASH, ""))
    else:
        model.script(write_files({"app.py": APP, "Procfile": PROCFILE}))
    t0 = time.perf_counter()
    build_id, handle = await stack.start("an app", runner="llm")
    result = await handle.result()
    assert result.status == "ready", result
    while (await http.get(result.preview_url)).status_code != 200:
        await asyncio.sleep(0.01)
    total = time.perf_counter() - t0
    steps = await stack.transitions(build_id)
    at = [t for _, t in steps]
    stages = [s for s, _ in steps]
    out = {"total": total}
    if broken:
        assert stages.count("code") == 2, stages
        fix = len(stages) - 1 - stages[::-1].index("code")  # the second CODE: the fix attempt
        out["first failure → READY"] = (at[-1] - at[fix]).total_seconds()
        for (a, b), label in zip(
            ((fix, fix + 1), (fix + 1, fix + 2), (fix + 2, fix + 3)),
            ("CODE (fix: model + store)", "DEPS (sync files; no reinstall)", "CHECKS (restart app, /health)"),
            strict=True,
        ):
            out[label] = (at[b] - at[a]).total_seconds()
        first_checks = stages.index("checks")
        out["first CHECKS (start, exit, failure)"] = (at[fix] - at[first_checks]).total_seconds()
    await stack.sandboxes.kill(result.sandbox_id)
    return out


async def run() -> None:
    fixed: dict[str, list[float]] = {}
    good: list[float] = []
    async with FakeOpenAIServer(api_key=FAKE_KEY) as model:
        llm = LLMRunner.for_endpoint(provider="openai", base_url=model.base_url, api_key=FAKE_KEY, model="fake")
        async with real_stack("bench-fix-", runners={"llm": llm}, fix_attempts=2) as stack, \
                preview_client(timeout=10) as http:
            for i in range(WARMUP + BUILDS):
                f = await one(stack, model, http, broken=True)
                g = await one(stack, model, http, broken=False)
                if i < WARMUP:
                    continue
                for key, value in f.items():
                    fixed.setdefault(key, []).append(value)
                good.append(g["total"])
    rows = [[label, common.ms(common.percentile(v, 0.5)), common.ms(common.percentile(v, 0.95))]
            for label, v in fixed.items() if label != "total"]
    common.print_table(f"fix attempt: {BUILDS} builds fixed on attempt 2 (instant fake model, local sandbox host)",
                       ["segment", "p50", "p95"], rows)
    p50_fixed, p50_good = common.percentile(fixed["total"], 0.5), common.percentile(good, 0.5)
    common.print_table(
        f"start → preview 200, {BUILDS} builds each, interleaved",
        ["builds", "p50", "p95"],
        [["fixed on attempt 2", common.ms(p50_fixed), common.ms(common.percentile(fixed["total"], 0.95))],
         ["right the first time", common.ms(p50_good), common.ms(common.percentile(good, 0.95))],
         ["added cost of one fix attempt (p50 difference)", common.ms(p50_fixed - p50_good), ""]],
    )


def main() -> int:
    return common.run_counting_warnings(run)
