"""The ``rlhf-lit`` command: LightningCLI for fit/validate/test, plus the project's own subcommands.

Stage modules and datamodules are chosen by ``class_path`` in YAML, so this file imports none of
them; a command that lives beside them (``data``) registers itself through the ``rlhf_lit.commands``
entry point.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Optional

# Set before lightning/transformers import: W&B then never blocks on a login prompt without a TTY.
os.environ.setdefault("WANDB_SILENT", "true")

SUBCOMMANDS = {
    "pipeline": "rlhf_lit.apps.pipeline:main",
    "evaluate": "rlhf_lit.apps.evaluate:main",
    "chat": "rlhf_lit.apps.chat:main",
    "models": "rlhf_lit.apps.convert:main",
    "recipes": "rlhf_lit.apps.recipes:main",
    "experiments": "rlhf_lit.apps.experiments:main",
}
LIGHTNING = ("fit", "validate", "test", "predict")
HELP = """usage: rlhf-lit [--verbose] [--overwrite] COMMAND ...

Stages (LightningCLI; `rlhf-lit fit --help`, and `--model.help CLASS` for a module's keys):
  fit          train a stage: rlhf-lit fit --config configs/sft/tiny.yaml (resume: --ckpt_path last)
  validate     validate a stage's module (SFT, reward, DPO) from --ckpt_path
  test, predict  Lightning's, where a module defines them
Project commands (`rlhf-lit COMMAND --help`):
  pipeline     run a list of stages in one run directory: rlhf-lit pipeline --config configs/pipeline/quickstart.yaml
  experiments  run a study's ablations over seeds and compare them: rlhf-lit experiments run experiments/gold_task
  evaluate     score exported policies on a prompt file (gold checker or reward model, KL, win rate)
  chat         talk to an exported policy
  data         inspect a data source or blend as a stage would read it
  models       convert models (SmolLM2 from its GGUF, any GGUF file)
  recipes      list the shipped configs, usable anywhere as --config recipe:NAME
Flags before the command:
  --verbose    tracebacks and library logs (also RLHF_LIT_VERBOSE=1)
  --overwrite  replace output paths rlhf-lit did not write (exports, converted models)
"""


def lightning_cli(args: Optional[list[str]] = None, run: bool = True):
    """LightningCLI over any LightningModule / LightningDataModule named by class_path."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    class CLI(LightningCLI):
        def parse_arguments(self, parser, args) -> None:
            super().parse_arguments(parser, args)
            argv = list(sys.argv[1:] if args is None else args)
            if flag_values(argv, ROOT_FLAG):  # one key moves every output (#28)
                without = parser.parse_args(drop_flag(argv, ROOT_FLAG))
                sub = self.config.get("subcommand")  # None when run=False (no subcommands)
                now, before = (self.config[sub], without[sub]) if sub else (self.config, without)
                reroot(now.trainer, before.trainer.default_root_dir)

        def before_validate(self) -> None:
            refuse_random_weights(self.model, self.config[self.subcommand].get("ckpt_path"), self.subcommand)

        before_test = before_predict = before_validate

    saved_argv = sys.argv
    if args is not None:  # called from Python (pipeline, tests): the process's own argv is not ours
        sys.argv = sys.argv[:1]
    try:
        return CLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            # Errors raise instead of printing usage and exiting, so main() reports them in one line.
            parser_kwargs={"exit_on_error": False},
            auto_configure_optimizers=False,
        )
    finally:
        sys.argv = saved_argv


ROOT_FLAG = "--trainer.default_root_dir"
OUTPUT_KEYS = ("save_dir", "dirpath")  # the logger's and the checkpoint/export callbacks' output paths


def drop_flag(args: list[str], flag: str) -> list[str]:
    """``args`` without ``flag``, given as ``--flag VALUE`` or ``--flag=VALUE``."""
    out, skip = [], False
    for arg in args:
        if skip or arg.startswith(flag + "="):
            skip = False
            continue
        if arg == flag:
            skip = True
            continue
        out.append(arg)
    return out


