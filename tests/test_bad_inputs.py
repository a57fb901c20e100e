"""The bad-input corpus: every case gives one line naming the file/row/field or option, a non-zero exit,
and no traceback — or, where skipping was asked for, a counted skip. Never a silent drop."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datamodules.readers import BadRow
from datamodules.sources import REGISTRY, Drop, load_source

H, A = "\n\nHuman:", "\n\nAssistant:"
GOOD_HH = json.dumps({"chosen": f"{H} q{A} a", "rejected": f"{H} q{A} b"})

# (id, source, file name, file bytes, options, expected stderr fragment) -- strict mode: exit 1
ERRORS = [
    ("malformed-json", "hh_rlhf", "x.jsonl", GOOD_HH + '\n{"chosen": \n', {}, "x.jsonl:2: malformed JSON"),
    ("truncated-json", "hh_rlhf", "x.jsonl", '{"chosen": "a", "rejected": "b"', {}, "x.jsonl:1: malformed JSON"),
    ("not-an-object", "hh_rlhf", "x.jsonl", "[1, 2]\n", {}, "x.jsonl:1: expected a JSON object"),
    ("missing-field", "hh_rlhf", "x.jsonl", '{"chosen": "a"}\n', {}, "x.jsonl:1: field 'rejected' is missing"),
    ("wrong-type", "hh_rlhf", "x.jsonl", '{"chosen": 1, "rejected": "b"}\n', {}, "field 'chosen' should be a string"),
    (
        "null-field",
        "hh_rlhf",
        "x.jsonl",
        '{"chosen": null, "rejected": "b"}\n',
        {},
        "field 'chosen' should be a string, got NoneType",
    ),
    ("empty-file", "hh_rlhf", "x.jsonl", "", {}, "x.jsonl: file is empty"),
    ("blank-lines-only", "hh_rlhf", "x.jsonl", "\n\n\n", {}, "x.jsonl: file has no rows"),
    (
        "non-utf8",
        "hh_rlhf",
        "x.jsonl",
        b'{"chosen": "\xff", "rejected": "b"}\n',
        {},
        "x.jsonl:1: bytes are not valid UTF-8",
    ),
    ("non-utf8-csv", "prompts", "x.csv", b'"act","prompt"\n"a","\xfe"\n', {}, "x.csv:2: bytes are not valid UTF-8"),
    ("csv-no-header", "prompts", "x.csv", "\n", {}, "x.csv: CSV has no header row"),
    (
        "csv-ragged-row",
        "prompts",
        "x.csv",
        '"act","prompt"\n"a","b","c"\n',
        {},
        "x.csv:2: row has a different number of fields",
    ),
    ("csv-missing-column", "prompts", "x.csv", '"act","text"\n"a","b"\n', {}, "x.csv:2: field 'prompt' is missing"),
    ("json-not-a-list", "tldr", "x.json", '{"rows": 3}', {}, "x.json: expected a JSON list"),
    ("json-malformed", "tldr", "x.json", '[{"prompt": ', {}, "x.json:1: malformed JSON"),
    ("unsupported-suffix", "tldr", "x.txt", "hello", {}, "unsupported file type '.txt'"),
    ("missing-file", "tldr", "missing.jsonl", None, {}, "missing.jsonl: no such file"),
    (
        "shp-bad-label",
        "shp",
        "x.jsonl",
        json.dumps({"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": 2}) + "\n",
        {},
        "field 'labels' should be 0 or 1",
    ),
    (
        "shp-ratio-not-a-number",
        "shp",
        "x.jsonl",
        json.dumps({"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": 1, "score_ratio": "lots"}) + "\n",
        {"min_score_ratio": 2},
        "field 'score_ratio' should be a number",
    ),
    (
        "shp-empty-post",
        "shp",
        "x.jsonl",
        json.dumps({"history": " ", "human_ref_A": "a", "human_ref_B": "b", "labels": 1}) + "\n",
        {},
        "field 'history' is empty",
    ),
    (
        "comparisons-bad-summaries",
        "comparisons",
        "x.jsonl",
        json.dumps({"info": {"post": "p", "title": "t", "subreddit": "s"}, "summaries": [{"text": "a"}], "choice": 0})
        + "\n",
        {},
        "field 'summaries' should be a list of two objects",
    ),
    (
        "comparisons-bad-choice",
        "comparisons",
        "x.jsonl",
        json.dumps(
            {
                "info": {"post": "p", "title": "t", "subreddit": "s"},
                "summaries": [{"text": "a"}, {"text": "b"}],
                "choice": 5,
            }
        )
        + "\n",
        {},
        "field 'choice' should be 0 or 1",
    ),
    (
        "tldr-missing-title",
        "tldr",
        "x.jsonl",
        json.dumps({"subreddit": "s", "post": "p", "summary": "x"}) + "\n",
        {},
        "field 'title' is missing",
    ),
    ("unknown-normalizer-option", "shp", "x.jsonl", GOOD_HH + "\n", {"min_ratio": 2}, "min_ratio not an option of shp"),
    (
        "json-field-map-wrong",
        "json",
        "x.jsonl",
        GOOD_HH + "\n",
        {"fields": {"question": "q"}},
        "'fields' must map 'prompt'",
    ),
]

# (id, source, file bytes, options, skip_bad_rows, expected dropped counts) -- counted, never silent
COUNTED = [
    (
        "empty-chosen",
        "hh_rlhf",
        json.dumps({"chosen": f"{H} q{A}", "rejected": f"{H} q{A} b"}),
        {},
        False,
        {"empty_chosen": 1},
    ),
    (
        "empty-rejected",
        "hh_rlhf",
        json.dumps({"chosen": f"{H} q{A} a", "rejected": f"{H} q{A}  "}),
        {},
        False,
        {"empty_rejected": 1},
    ),
    (
        "chosen-equals-rejected",
        "hh_rlhf",
        json.dumps({"chosen": f"{H} q{A} a", "rejected": f"{H} q{A} a"}),
        {},
        False,
        {"identical": 1},
    ),
    (
        "histories-differ",
        "hh_rlhf",
        json.dumps({"chosen": f"{H} q{A} a{H} x{A} y", "rejected": f"{H} q{A} b{H} x{A} z"}),
        {},
        False,
        {"history_differs": 1},
    ),
    ("empty-summary", "tldr", json.dumps({"prompt": "p", "label": ""}), {}, False, {"empty_response": 1}),
    ("skip-malformed", "hh_rlhf", GOOD_HH + "\n{oops", {}, True, {"malformed_json": 1}),
    ("skip-missing-field", "hh_rlhf", GOOD_HH + '\n{"chosen": "a"}', {}, True, {"missing_field:rejected": 1}),
    ("skip-non-utf8", "hh_rlhf", GOOD_HH.encode() + b'\n{"chosen": "\xff"}', {}, True, {"not_utf8": 1}),
]


def write(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def inspect(*args):
    return subprocess.run(
        [sys.executable, "-m", "rlhf_lit", "data", "inspect", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_bad_data_is_one_line_error(case, tmp_path):
    _, source, name, content, options, expected = case
    path = write(tmp_path, name, content)
    out = inspect("--source", source, "--path", str(path), "--options", json.dumps(options))
    assert out.returncode == 1, out.stdout
    assert expected in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("case", COUNTED, ids=[c[0] for c in COUNTED])
def test_expected_drops_and_skips_are_counted(case, tmp_path):
    _, source, content, options, skip, dropped = case
    path = write(tmp_path, "x.jsonl", content)
    res = load_source(source, str(path), options=options, skip_bad_rows=skip)
    assert dict(res.dropped) == dropped
    assert res.rows == res.kept + sum(res.dropped.values())


def test_prompts_longer_than_the_context_are_truncated_or_counted(tok):
    from datamodules.collate import encode_prompts, encode_sft

    long = "\n\nHuman: " + "word " * 200 + "\n\nAssistant:"
    items, dropped = encode_prompts(tok, [{"prompt": long}], max_len=16)
    assert len(items[0]["prompt_ids"]) == 16 and tok.decode(items[0]["prompt_ids"]).endswith("Assistant:")
    items, dropped = encode_sft(tok, [{"prompt": long, "response": " yes"}], max_len=16)
    assert items == [] and dropped == {"prompt_fills_max_seq_len": 1}


def test_reward_export_with_another_tokenizer_retokenizes(tok, tokenizer_dir, tmp_path):
    """A reward model trained with a different tokenizer scores the texts, not the actor's ids."""
    import torch

    from rlhf_lit.hf.models import TinyModel
    from rlhf_lit.hf.tokenizer import train_bpe
    from rlhf_lit.rl.rewards import ModelReward

    other = train_bpe(["completely different words " * 3, "another corpus entirely"], vocab_size=300, min_frequency=1)
    spec = TinyModel(hidden_size=32, num_layers=1, num_heads=4, ffn_size=64)
    spec.build_scalar(other).save_pretrained(tmp_path / "rm", meta={"score_mean": 0.0, "score_std": 1.0})
    other.save_pretrained(tmp_path / "rm")
    reward = ModelReward(str(tmp_path / "rm"))
    reward.build(tok)
    assert not reward.same_tokenizer
    ids = torch.tensor([tok("\n\nHuman: hi\n\nAssistant: yes")["input_ids"]])
    scores = reward(["\n\nHuman: hi\n\nAssistant:"], [" yes"], ids, torch.ones_like(ids))
    assert scores.shape == (1,) and torch.isfinite(scores).all()


