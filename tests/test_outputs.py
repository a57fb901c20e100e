"""Nothing a user owns is lost (#28): rlhf-lit replaces only directories it wrote, refuses anything else in
one line before training, and never exports after zero optimizer steps."""

import subprocess
import sys

import pytest
import torch
from conftest import REPO
from helpers import datamodule, trainer

from datamodules import SFTDataModule
from modules import SFTModule
from rlhf_lit.errors import InputError
from rlhf_lit.hf.models import TinyModel
from rlhf_lit.training.callbacks import HFExport
from rlhf_lit.training.outputs import MARKER, check_output, mark, ours


def user_files(root):
    """A directory a user owns: a note and a data file in a sub-folder."""
    root.mkdir(parents=True)
    (root / "notes.txt").write_text("my notes")
    (root / "sub").mkdir()
    (root / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def contents(root):
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_check_output_refuses_what_rlhf_lit_did_not_write(tmp_path, monkeypatch):
    monkeypatch.delenv("RLHF_LIT_OVERWRITE", raising=False)
    check_output(tmp_path / "new" / "deeper", "key")  # nothing there: fine
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", "key")
    user = user_files(tmp_path / "user")
    with pytest.raises(InputError, match=r"^HFExport dirpath: .*user holds files rlhf-lit did not write"):
        check_output(tmp_path / "user", "HFExport dirpath")
    (tmp_path / "file.txt").write_text("mine")
    with pytest.raises(InputError, match=r"file.txt is a file rlhf-lit did not write"):
        check_output(tmp_path / "file.txt", "--out")
    check_output(tmp_path / "user", "key", overwrite=True)  # the user said so
    monkeypatch.setenv("RLHF_LIT_OVERWRITE", "1")  # rlhf-lit --overwrite ...
    check_output(tmp_path / "file.txt", "key")
    assert contents(tmp_path / "user") == user and (tmp_path / "file.txt").read_text() == "mine"
    (tmp_path / "marked").mkdir()
    mark(tmp_path / "marked", "test")
    legacy = tmp_path / "legacy" / "actor"  # an export from before the marker: known by its model card
    legacy.mkdir(parents=True)
    (legacy / "README.md").write_text("# rlhf-lit export: ppo (actor)\n")
    assert ours(tmp_path / "marked") and ours(tmp_path / "legacy") and not ours(tmp_path / "user")


def sft(tokenizer_dir):
    dm = datamodule(SFTDataModule, tokenizer_dir, n=80)
    module = SFTModule(
        TinyModel(hidden_size=32, num_layers=1, num_heads=4, ffn_size=64),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    )
    return module, dm


def test_export_refuses_a_user_directory_before_training_and_replaces_its_own(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("RLHF_LIT_OVERWRITE", raising=False)
    user = user_files(tmp_path / "user")
    module, dm = sft(tokenizer_dir)
    t = trainer(tmp_path / "a", max_steps=2, callbacks=[HFExport(str(tmp_path / "user"))])
    with pytest.raises(InputError, match="HFExport dirpath: .* holds files rlhf-lit did not write"):
        t.fit(module, datamodule=dm)
    assert t.global_step == 0 and contents(tmp_path / "user") == user  # refused before the first step
    module, dm = sft(tokenizer_dir)
    out = tmp_path / "export"
    trainer(tmp_path / "b", max_steps=2, callbacks=[HFExport(str(out))]).fit(module, datamodule=dm)
    first = (out / "model.safetensors").read_bytes()
    assert (out / MARKER).is_file() and (out / "config.json").is_file()
    module, dm = sft(tokenizer_dir)  # a second run replaces its own export...
    trainer(tmp_path / "c", max_steps=3, callbacks=[HFExport(str(out))]).fit(module, datamodule=dm)
    second = (out / "model.safetensors").read_bytes()
    assert second != first
    module, dm = sft(tokenizer_dir)  # ...but a run of zero steps leaves it as it was
    with pytest.warns(UserWarning, match="no optimizer step was taken: nothing exported"):
        trainer(tmp_path / "d", max_steps=0, callbacks=[HFExport(str(out))]).fit(module, datamodule=dm)
    assert (out / "model.safetensors").read_bytes() == second
    module, dm = sft(tokenizer_dir)  # an explicit overwrite replaces the user's directory
    trainer(tmp_path / "e", max_steps=1, callbacks=[HFExport(str(tmp_path / "user"), overwrite=True)]).fit(
        module, datamodule=dm
    )
    assert not (tmp_path / "user" / "notes.txt").exists() and (tmp_path / "user" / MARKER).is_file()


def test_cli_fit_and_model_conversion_refuse_user_paths_in_one_line(tmp_path):
    user = user_files(tmp_path / "user")
    callbacks = f"[{{class_path: rlhf_lit.training.callbacks.HFExport, init_args: {{dirpath: {tmp_path / 'user'}}}}}]"
    args = ["fit", "--config", "recipe:sft/tiny", "--trainer.logger=false", f"--trainer.callbacks={callbacks}"]
    args += [f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.max_steps=2"]
    run = lambda *a: subprocess.run([sys.executable, "-m", "rlhf_lit", *a], capture_output=True, text=True,
                                    timeout=300, cwd=tmp_path)  # fmt: skip
    out = run(*args)
    errors = [line for line in out.stderr.splitlines() if line.startswith("rlhf-lit")]
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert errors == [
        f"rlhf-lit: error: HFExport dirpath: {tmp_path / 'user'} holds files rlhf-lit did not write (no .rlhf-lit "
        "marker); choose another path (or --overwrite to replace it)"
    ]
    assert contents(tmp_path / "user") == user and not (tmp_path / "run" / "checkpoints").exists()
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    out = run("models", "from-gguf", "--gguf", str(gguf), "--out", str(tmp_path / "user"))
    assert out.returncode == 1 and "--out: " in out.stderr and "did not write" in out.stderr, out.stderr
    assert contents(tmp_path / "user") == user
    out = run("--overwrite", *args)  # the user's word: the directory becomes an export
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "user" / MARKER).is_file() and not (tmp_path / "user" / "notes.txt").exists()


def test_stage_config_saves_last_and_resumes_with_ckpt_path_last(tmp_path):
    """Every stage config saves last.ckpt every N steps; ``--ckpt_path last`` resumes from it; with nothing
    to resume, or a checkpoint file that does not exist, one line instead of a silent restart (#28)."""
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "rlhf_lit", "fit", "--config", "recipe:sft/tiny", "--trainer.logger=false",
         "--trainer.enable_progress_bar=false", *a], capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    for args, expected in [
        (["--ckpt_path", "last"], "rlhf-lit: error: --ckpt_path last: no last.ckpt to resume from"),
        (["--ckpt_path=gone.ckpt"], "rlhf-lit: error: --ckpt_path: gone.ckpt does not exist"),
    ]:
        out = run(*args)
        errors = [line for line in out.stderr.splitlines() if line.startswith("rlhf-lit")]
        assert out.returncode == 1 and "Traceback" not in out.stderr and len(errors) == 1, out.stderr[-2000:]
        assert errors[0].startswith(expected) and not (tmp_path / "runs/tiny/sft/export").exists()
    out = run("--trainer.max_steps=20")
    last = tmp_path / "runs/tiny/sft/checkpoints/last.ckpt"
    assert out.returncode == 0 and torch.load(last, weights_only=True)["global_step"] == 20, out.stderr[-2000:]
    out = run("--trainer.max_steps=22", "--ckpt_path", "last")
    assert out.returncode == 0 and "Restoring states from the checkpoint path at" in out.stderr, out.stderr[-2000:]
    assert (tmp_path / "runs/tiny/sft/export/.rlhf-lit").is_file()


def test_a_model_directory_without_tokenizer_files_is_one_line(tmp_path):
    """A model folder saved without its tokenizer: one line naming it, in fit, evaluate and chat alike (all
    load through HFTokenizer), not a failure deep in the first forward (#28)."""
    from rlhf_lit.hf.tokenizer import HFTokenizer

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(InputError, match=r"model: no tokenizer files \(tokenizer.json, tokenizer_config.json"):
        HFTokenizer(str(model)).load()
    (tmp_path / "p.txt").write_text("hello\n")
    out = subprocess.run(
        [sys.executable, "-m", "rlhf_lit", "evaluate", "--policy", str(model), "--prompts", str(tmp_path / "p.txt"),
         "--gold", "datamodules.verifiable:exact_match"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    errors = [line for line in out.stderr.splitlines() if line.startswith("rlhf-lit")]
    assert out.returncode == 1 and "Traceback" not in out.stderr and len(errors) == 1, out.stderr[-2000:]
    assert "no tokenizer files" in errors[0]


def test_chat_and_evaluate_refuse_a_scalar_model_and_chat_names_bad_stdin(tmp_path):
    """A reward/critic export given to chat or evaluate is one line (it loaded and printed garbage); bytes
    on chat's standard input that are not UTF-8 are one line, not a 29-line traceback (#28)."""
    import json

    from rlhf_lit.apps.evaluate import load_policy, not_a_policy
    from rlhf_lit.hf.models import HFModel

    def folder(name, archs, head):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"architectures": archs}))
        if head:
            (d / "value_head.safetensors").write_bytes(b"")
        return HFModel(str(d))

    assert not_a_policy(folder("rm", ["LlamaModel"], True))  # an rlhf-lit reward or critic export
    assert not_a_policy(folder("clf", ["LlamaForSequenceClassification"], False))
    assert not not_a_policy(folder("actor", ["LlamaForCausalLM"], True))  # value_head_on_actor keeps its LM
    with pytest.raises(InputError, match=r"rm: a reward model or critic \(a scalar head\), not a policy"):
        load_policy(str(tmp_path / "rm"))
    model = REPO / "models/smollm2-135m-instruct"
    if not (model / "model.safetensors").exists():
        pytest.skip("make smollm2 first (the stdin half of this test chats with SmolLM2)")
    out = subprocess.run([sys.executable, "-m", "rlhf_lit", "chat", "--model", str(model), "--max-new-tokens", "2"],
                         input=b"hello\n\xff\xfe\n", capture_output=True, timeout=300)  # fmt: skip
    err = out.stderr.decode().strip().splitlines()
    assert out.returncode == 1 and err[-1] == "rlhf-lit chat: error: standard input: bytes are not valid UTF-8"
    assert b"Assistant:" in out.stdout  # the first line was answered


