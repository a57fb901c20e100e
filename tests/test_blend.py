"""Blends: stage parts are disjoint, deterministic, cover every record; weights apply."""

import json

import pytest
from conftest import write_jsonl

from datamodules.blend import Blend, SourceSpec

H, A = "\n\nHuman:", "\n\nAssistant:"


def hh_file(tmp_path, n=200, name="hh.jsonl"):
    rows = [{"chosen": f"{H} q{i}{A} yes {i}", "rejected": f"{H} q{i}{A} no {i}"} for i in range(n)]
    return str(write_jsonl(tmp_path / name, rows))


def keys(records):
    return [(r["source"], r["row"]) for r in records]


def test_split_is_disjoint_covering_and_deterministic(tmp_path):
    blend = Blend([SourceSpec("hh_rlhf", path=hh_file(tmp_path))], seed=7, split=[2, 4, 4], eval_fraction=0.1)
    parts = {s: keys(blend.records(s)) for s in ("sft", "reward", "ppo")}
    parts["eval"] = keys(blend.records("sft", "eval"))
    sets = {k: set(v) for k, v in parts.items()}
    assert sum(len(s) for s in sets.values()) == 200 == len(set().union(*sets.values()))
    assert (len(sets["eval"]), len(sets["sft"]), len(sets["reward"]), len(sets["ppo"])) == (20, 36, 72, 72)
    again = Blend([SourceSpec("hh_rlhf", path=hh_file(tmp_path))], seed=7, split=[2, 4, 4], eval_fraction=0.1)
    assert keys(again.records("reward")) == parts["reward"]
    other = Blend([SourceSpec("hh_rlhf", path=hh_file(tmp_path))], seed=8, split=[2, 4, 4], eval_fraction=0.1)
    assert set(keys(other.records("reward"))) != sets["reward"]


def test_stage_views_and_sft_only_sources(tmp_path):
    tldr = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"P{i}\nTL;DR:", "label": f" s{i}"} for i in range(50)])
    blend = Blend([SourceSpec("hh_rlhf", path=hh_file(tmp_path)), SourceSpec("tldr", path=str(tldr))], eval_fraction=0)
    sft, reward, ppo = (blend.records(s) for s in ("sft", "reward", "ppo"))
    assert {r["source"] for r in reward} == {"hh_rlhf"}  # tl;dr rows have no pairs
    assert set(sft[0]) == {"source", "row", "prompt", "response"} and set(ppo[0]) == {"source", "row", "prompt"}
    tldr_rows = [r for r in sft + ppo if r["source"] == "tldr"]
    assert len(tldr_rows) == 50  # split 2:4 between the two stages it supports, nothing lost
    assert len({r["row"] for r in tldr_rows}) == 50


def test_weights_repeat_and_subsample(tmp_path):
    a, b = hh_file(tmp_path, 100, "a.jsonl"), hh_file(tmp_path, 100, "b.jsonl")
    blend = Blend(
        [SourceSpec("hh_rlhf", path=a, weight=2.0, label="a"), SourceSpec("hh_rlhf", path=b, weight=0.5, label="b")],
        split=[1, 0, 0],
        eval_fraction=0,
    )
    sft = blend.records("sft")
    assert sum(r["source"] == "a" for r in sft) == 200 and sum(r["source"] == "b" for r in sft) == 50
    report = {r["source"]: r for r in blend.report()}
    assert report["a"]["rows"] == 100 and report["a"]["parts"]["sft"] == 100


def test_blend_validation():
    with pytest.raises(ValueError, match="at least one source"):
        Blend([])
    with pytest.raises(ValueError, match="share a label"):
        Blend([SourceSpec("synthetic"), SourceSpec("synthetic")])
    with pytest.raises(ValueError, match="weight must be >= 0"):
        SourceSpec("synthetic", weight=-1)
    with pytest.raises(ValueError, match="split must be three"):
        Blend([SourceSpec("synthetic")], split=[1, 1])


def test_named_parts_are_disjoint_read_by_their_datamodule_and_reported(tmp_path, tokenizer_dir):
    from datamodules import PreferenceDataModule, SFTDataModule
    from datamodules.inspect import main
    from rlhf_lit.hf.tokenizer import HFTokenizer

    split = {"demos": 1, "pairs": 2, "more_pairs": 1}
    blend = Blend([SourceSpec("hh_rlhf", path=hh_file(tmp_path))], seed=7, split=split, eval_fraction=0.1)
    sets = {p: set(keys(blend.records(p, kind="reward"))) for p in split}
    sets["eval"] = set(keys(blend.records("pairs", "eval", kind="reward")))
    assert sum(len(s) for s in sets.values()) == 200 == len(set().union(*sets.values()))  # disjoint, covering
    assert {p: len(s) for p, s in sets.items()} == {"demos": 45, "pairs": 90, "more_pairs": 45, "eval": 20}
    # the held-out part is one list in one order, whichever kind reads it
    assert keys(blend.records("demos", "eval", kind="sft")) == keys(blend.records("pairs", "eval", kind="reward"))
    dm = PreferenceDataModule(blend, HFTokenizer(tokenizer_dir), part="more_pairs", max_seq_len=64)
    dm.setup("fit")
    assert len(dm.train_items) == 45
    with pytest.raises(ValueError, match=r"data part 'nope' as 'sft': parts are \['demos', 'pairs', 'more_pairs'\]"):
        SFTDataModule(blend, HFTokenizer(tokenizer_dir), part="nope").setup("fit")
    assert main(["inspect", "--source", "hh_rlhf", "--path", hh_file(tmp_path), "--parts", json.dumps(split),
                 "--seed", "7", "--eval-fraction", "0.1", "--json"]) == 0  # fmt: skip


def test_records_a_kind_cannot_use_are_counted_as_dropped(tmp_path, tokenizer_dir):
    from datamodules import PreferenceDataModule
    from rlhf_lit.hf.tokenizer import HFTokenizer

    sft_rows = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(40)])
    sources = [SourceSpec("hh_rlhf", path=hh_file(tmp_path)), SourceSpec("json", path=str(sft_rows))]
    blend = Blend(sources, seed=7, split={"sft": 1, "pairs": 1}, eval_fraction=0.0)
    dm = PreferenceDataModule(blend, HFTokenizer(tokenizer_dir), part="pairs", max_seq_len=64)
    dm.setup("fit")
    assert dm.dropped["json_train_not_reward"] == 20  # the json rows of part "pairs" have no pair
