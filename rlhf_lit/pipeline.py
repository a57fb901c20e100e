"""``rlhf-lit pipeline``: SFT -> reward -> PPO in one run directory, each stage fed the previous exports.

For each stage the pipeline writes the complete stage config it runs (``RUN_DIR/<stage>/config.yaml``,
re-runnable on its own with ``rlhf-lit fit --config``), runs it through the same LightningCLI, and
marks it done. Re-running the command skips finished stages and resumes an interrupted one from its
last checkpoint. ``summary.json`` collects the evaluation after every stage.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from rlhf_lit.cli import lightning_cli
from rlhf_lit.errors import InputError

STAGES = ("sft", "reward", "ppo")


@dataclass
class StagePlan:
    """One stage: a base stage config and nested overrides merged into it."""

    config: str
    """path of the stage's base YAML (e.g. configs/sft/tiny.yaml)"""
    overrides: dict = field(default_factory=dict)
    """nested keys merged over the base (e.g. {trainer: {max_epochs: 3}})"""


@dataclass
class EvalPlan:
    """What the pipeline measures on held-out data after the stages."""

    prompts: int = 200
    """held-out PPO prompts used to evaluate the SFT and PPO policies"""
    gold: Optional[str] = None
    """import path of a gold reward function (prompt, response) -> float, when the task has one"""
    max_new_tokens: int = 32
    temperature: float = 1.0
    seed: int = 0
    reward_pairs: Optional[int] = None
    """held-out pairs scored for the reward model's accuracy (None: all of them)"""
    examples: int = 3
    """held-out prompts whose responses each policy's summary keeps (before/after answers)"""


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into ``base`` key by key; a ``class_path`` that changes brings its own init_args
    (the old class's arguments may not fit the new class)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        old = out.get(k)
        switch = (
            isinstance(v, dict)
            and isinstance(old, dict)
            and v.get("class_path", old.get("class_path")) != old.get("class_path")
        )
        out[k] = (
            deep_merge(old, v) if isinstance(v, dict) and isinstance(old, dict) and not switch else copy.deepcopy(v)
        )
    return out


def spec(class_path: str, **init_args) -> dict:
    return {"class_path": class_path, "init_args": init_args}


class Pipeline:
    """The three RLHF stages end to end in ``run_dir``."""

    def __init__(
        self,
        run_dir: str,
        blend: dict,
        sft: StagePlan,
        ppo: StagePlan,
        reward: Optional[StagePlan] = None,
        tokenizer: Optional[dict] = None,
        reward_init_from_sft: bool = True,
        evaluation: Optional[EvalPlan] = None,
        checkpoint_every_n_steps: int = 50,
    ) -> None:
        """Args:
        run_dir: output directory: one folder per stage, summary.json, the plot.
        blend: the data blend of every stage (init args of datamodules.Blend); its seeded split keeps
            the stages' rows disjoint.
        sft: the SFT stage.
        ppo: the PPO stage.
        reward: the reward stage (null: none; the PPO stage's config then names its reward source, e.g. a
            rule checker, and its critic starts from the SFT export with a new value head).
        tokenizer: tokenizer spec of stage 1 (class_path/init_args); default: a BPE trained on the blend,
            saved in RUN_DIR/tokenizer. Later stages use the SFT export's tokenizer.
        reward_init_from_sft: start the reward model from the SFT export (else from its config's model).
        evaluation: held-out evaluation settings.
        checkpoint_every_n_steps: how often each stage saves the checkpoint a re-run resumes from.
        """
        self.run_dir = Path(run_dir)
        self.blend = blend
        self.plans = {k: v for k, v in (("sft", sft), ("reward", reward), ("ppo", ppo)) if v is not None}
        self.tokenizer = tokenizer or spec(
            "rlhf_lit.tokenizer.TrainedBPE", save_dir=str(self.run_dir / "tokenizer"), vocab_size=1000
        )
        self.reward_init_from_sft, self.checkpoint_every = reward_init_from_sft, checkpoint_every_n_steps
        self.evaluation = evaluation or EvalPlan()
        self.summary_path = self.run_dir / "summary.json"
        self.summary: dict = json.loads(self.summary_path.read_text()) if self.summary_path.exists() else {}

    def export(self, stage: str, sub: str = "") -> str:
        return str(self.run_dir / stage / "export" / sub)

    # -- stage configs --------------------------------------------------------------------------
    def stage_config(self, stage: str) -> dict:
        plan = self.plans[stage]
        if not Path(plan.config).is_file():
            raise InputError(
                f"{stage}.config: {plan.config} does not exist (relative paths are looked up beside the "
                "pipeline YAML, then in the working directory; or use recipe:NAME)"
            )
        cfg = deep_merge(yaml.safe_load(Path(plan.config).read_text()), plan.overrides)
        d = self.run_dir / stage
        trainer = cfg.setdefault("trainer", {})
        trainer.update(default_root_dir=str(d), enable_checkpointing=True)
        logger = trainer.get("logger")
        for one in logger if isinstance(logger, list) else [logger]:
            if isinstance(one, dict):
                one.setdefault("init_args", {})["save_dir"] = str(d)
        callbacks = [
            c for c in trainer.get("callbacks") or [] if not c["class_path"].endswith(("HFExport", "ModelCheckpoint"))
        ]
        callbacks += [
            spec("rlhf_lit.callbacks.HFExport", dirpath=str(d / "export")),
            spec(
                "lightning.pytorch.callbacks.ModelCheckpoint",
                dirpath=str(d / "checkpoints"),
                save_last=True,
                save_top_k=0,
                every_n_train_steps=self.checkpoint_every,
            ),
        ]
        trainer["callbacks"] = callbacks
        data = cfg["data"].setdefault("init_args", {})
        data["blend"] = self.blend
        data["tokenizer"] = (
            self.tokenizer if stage == "sft" else spec("rlhf_lit.tokenizer.HFTokenizer", path=self.export("sft"))
        )
        model = cfg["model"].setdefault("init_args", {})
        if stage == "reward" and self.reward_init_from_sft:
            model["model"] = spec("rlhf_lit.models.HFModel", path=self.export("sft"))
        if stage == "ppo":
            model["actor"] = spec("rlhf_lit.models.HFModel", path=self.export("sft"))
            if "reward" in self.plans:
                model["critic"] = spec("rlhf_lit.models.HFModel", path=self.export("reward"))
                model["reward"] = spec("rlhf_lit.rewards.ModelReward", path=self.export("reward"), normalize=True)
            else:
                model["critic"] = spec("rlhf_lit.models.HFModel", path=self.export("sft"))
                if "reward" not in model:
                    raise InputError("ppo: without a reward stage, the PPO config must set model.init_args.reward")
            if self.evaluation.gold:
                model["monitor"] = spec("rlhf_lit.rewards.CallableReward", function=self.evaluation.gold)
        return cfg

    def run_stage(self, stage: str) -> None:
        d = self.run_dir / stage
        if (d / "DONE").exists():
            print(f"[pipeline] {stage}: done already, skipping ({d})", flush=True)
            return
        d.mkdir(parents=True, exist_ok=True)
        config = d / "config.yaml"
        config.write_text(yaml.safe_dump(self.stage_config(stage), sort_keys=False))
        args = ["fit", "--config", str(config)]
        last = d / "checkpoints" / "last.ckpt"
        if last.exists():
            print(f"[pipeline] {stage}: resuming from {last}", flush=True)
            args += ["--ckpt_path", str(last)]
        print(f"[pipeline] {stage}: rlhf-lit {' '.join(args)}", flush=True)
        spent = float((d / "wall_s").read_text()) if (d / "wall_s").exists() else 0.0
        t0 = time.time()
        cli = lightning_cli(args)
        wall = spent + time.time() - t0
        metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
        self.record(stage, {"wall_s": round(wall, 1), "final_metrics": metrics})
        if stage == "sft" and "val/loss" in metrics:
            self.record("sft", {"eval_loss": metrics["val/loss"]})
        (d / "DONE").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
        (d / "wall_s").write_text(f"{wall}\n")

    def record(self, key: str, values: dict) -> None:
        self.summary.setdefault(key, {}).update(values)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.summary_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.summary, indent=2, sort_keys=True))
        os.replace(tmp, self.summary_path)

    # -- evaluation ---------------------------------------------------------------------------
    def heldout(self, stage: str) -> list[dict]:
        """The held-out records of a stage, through that stage's own datamodule config."""
        cli = lightning_cli(
            ["--config", str(self.run_dir / stage / "config.yaml"), "--trainer.logger=false", "--trainer.callbacks=[]"],
            run=False,
        )
        cli.datamodule.setup("validate")
        return cli.datamodule.eval_records

    def evaluate(self) -> None:
        from rlhf_lit.evaluate import evaluate_policy, reward_accuracy, win_rate
        from rlhf_lit.generation import GenerationConfig
        from rlhf_lit.rewards import CallableReward, ModelReward

        ev = self.evaluation
        if "reward" in self.plans and "heldout_accuracy" not in self.summary.get("reward", {}):
            self.record(
                "reward", reward_accuracy(self.export("reward"), self.heldout("reward")[: ev.reward_pairs], ev.gold)
            )
        records = self.heldout("ppo")[: ev.prompts]
        prompts = [r["prompt"] for r in records]
        names = {k for r in records for k in r.get("columns", {})}  # e.g. a reference answer for a checker
        columns = {k: [r.get("columns", {}).get(k) for r in records] for k in names}
        rewards = {"rm_score": ModelReward(self.export("reward"), normalize=False)} if "reward" in self.plans else {}
        if ev.gold:
            rewards["gold_reward"] = CallableReward(ev.gold)
        gen = GenerationConfig(max_new_tokens=ev.max_new_tokens, temperature=ev.temperature)
        scores = {}
        for name, path in (
            ("sft", self.export("sft")),
            ("ppo", self.export("ppo", "actor")),
            ("ppo_ema", self.export("ppo", "actor_ema")),
        ):
            if not Path(path).exists():
                continue
            res = evaluate_policy(
                path, prompts, rewards, self.export("sft"), gen, seed=ev.seed, examples=ev.examples, columns=columns
            )
            scores[name] = res.pop("gold_reward_scores" if ev.gold else "rm_score_scores", None)
            res.pop("rm_score_scores", None)
            self.record(name, res)
        judge = "gold" if ev.gold else "rm"
        for name in ("ppo", "ppo_ema"):
            if scores.get(name) is not None and scores.get("sft") is not None:
                self.record(name, {f"win_rate_vs_sft_{judge}": win_rate(scores[name], scores["sft"])})
        if "ppo" in self.summary and "sft" in self.summary and ev.gold:
            sft, ppo = self.summary["sft"], self.summary["ppo"]
            gain = (ppo["gold_reward_mean"] - sft["gold_reward_mean"]) / max(sft["gold_reward_std"], 1e-9)
            self.record("ppo", {"gold_gain_in_sft_std": gain})

    def plot(self) -> Optional[Path]:
        """Gold and proxy reward against KL over PPO training (the over-optimisation picture)."""
        from rlhf_lit.plots import reward_vs_kl

        logs = sorted((self.run_dir / "ppo").rglob("metrics.csv"))
        if not logs:
            return None
        out = self.run_dir / "reward_vs_kl.png"
        reward_vs_kl({"ppo": logs[-1]}, out, title=f"PPO on {self.run_dir.name}")
        self.record("ppo", {"plot": str(out)})
        return out

    def run(self) -> dict:
        t0 = time.time()
        for stage in STAGES:
            if stage in self.plans:
                self.run_stage(stage)
        self.evaluate()
        self.plot()
        self.record("pipeline", {"wall_s_this_invocation": round(time.time() - t0, 1)})
        print(self.headline(), flush=True)
        print(f"[pipeline] summary: {self.summary_path}", flush=True)
        return self.summary

    def headline(self) -> str:
        """The summary's numbers in a few lines (everything else is in summary.json)."""
        keys = (
            "eval_loss",
            "heldout_accuracy",
            "gold_reward_mean",
            "rm_score_mean",
            "kl",
            "win_rate_vs_sft_gold",
            "win_rate_vs_sft_rm",
            "gold_gain_in_sft_std",
            "wall_s",
        )
        lines = []
        for section in ("sft", "reward", "ppo", "ppo_ema"):
            found = {k: self.summary.get(section, {}).get(k) for k in keys}
            cells = [f"{k}={v:.4g}" for k, v in found.items() if isinstance(v, (int, float))]
            if cells:
                lines.append(f"[pipeline] {section:<8} " + "  ".join(cells))
        return "\n".join(lines)