def reroot(trainer, old_root: Optional[str]) -> None:
    """Move every logger ``save_dir`` and callback ``dirpath`` that lies under the stage config's own
    ``default_root_dir`` (``old_root``) to the same place under the one given on the command line.

    Lightning derives none of them from ``default_root_dir``, so ``--trainer.default_root_dir`` alone moved
    only Lightning's fallbacks while logs, checkpoints and the export stayed put (#28). Paths elsewhere
    (a tokenizer shared by the stages, a path the user set) are kept as given.
    """
    new_root = trainer.default_root_dir
    if not old_root or not new_root or Path(old_root) == Path(new_root):
        return
    loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
    callbacks = trainer.callbacks if isinstance(trainer.callbacks, list) else [trainer.callbacks]
    for part in [*loggers, *callbacks]:
        init = getattr(part, "init_args", None)
        for key in OUTPUT_KEYS if init is not None else ():
            value = getattr(init, key, None)
            if isinstance(value, (str, os.PathLike)) and Path(old_root) in (Path(value), *Path(value).parents):
                setattr(init, key, str(Path(new_root) / Path(value).relative_to(old_root)))


def refuse_random_weights(module, ckpt_path: Optional[str], command: str) -> None:
    """``validate``/``test``/``predict`` of a module whose models are built from scratch (TinyModel) and no
    ``--ckpt_path``: the figures would be a random model's, reported as if they meant something (#28)."""
    from rlhf_lit.errors import InputError
    from rlhf_lit.hf.models import ModelSpec

    random = sorted({type(v).__name__ for v in vars(module).values() if isinstance(v, ModelSpec) and not v.pretrained})
    if random and not ckpt_path:
        raise InputError(
            f"{command}: the config's model is randomly initialised ({', '.join(random)}) and no --ckpt_path "
            f"was given: pass a trained checkpoint (--ckpt_path PATH, or last)"
        )