def test_a_tokenizer_far_larger_than_the_model_vocabulary_is_refused(tokenizer_dir, tmp_path):
    """Another model's tokenizer would silently grow a pretrained model's embeddings (511 -> 49,152 rows,
    #28); adding a pad or template tokens (a few rows) still works."""
    from rlhf_lit.hf.models import HFModel
    from rlhf_lit.hf.tokenizer import HFTokenizer

    small = HFTokenizer(tokenizer_dir).load()
    path = tmp_path / "tiny"
    TinyModel(family="llama", hidden_size=32, num_layers=1, num_heads=4, ffn_size=64).build_causal_lm(
        small
    ).save_pretrained(path)
    small.add_special_tokens({"additional_special_tokens": ["<|a|>", "<|b|>"]})  # two added tokens: grown
    assert HFModel(str(path)).build_causal_lm(small).get_input_embeddings().num_embeddings == len(small)
    big = HFTokenizer(tokenizer_dir).load()
    big.add_tokens([f"tok{i}" for i in range(1100)])
    with pytest.raises(InputError, match=r"has \d+ tokens but the model's embeddings have \d+ rows"):
        HFModel(str(path)).build_causal_lm(big)


def test_files_a_user_puts_into_the_export_path_during_training_are_kept(tokenizer_dir, tmp_path, monkeypatch):
    """The path was free when fit started, a user wrote into it meanwhile: the trained weights go to a
    timestamped sibling with a warning; the user's files are neither replaced nor lost (#28)."""
    import lightning as L

    monkeypatch.delenv("RLHF_LIT_OVERWRITE", raising=False)
    out = tmp_path / "export"

    class UserWrites(L.Callback):
        def on_train_start(self, trainer, pl_module):
            user_files(out)

    module, dm = sft(tokenizer_dir)
    with pytest.warns(UserWarning, match="the export goes to .*export\\.[0-9-]+ instead"):
        trainer(tmp_path / "a", max_steps=1, callbacks=[HFExport(str(out)), UserWrites()]).fit(module, datamodule=dm)
    assert (out / "notes.txt").read_text() == "my notes" and not (out / MARKER).exists()
    (sibling,) = [p for p in tmp_path.glob("export.*")]
    assert (sibling / MARKER).is_file() and (sibling / "model.safetensors").is_file()