def test_pipeline_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text(
        "run_dir: x\nblend: {sources: []}\nstages: [{name: sft, config: a.yaml}, {name: ppo, confg: c.yaml}]\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "rlhf_lit", "pipeline", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "rlhf-lit pipeline: error: config key stages: Option 'confg' is not accepted"


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: [1,\n")
    out = subprocess.run([sys.executable, "-m", "rlhf_lit", "fit", "--config", str(bad)], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1] == (
        f"rlhf-lit: error: {bad}:3:1: YAML syntax error: expected the node content, but found '<stream end>'"
    ), out.stderr


def test_help_lists_every_command():
    from rlhf_lit.apps.cli import LIGHTNING, SUBCOMMANDS, registered

    out = subprocess.run([sys.executable, "-m", "rlhf_lit", "--help"], capture_output=True, text=True, timeout=60)
    listed = {line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ") and line.split()}
    assert out.returncode == 0 and {*SUBCOMMANDS, *registered(), *LIGHTNING} - {"test", "predict"} <= listed, out.stdout
    assert "test, predict" in out.stdout and "--overwrite" in out.stdout


def test_unknown_command_is_one_line():
    out = subprocess.run([sys.executable, "-m", "rlhf_lit", "trian"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown command 'trian'" in out.stderr


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
)
FIELDS = [
    "chosen",
    "rejected",
    "prompt",
    "response",
    "label",
    "summary",
    "subreddit",
    "title",
    "post",
    "history",
    "human_ref_A",
    "human_ref_B",
    "labels",
    "score_ratio",
    "info",
    "summaries",
    "choice",
    "act",
    "post_id",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(REGISTRY)), row=st.dictionaries(st.sampled_from(FIELDS), values, max_size=8))
def test_normalizers_only_return_records_or_raise_counted_reasons(name, row):
    """Random rows: a normalizer returns a record with string fields, or raises Drop/BadRow with a reason."""
    options = {"json": {"fields": {"prompt": "prompt", "response": "response"}}}.get(name, {})
    norm = REGISTRY[name](**options)
    try:
        record = norm(row)
    except (Drop, BadRow) as e:
        assert e.reason and isinstance(e.reason, str)
        return
    assert isinstance(record["prompt"], str)
    assert all(isinstance(record[k], str) for k in ("response", "chosen", "rejected") if k in record)
    if "chosen" in record:
        assert record["chosen"] != record["rejected"] and record["chosen"].strip() and record["rejected"].strip()


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--model.init_args.model.init_args.family=nope"], "rlhf-lit: error: unknown tiny model family 'nope'"),
        (["--trainer.max_stepz=3"], "rlhf-lit: error: unrecognized arguments: --trainer.max_stepz=3"),
        (["--model.init_args.optimizer.init_args.lr=fast"], "rlhf-lit: error:"),
        (["--trainer.max_steps=-5"], "rlhf-lit: error: `max_steps` must be a non-negative integer or -1"),
        (["test", "recipe:ppo/tiny"], "rlhf-lit: error: No `test_step()` method defined to run `Trainer.test`"),
        (["--model.init_args.optimizer.init_args.lr=0"], "rlhf-lit: error: model.init_args.optimizer: the learning"),
        (["--data.init_args.max_seq_len=1"], "rlhf-lit: error: data.init_args.max_seq_len: must be at least 2, got 1"),
        (
            ["fit", "recipe:ppo/tiny", "--data.init_args.max_prompt_len=0"],
            "rlhf-lit: error: data.init_args.max_prompt_len",
        ),
    ],
    ids=[
        "bad-value",
        "unknown-key",
        "bad-type",
        "negative-max-steps",
        "test-on-ppo",
        "lr-0",
        "seq-len-1",
        "prompt-len-0",
    ],
)
def test_fit_config_errors_are_one_line(args, expected):
    command, recipe = args[:2] if args[0] in ("test", "fit") else ("fit", "recipe:sft/tiny")
    args = args[2:] if args[0] in ("test", "fit") else args
    out = subprocess.run(
        [sys.executable, "-m", "rlhf_lit", command, "--config", recipe, "--trainer.logger=false", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("rlhf-lit")]
    assert len(errors) == 1 and errors[0].startswith(expected), out.stderr[-2000:]


@pytest.mark.parametrize(
    "name,content,expected",
    [
        ("dir", None, "dir: not a prompts file (a directory)"),
        ("blank.txt", "\n  \n", "blank.txt: no prompts (the file has no non-blank line)"),
        ("bytes.txt", b"ok\n\xff\n", "bytes.txt:2: bytes are not valid UTF-8"),
        ("bad.jsonl", '{"prompt": "a"}\n{"prompt": \n', "bad.jsonl:2: malformed JSON"),
        ("list.jsonl", "[1]\n", "list.jsonl:1: field 'prompt' is missing or not a string"),
    ],
)
def test_evaluate_prompt_files_fail_in_one_line_naming_file_and_line(name, content, expected, tmp_path):
    """``evaluate --prompts``: a directory, blank file, bad bytes or JSON name the file and line (#28; a
    directory was a 14-line traceback, a blank file 'mean requires at least one data point')."""
    from rlhf_lit.apps.evaluate import read_prompts

    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as e:
        read_prompts(str(path))
    assert str(e.value).startswith(str(tmp_path / expected.split(":")[0])) and expected in str(e.value)
    good = tmp_path / "good.txt"
    good.write_text("first\\nline\n\nsecond\n")
    assert read_prompts(str(good)) == (["first\nline", "second"], {})


def test_an_option_the_source_does_not_take_names_it_and_the_ones_it_does(tmp_path):
    """``--data.init_args.blend.sources '[{name: json, ...}]'`` over a synthetic source kept its ``n``:
    the error was "generic() got an unexpected keyword argument 'n'" (#28)."""
    from datamodules.readers import DataError

    f = tmp_path / "x.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(DataError) as e:
        load_source("json", path=str(f), options={"n": 5, "seed": 0})
    assert str(e.value).startswith(
        "source 'json': n, seed not an option of json (its options: fields, template, extra); a command-line"
    )
    with pytest.raises(DataError, match="'synthetic': path not an option of synthetic"):
        load_source("synthetic", options={"path": "x"})


def test_ppo_prompts_cut_by_max_prompt_len_are_counted_and_warned(tokenizer_dir):
    """#28: a tiny max_prompt_len trains on prompt tails alone: the cut prompts are counted in the data
    report and a warning names the key."""
    from helpers import datamodule

    from datamodules import PromptDataModule

    dm = datamodule(PromptDataModule, tokenizer_dir, max_prompt_len=2)
    with pytest.warns(UserWarning, match=r"data.init_args.max_prompt_len=2 cuts \d+ of \d+ prompts"):
        dm.setup("fit")
    assert dm.cut["prompt_cut_to_max_prompt_len"] == len(dm.train_items) + len(dm.eval_items) > 0
    assert all(len(x["prompt_ids"]) == 2 and "cut" not in x for x in dm.train_items)
    roomy = datamodule(PromptDataModule, tokenizer_dir, max_prompt_len=512)
    roomy.setup("fit")
    assert not +roomy.cut
