"""``rlhf-lit data inspect``: read one source and report rows, records kept, drops by reason, examples, and
(with ``--parts``) the sizes of a seeded split into named parts."""

from __future__ import annotations

import argparse
import json
import sys

from datamodules.readers import DataError
from datamodules.sources import GENERATORS, REGISTRY, load_source
from rlhf_lit.hf.hub import HubUnavailable


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
    p.add_argument("--parts", help='a split as JSON, e.g. \'{"sft": 2, "pairs": 4, "prompts": 4}\' or \'[2, 4, 4]\'')
    p.add_argument("--seed", type=int, default=1234, help="seed of the split (with --parts)")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="held-out share (with --parts)")
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
    if a.parts:
        from datamodules.blend import Blend, SourceSpec

        try:
            spec = SourceSpec(a.source, a.path, a.hub, a.split, options=options, skip_bad_rows=a.skip_bad_rows)
            blend = Blend([spec], seed=a.seed, split=json.loads(a.parts), eval_fraction=a.eval_fraction)
            blend._loaded = [result]  # already read above
            report["parts"] = blend.report()[0]["parts"]
        except (json.JSONDecodeError, ValueError, TypeError) as e:
            print(f"rlhf-lit data: --parts: {e}", file=sys.stderr)
            return 2
    if a.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    print(
        f"source {a.source}: {result.rows} rows read, {result.kept} records kept, "
        f"{sum(result.dropped.values())} dropped"
    )
    for reason, n in sorted(result.dropped.items()):
        print(f"  dropped {n:>6}  {reason}")
    for part, n in (report.get("parts") or {}).items():
        print(f"  part {part:<10} {n:>6} records")
    for ex in report["examples"]:
        print(json.dumps(ex, ensure_ascii=False)[:500])
    return 0