def test_the_vllm_engine_model_copy_is_removed_with_the_engine(tmp_path):
    """The engine's temporary model copy is deleted by close() and also when an engine nobody closed goes
    away (chat/evaluate keep one with the model): 23 copies of 517 MiB had piled up in /tmp."""
    import gc

    from rlhf_lit.rl.vllm_engine import VLLMEngine, VLLMOptions

    closed, dropped = tmp_path / "closed", tmp_path / "dropped"
    for d in (closed, dropped):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
    engine = VLLMEngine(None, str(closed), VLLMOptions(), on_gpu=False)
    engine.close()
    engine.close()  # twice is harmless
    assert not closed.exists() and engine.workdir is None
    engine = VLLMEngine(None, str(dropped), VLLMOptions(), on_gpu=False)
    del engine
    gc.collect()
    assert not dropped.exists()


def test_default_root_dir_moves_every_output_the_stage_config_places_under_its_own(tmp_path):
    """One key for the output directory (#28): logs, checkpoints and the export follow
    ``--trainer.default_root_dir``; a path outside the config's own root (the shared tokenizer) stays."""
    from rlhf_lit.apps.cli import lightning_cli

    def outputs(*args):
        cli = lightning_cli(["--config", "configs/sft/tiny.yaml", *args], run=False)
        names = ("HFExport", "ModelCheckpoint")
        dirs = {type(c).__name__: str(c.dirpath) for c in cli.trainer.callbacks if type(c).__name__ in names}
        return {**dirs, "logs": cli.trainer.logger.save_dir, "tokenizer": cli.datamodule.tokenizer_spec.save_dir}

    root = str(tmp_path / "mine")
    moved = outputs("--trainer.default_root_dir", root)
    assert moved == {"HFExport": f"{root}/export", "ModelCheckpoint": f"{root}/checkpoints", "logs": root,
                     "tokenizer": "runs/tiny/tokenizer"}  # fmt: skip
    assert outputs(f"--trainer.default_root_dir={root}") == moved
    kept = outputs()  # without the flag: the config's own paths
    assert kept["HFExport"].endswith("runs/tiny/sft/export") and kept["logs"] == "runs/tiny/sft"
    # a path the user moved elsewhere on the command line is theirs: kept as given
    mine = str(tmp_path / "elsewhere")
    assert outputs("--trainer.default_root_dir", root, f"--trainer.logger.init_args.save_dir={mine}")["logs"] == mine


def test_validate_a_randomly_initialised_config_without_a_checkpoint_is_refused(tmp_path):
    """#28: ``validate`` of a TinyModel config without --ckpt_path would report a random model's figures."""
    out = subprocess.run(
        [sys.executable, "-m", "rlhf_lit", "validate", "--config", "recipe:sft/tiny", "--trainer.logger=false"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    errors = [line for line in out.stderr.splitlines() if line.startswith("rlhf-lit")]
    assert out.returncode == 1 and "Traceback" not in out.stderr and len(errors) == 1, out.stderr[-2000:]
    assert errors[0].startswith("rlhf-lit: error: validate: the config's model is randomly initialised (TinyModel)")
    assert not (tmp_path / "runs").exists()  # refused before any data or tokenizer work
