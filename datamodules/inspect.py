"""``rlhf-lit data inspect``: read one source and report rows, records kept, drops by reason, examples."""

from __future__ import annotations

import argparse
import json
import sys

from datamodules.readers import DataError
from datamodules.sources import GENERATORS, REGISTRY, load_source
from rlhf_lit.hub import HubUnavailable


def main(argv: list[str]) -> int:
    # A four-flag command, not a config schema: argparse is the right size here.
    p = argparse.ArgumentParser(prog="rlhf-lit data inspect", description=__doc__)
    p.add_argument("action", choices=["inspect"])
    p.add_argument("--source", required=True, help=f"one of {sorted({*REGISTRY, *GENERATORS})}")
    p.add_argument("--path", help="local file (.jsonl, .json, .csv, .parquet)")
    p.add_argument("--hub", help="hub dataset name (instead of --path)")
    p.add_argument("--split", default="train", help="hub split")
    p.add_argument("--options", default="{}", help="normalizer options as JSON, e.g. '{\"min_score_ratio\": 2}'")
    p.add_argument("--skip-bad-rows", action="store_true", help="count invalid rows instead of stopping")
    p.add_argument("--examples", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    try:
        options = json.loads(a.options)
        result = load_source(a.source, a.path, a.hub, a.split, None, options, a.skip_bad_rows)
    except json.JSONDecodeError as e:
        print(f"rlhf-lit data: --options is not valid JSON: {e}", file=sys.stderr)
        return 2
    except (DataError, HubUnavailable, ValueError) as e:
        print(f"rlhf-lit data: error: {e}", file=sys.stderr)
        return 1
    report = {**result.summary(), "examples": result.records[: a.examples]}
    if a.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    print(
        f"source {a.source}: {result.rows} rows read, {result.kept} records kept, "
        f"{sum(result.dropped.values())} dropped"
    )
    for reason, n in sorted(result.dropped.items()):
        print(f"  dropped {n:>6}  {reason}")
    for ex in report["examples"]:
        print(json.dumps(ex, ensure_ascii=False)[:500])
    return 0
