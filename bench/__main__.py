"""`python -m bench <name>|all`: run one benchmark, or all of them in sequence.

Every scenario starts what it needs (its own dev server on a free port, sandbox host, SQLite
database in a temp dir) and removes it afterwards. `BENCH_SCALE=0.25` shrinks the run counts for a
quick look; the numbers in docs/benchmarks.md are from the default scale.
"""

import os
import sys
import time

BENCHMARKS = {
    "overhead": "bench.overhead_bench",
    "preview": "bench.preview_bench",
    "concurrency": "bench.concurrency_bench",
    "modes": "bench.modes_bench",
    "levers": "bench.levers_bench",
    "persistence": "bench.persistence_bench",
    "sandbox-host": "bench.sandbox_host_bench",
    "fix": "bench.fix_bench",
    "hosts": "bench.hosts_bench",
    "logs": "bench.logs_bench",
    "previews": "bench.wake_bench",
}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or (argv[0] not in BENCHMARKS and argv[0] != "all"):
        print(f"usage: python -m bench {{{','.join(BENCHMARKS)}}}|all", file=sys.stderr)
        return 2
    names = list(BENCHMARKS) if argv[0] == "all" else [argv[0]]
    status = 0
    for name in names:
        started = time.perf_counter()
        print(f"\n=== bench {name} ===", flush=True)
        module = __import__(BENCHMARKS[name], fromlist=["main"])
        status = module.main() or status
        print(f"=== bench {name}: {time.perf_counter() - started:.0f} s ===", flush=True)
    return status


code = main(sys.argv[1:])
sys.stdout.flush()
sys.stderr.flush()
# The Temporal SDK's native threads can abort the interpreter during finalization; everything
# this process started has been stopped and removed by now, so leave without it.
os._exit(code)
