"""Normalizers on fixtures written here in each schema, with the oddities of the real data."""

import json
import subprocess
import sys

import pytest
from conftest import write_jsonl

from datamodules.readers import DataError
from datamodules.sources import load_source
from rlhf_lit.hf.chat_format import hh_turns

H, A = "\n\nHuman:", "\n\nAssistant:"


def hh_rows():
    return [
        # multi-turn, shared history, different final replies (the reply mentions "Assistant:")
        {
            "chosen": f"{H} hi{A} hello{H} how to bake?{A} Use an oven. Assistant: done",
            "rejected": f"{H} hi{A} hello{H} how to bake?{A} No.",
        },
        # the common prefix runs into the replies ("I ..."): cut back to the last Assistant turn
        {"chosen": f"{H} q{A} I think yes.", "rejected": f"{H} q{A} I think no."},
        {"chosen": f"{H} q{A}", "rejected": f"{H} q{A} something"},  # empty chosen reply
        {"chosen": f"{H} q{A} a", "rejected": f"{H} q{A} a"},  # identical
        {"chosen": f"{H} q{A} yes{H} more?{A} ok", "rejected": f"{H} q{A} no{H} more?{A} ok!"},  # histories differ
        {"chosen": f"{H} q{A} x", "rejected": f"{H} q{A}  "},  # empty rejected (spaces only)
        {"chosen": "no assistant here", "rejected": "nothing shared"},
    ]


def test_hh_prompt_is_common_prefix_cut_at_last_assistant(tmp_path):
    res = load_source("hh_rlhf", str(write_jsonl(tmp_path / "hh.jsonl", hh_rows())))
    assert res.rows == 7 and res.kept == 2
    assert dict(res.dropped) == {
        "empty_chosen": 1,
        "identical": 1,
        "history_differs": 1,
        "empty_rejected": 1,
        "no_shared_assistant_turn": 1,
    }
    first, second = res.records
    assert first["prompt"] == f"{H} hi{A} hello{H} how to bake?{A}"
    assert first["chosen"] == " Use an oven. Assistant: done" and first["rejected"] == " No."
    assert second["prompt"] == f"{H} q{A}" and second["chosen"] == " I think yes."
    assert first["source"] == "hh_rlhf" and (first["row"], second["row"]) == (0, 1)
    assert res.rows == res.kept + sum(res.dropped.values())


def test_hh_turns():
    assert hh_turns(f"{H} hi{A} hello{H} bye{A}") == [
        ("human", "hi"),
        ("assistant", "hello"),
        ("human", "bye"),
        ("assistant", ""),
    ]


def shp_row(post_id, labels, ratio, a="A reply", b="B reply"):
    return {
        "post_id": post_id,
        "history": "Why is the sky blue?",
        "human_ref_A": a,
        "human_ref_B": b,
        "labels": labels,
        "score_A": 10,
        "score_B": 3,
        "score_ratio": ratio,
    }


def test_shp_label_direction_ratio_filter_and_post_cap(tmp_path):
    rows = [shp_row("p1", 1, 3.0), shp_row("p1", 0, 2.5), shp_row("p1", 1, 4.0), shp_row("p2", 1, 1.2)]
    path = str(write_jsonl(tmp_path / "shp.jsonl", rows))
    res = load_source("shp", path, options={"min_score_ratio": 2, "max_pairs_per_post": 2})
    assert res.kept == 2 and dict(res.dropped) == {"post_cap": 1, "score_ratio_below_min": 1}
    assert res.records[0]["chosen"] == " A reply" and res.records[1]["chosen"] == " B reply"
    assert res.records[0]["prompt"].endswith("Why is the sky blue?\n\nAssistant:")


def test_tldr_layouts_give_the_same_records(tmp_path):
    openai = [
        {"subreddit": "tifu", "title": "T", "post": "x", "summary": " short"},
        {"subreddit": "a", "title": "b", "post": "c", "summary": "   "},
    ]
    carper = [
        {"prompt": "SUBREDDIT: r/tifu\nTITLE: T\nPOST: x\nTL;DR:", "label": " short"},
        {"prompt": "SUBREDDIT: r/a\nTITLE: b\nPOST: c\nTL;DR:", "label": "   "},
    ]
    a = load_source("tldr", str(write_jsonl(tmp_path / "a.jsonl", openai)))
    b = load_source("tldr", str(write_jsonl(tmp_path / "b.jsonl", carper)))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "source"} for r in rs]
    assert strip(a.records) == strip(b.records) and a.kept == 1
    assert a.dropped == b.dropped == {"empty_response": 1}