def resolve(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def registered() -> dict:
    """Commands the packages above the core library register (entry point group ``rlhf_lit.commands``;
    ``data`` from datamodules): name -> entry point. The core imports none of them by name (#29)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="rlhf_lit.commands")}


def quiet() -> None:
    """transformers' per-load progress bars ("Loading weights", "Writing model shards"), load reports and
    known-harmless deprecation warnings off, so a stage prints Lightning's one progress bar and the
    data/metrics lines. ``RLHF_LIT_VERBOSE=1`` (or ``--verbose`` before the command) keeps them."""
    import logging
    import warnings

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    for harmless in (
        r".*does not have many workers.*",
        r".*you need to define a `flops_per_batch`.*",  # ThroughputMonitor without FLOP counts: by design
        r".*Using ModelCheckpoint with manual optimization.*",  # PPO saves after its updates: intended
        r".*You passed in a `val_dataloader` but have no `validation_step`.*",  # PPO validates nothing
        r".*Found \d+ module\(s\) in eval mode.*",  # the frozen reference/reward models: eval on purpose (#13)
    ):
        warnings.filterwarnings("ignore", message=harmless)
    # Lightning's per-stage tips and accelerator lines (3 of every stage's first 5); rlhf-lit's own
    # reports go through the same logger and stay.
    noise = ("💡 Tip", "GPU available", "TPU available", "HPU available", "`Trainer(val_check_interval=1.0)`")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.getMessage()).startswith(noise)
    )
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def main(argv: Optional[list[str]] = None) -> int:
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    # Flags before the command: --verbose (tracebacks, library logs), --overwrite (output paths rlhf-lit
    # did not write may be replaced, #28).
    while argv[:1] in (["--verbose"], ["--overwrite"]):
        env = "RLHF_LIT_VERBOSE" if argv[0] == "--verbose" else "RLHF_LIT_OVERWRITE"
        argv, from_shell, os.environ[env] = argv[1:], False, "1"
    if not verbose():
        quiet()
    from rlhf_lit.errors import InputError

    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, end="")
        return 0 if argv else 2
    # Registered commands are looked up only for a name that is not one of ours (an entry-point scan reads
    # every installed distribution's metadata: not on the path of `fit`).
    plugins = {} if argv[0] in SUBCOMMANDS or argv[0] in LIGHTNING or argv[0].startswith("-") else registered()
    if argv[0] in SUBCOMMANDS or argv[0] in plugins:
        try:
            command = resolve(SUBCOMMANDS[argv[0]]) if argv[0] in SUBCOMMANDS else plugins[argv[0]].load()
            return command(argv[1:]) or 0
        except InputError as e:  # e.g. a pipeline's stage config or data file that does not exist
            print(f"rlhf-lit {argv[0]}: error: {str(e).splitlines()[0]}", file=sys.stderr)
            return 1
        except argparse.ArgumentError as e:  # a pipeline YAML key jsonargparse rejects: the key and why
            keys = ".".join(dict.fromkeys(re.findall(r'Parser key "([^"]+)"', str(e))))
            why = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
            print(f"rlhf-lit {argv[0]}: error: {f'config key {keys}: ' if keys else ''}{why}", file=sys.stderr)
            return 1
    if argv and argv[0] not in LIGHTNING and not argv[0].startswith("-"):
        print(
            f"rlhf-lit: unknown command {argv[0]!r}; use one of {', '.join([*LIGHTNING, *SUBCOMMANDS, *plugins])}",
            file=sys.stderr,
        )
        return 2
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from rlhf_lit.apps.recipes import expand_config_args
    from rlhf_lit.training.callbacks import NonFiniteError

    try:
        expanded = expand_config_args(argv)  # --config recipe:NAME
        check_yaml_files(expanded)
        check_ckpt_path(expanded)
        with warnings.catch_warnings():  # Lightning warns and trains from scratch: a silent restart (#28)
            warnings.filterwarnings("error", message=NOTHING_TO_RESUME)
            lightning_cli(None if from_shell and expanded == argv else expanded)
    except NonFiniteError as e:
        print(f"rlhf-lit: stopped: {e}", file=sys.stderr)
        return 1
    except UserWarning as e:
        if not re.match(NOTHING_TO_RESUME, str(e)):
            raise
        print(
            "rlhf-lit: error: --ckpt_path last: no last.ckpt to resume from in the ModelCheckpoint dirpath "
            "(a first run: leave --ckpt_path out)",
            file=sys.stderr,
        )
        return 1
    except (InputError, ValueError, TypeError, argparse.ArgumentError, MisconfigurationException, OSError) as e:
        # Bad data, config keys or values, model directories: the innermost cause in one line. Config
        # errors reach here wrapped by jsonargparse ("Does not validate against any of the Union subtypes");
        # Lightning's refusals (max_steps -5, `test` on a module without test_step) and file-system errors
        # (an unwritable directory) too (#28).
        if verbose():
            raise
        hint = (
            "" if isinstance(e, (InputError, argparse.ArgumentError)) else " (RLHF_LIT_VERBOSE=1 shows the traceback)"
        )
        print(f"rlhf-lit: error: {root_cause(e)}{hint}", file=sys.stderr)
        return 1
    return 0


NOTHING_TO_RESUME = r'.*ckpt_path="last"\) is set, but there is no last checkpoint available'
KEYWORD_CKPTS = ("last", "best", "hpc", "registry")


def flag_values(args: list[str], flag: str) -> list[str]:
    """The values given to ``flag`` in ``args``, as ``--flag VALUE`` or ``--flag=VALUE``."""
    spaced = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == flag]
    return spaced + [arg.partition("=")[2] for arg in args if arg.startswith(flag + "=")]


def check_yaml_files(args: list[str]) -> None:
    """A ``--config`` file with a YAML syntax error is one line with its file, line and column (jsonargparse
    reports the parser's message alone, without either, #28)."""
    import yaml

    from rlhf_lit.errors import InputError

    for path in flag_values(args, "--config"):
        if os.path.isfile(path):
            try:
                yaml.safe_load(Path(path).read_text(encoding="utf-8"))
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
                raise InputError(f"{path}{where}: YAML syntax error: {getattr(e, 'problem', None) or e}") from None
            except UnicodeDecodeError:
                raise InputError(f"{path}: bytes are not valid UTF-8") from None


def check_ckpt_path(args: list[str]) -> None:
    """A ``--ckpt_path`` file that does not exist is one line naming it (Lightning raises deep in fit)."""
    from rlhf_lit.errors import InputError

    for value in flag_values(args, "--ckpt_path"):
        if value and value not in KEYWORD_CKPTS and not value.startswith("registry") and not os.path.exists(value):
            raise InputError(f"--ckpt_path: {value} does not exist (to resume the newest: --ckpt_path last)")


def root_cause(e: BaseException) -> str:
    """First line of the innermost exception of ``e``'s cause/context chain, after the config key path
    jsonargparse reports on the way down (``config key model.rouge_samples: Expected a <class 'int'>...``)."""
    keys: list[str] = []
    while True:
        key = re.match(r'Parser key "([^"]+)"', str(e).strip())
        if key and (not keys or keys[-1] != key.group(1)):
            keys.append(key.group(1))
        inner = e.__cause__ or (None if e.__suppress_context__ else e.__context__)  # `raise ... from None`: stop
        if inner is None:
            break
        e = inner
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return f"config key {'.'.join(keys)}: {line}" if keys else line


def verbose() -> bool:
    return os.environ.get("RLHF_LIT_VERBOSE", "").lower() in ("1", "true", "yes")


if __name__ == "__main__":
    sys.exit(main())
