"""Dev server persistence modes: the raw workflow and BuildWorkflow (instant doubles) per mode.

    python -m bench modes

For each mode of common.MODES a fresh dev server of our own: in-memory (start-dev's default),
file-backed (--db-filename), file-backed with `--sqlite-pragma journal_mode=wal --sqlite-pragma
synchronous=normal` (what `genloop up` ran before the levers), and the latter plus
`--dynamic-config-value history.transferProcessorMaxPollRPS=1000`; the mode whose flags equal
settings().temporal.dev_server_args() is labelled "genloop up". Same worker and doubles as
`bench overhead`; per mode TOTAL runs of each at concurrency 50 in alternating batches, and SINGLE
interleaved single runs.
"""

from __future__ import annotations

import os

from bench import common
from bench.overhead_bench import (
    CONCURRENCY,
    WARMUP,
    pair_stack,
    single_runs,
    throughput,
)

SCALE = float(os.environ.get("BENCH_SCALE", "1"))
TOTAL = max(10, int(100 * SCALE))
BATCH = max(10, int(50 * SCALE))
SINGLE = max(5, int(10 * SCALE))


async def run() -> None:
    rows = []
    stack = common.stack_equivalent()
    for mode in common.MODES:
        label = f"{mode} (genloop up)" if mode == stack else mode
        async with common.temp_dir("bench-modes-") as tmp, common.dev_server(tmp, mode) as env:
            async with pair_stack(env.client, tmp) as pair:
                await common.run_batch(pair.raw, WARMUP, WARMUP)
                await common.run_batch(pair.genloop, WARMUP, WARMUP)
                raw1, gen1 = await single_runs(pair, SINGLE)
                raw, gen, _ = await throughput(pair, TOTAL, BATCH, CONCURRENCY)
        rows.append([
            label,
            f"{raw.throughput:.1f}", common.ms(raw.p50),
            f"{gen.throughput:.1f}", common.ms(gen.p50),
            f"{gen.throughput / raw.throughput:.2f}x",
            common.ms(raw1.p50), common.ms(gen1.p50),
        ])
    common.print_table(
        f"dev server persistence modes: {TOTAL} runs each at concurrency {CONCURRENCY} "
        f"(alternating batches of {BATCH}); "
        f"single run: p50 of {SINGLE}",
        [
            "dev server",
            "raw wf/s",
            "raw p50",
            "genloop wf/s",
            "genloop p50",
            "genloop/raw",
            "raw single p50",
            "genloop single p50",
        ],
        rows,
    )


def main() -> int:
    return common.run_counting_warnings(run)