def test_comparisons_both_layouts(tmp_path):
    nested = {
        "info": {"id": "t3", "post": "P", "title": "T", "subreddit": "s"},
        "summaries": [{"text": " first", "policy": "a", "note": None}, {"text": " second", "policy": "b"}],
        "choice": 1,
        "worker": "w",
        "batch": "b",
        "split": "train",
        "extra": {},
    }
    carper = {
        "prompt": "SUBREDDIT: r/s\nTITLE: T\nPOST: P\nTL;DR:",
        "chosen": "TL;DR: second",
        "rejected": "TL;DR: first",
    }
    n = load_source("comparisons", str(write_jsonl(tmp_path / "n.jsonl", [nested]))).records[0]
    c = load_source("comparisons", str(write_jsonl(tmp_path / "c.jsonl", [carper]))).records[0]
    assert (n["prompt"], n["chosen"], n["rejected"]) == (c["prompt"], c["chosen"], c["rejected"])
    assert n["chosen"] == " second"


def test_prompts_csv_rm_static_and_generic_json(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text('"act","prompt"\n"Linux","act as a terminal, ""quoted"""\n"Empty",""\n')
    res = load_source("prompts", str(csv_path))
    assert res.kept == 1 and res.dropped == {"empty_prompt": 1}
    assert res.records[0]["prompt"] == '\n\nHuman: act as a terminal, "quoted"\n\nAssistant:'
    rm = load_source(
        "rm_static",
        str(write_jsonl(tmp_path / "rm.jsonl", [{"prompt": "P", "response": " a", "chosen": " a", "rejected": " b"}])),
    )
    assert rm.records[0]["rejected"] == " b"
    gen = load_source(
        "json",
        str(write_jsonl(tmp_path / "g.jsonl", [{"q": "Q?", "a": "A.", "m": 1}])),
        options={"fields": {"prompt": "q", "response": "a", "margin": "m"}, "template": "Q: {prompt}\nA:"},
    )
    assert gen.records[0]["prompt"] == "Q: Q?\nA:" and gen.records[0]["margin"] == 1.0


def test_parquet_and_json_list(tmp_path):
    import pandas as pd

    pd.DataFrame([{"prompt": "p", "label": " l"}]).to_parquet(tmp_path / "t.parquet")
    assert load_source("tldr", str(tmp_path / "t.parquet")).kept == 1
    (tmp_path / "t.json").write_text(json.dumps([{"prompt": "p", "label": " l"}]))
    assert load_source("tldr", str(tmp_path / "t.json")).kept == 1


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"chosen": "a", "rejected": "b"}\n{"chosen": "a", \n', r"bad\.jsonl:2: malformed JSON"),
        ('{"chosen": "a"}\n', r"bad\.jsonl:1: field 'rejected' is missing"),
        ('{"chosen": 3, "rejected": "b"}\n', r"bad\.jsonl:1: field 'chosen' should be a string, got int"),
        ("", r"bad\.jsonl: file is empty"),
        ("\n\n", r"bad\.jsonl: file has no rows"),
        ("[1, 2]\n", r"bad\.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_input_names_file_row_and_field(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_source("hh_rlhf", str(path))


def test_non_utf8_and_skip_mode_counts(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = json.dumps({"chosen": f"{H} q{A} a", "rejected": f"{H} q{A} b"}).encode()
    path.write_bytes(good + b"\n" + b'{"chosen": "\xff\xfe"}\n' + b"{oops\n" + b'{"chosen": "x"}\n')
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: bytes are not valid UTF-8"):
        load_source("hh_rlhf", str(path))
    res = load_source("hh_rlhf", str(path), skip_bad_rows=True)
    assert res.rows == 4 and res.kept == 1
    assert dict(res.dropped) == {"not_utf8": 1, "malformed_json": 1, "missing_field:rejected": 1}


def test_unknown_source_missing_file_and_both_path_and_hub(tmp_path):
    with pytest.raises(DataError, match="unknown source 'nope'"):
        load_source("nope", "x.jsonl")
    with pytest.raises(DataError, match="no such file"):
        load_source("hh_rlhf", str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="exactly one of 'path'"):
        load_source("hh_rlhf")


def test_hub_name_fails_fast_offline(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    from rlhf_lit.hf.hub import HubUnavailable

    with pytest.raises(HubUnavailable, match="pass a local directory or file"):
        load_source("hh_rlhf", hub="Anthropic/hh-rlhf")
    assert time.time() - t0 < 5


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "rlhf_lit", *args], capture_output=True, text=True, timeout=120)


def test_data_inspect_cli_json_and_errors(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", hh_rows())
    out = run_cli("data", "inspect", "--source", "hh_rlhf", "--path", str(path), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["rows"] == report["kept"] + sum(report["dropped"].values()) == 7
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": "a"}\n')
    out = run_cli("data", "inspect", "--source", "hh_rlhf", "--path", str(bad))
    assert out.returncode == 1
    assert "bad.jsonl:1: field 'rejected' is missing" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("data", "inspect", "--source", "hh_rlhf", "--path", str(bad), "--skip-bad-rows", "--json")
    assert json.loads(out.stdout)["dropped"] == {"missing_field:rejected": 1}
