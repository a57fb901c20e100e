"""The same loaders on real public samples in ../shared/data (skipped when the folder is absent)."""

import pytest
from conftest import SHARED_DATA

from datamodules.sources import load_source

pytestmark = pytest.mark.skipif(not SHARED_DATA.exists(), reason=f"{SHARED_DATA} not present")


def check(result):
    assert result.rows == result.kept + sum(result.dropped.values())
    assert result.kept > 0
    return result


def test_hh_rlhf_harmless_sample():
    res = check(load_source("hh_rlhf", str(SHARED_DATA / "hh-rlhf/harmless-base-test-part-a.jsonl")))
    assert res.rows == 1400
    for r in res.records:
        assert r["prompt"].endswith("\n\nAssistant:") and r["prompt"].startswith("\n\nHuman:")
        assert r["chosen"].strip() and r["rejected"].strip() and r["chosen"] != r["rejected"]


def test_tldr_layouts_agree_on_real_rows():
    a = check(load_source("tldr", str(SHARED_DATA / "tldr/tldr-openai-layout-part-a.jsonl")))
    b = check(load_source("tldr", str(SHARED_DATA / "tldr/tldr-carperai-layout-part-a.jsonl")))
    assert [(r["prompt"], r["response"]) for r in a.records] == [(r["prompt"], r["response"]) for r in b.records]


def test_shp_comparisons_and_prompts():
    shp = check(load_source("shp", str(SHARED_DATA / "shp/shp-card-example.jsonl"), options={"min_score_ratio": 2}))
    assert shp.records[0]["chosen"].startswith(" Pectinex")  # labels == 1: A preferred
    cmp_ = check(load_source("comparisons", str(SHARED_DATA / "comparisons/openai-comparisons-readme-example.jsonl")))
    assert cmp_.records[0]["prompt"].endswith("\nTL;DR:")
    pr = check(load_source("prompts", str(SHARED_DATA / "prompts/awesome-chatgpt-prompts-2023-06-24.csv")))
    assert pr.rows == 164
