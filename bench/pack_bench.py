"""Pack / unpack throughput against copy and naive-torch baselines.

Same as `pdxfer bench pack`; runnable from a checkout: python bench/pack_bench.py --json
"""

from pdxfer.pack.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