def configs_resolved(argv: list[str]) -> list[str]:
    """``--config`` files with ``recipe:`` names expanded and the paths inside each YAML (stage configs,
    data files, tokenizer) resolved beside that YAML, passed on as YAML text: the pipeline runs the same
    from any working directory."""
    from rlhf_lit.recipes import expand_config_args, resolve_pipeline_paths

    args, out, i = expand_config_args(argv), [], 0
    while i < len(args):
        arg = args[i]
        path = args[i + 1] if arg == "--config" and i + 1 < len(args) else arg.partition("=")[2]
        if (arg == "--config" or arg.startswith("--config=")) and Path(path).is_file():
            cfg = yaml.safe_load(Path(path).read_text()) or {}
            if isinstance(cfg, dict):
                path = yaml.safe_dump(resolve_pipeline_paths(cfg, Path(path).resolve().parent), sort_keys=False)
            out += ["--config", path]
            i += 2 if arg == "--config" else 1
            continue
        out.append(arg)
        i += 1
    return out


def from_args(argv: list[str]) -> Pipeline:
    """Parse ``--config FILE`` (and overrides) against Pipeline's typed signature."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="rlhf-lit pipeline", description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(Pipeline, fail_untyped=True)
    init = parser.instantiate_classes(parser.parse_args(configs_resolved(argv)))
    kwargs = {k: v for k, v in vars(init).items() if k != "config"}
    return Pipeline(**{k: (v.as_dict() if hasattr(v, "as_dict") else v) for k, v in kwargs.items()})


def main(argv: list[str]) -> int:
    from_args(argv).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
