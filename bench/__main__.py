"""`python -m bench <name>`: run one benchmark."""

import sys

BENCHMARKS = {
    "sandbox-host": "bench.sandbox_host_bench",
}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in BENCHMARKS:
        print(f"usage: python -m bench {{{','.join(BENCHMARKS)}}}", file=sys.stderr)
        return 2
    module = __import__(BENCHMARKS[argv[0]], fromlist=["main"])
    return module.main()


sys.exit(main(sys.argv[1:]))
