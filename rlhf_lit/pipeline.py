"""``rlhf-lit pipeline``: a list of stages (e.g. SFT -> reward -> PPO, or SFT -> DPO) in one run directory, each fed
earlier stages' exports.

For each stage the pipeline writes the complete stage config it runs (``RUN_DIR/<stage>/config.yaml``,
re-runnable on its own with ``rlhf-lit fit --config``), runs it through the same LightningCLI, and
marks it done. Re-running the command skips finished stages and resumes an interrupted one from its
last checkpoint. ``summary.json`` collects the evaluation after every stage.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from rlhf_lit.cli import lightning_cli
from rlhf_lit.errors import InputError

PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_.-]+)((?:/[A-Za-z0-9_.-]+)*)\}")


@dataclass
class StagePlan:
    """One stage of a pipeline: a stage config, overrides merged into it, and what earlier stages feed it."""

    name: str
    """the stage's name: its folder in run_dir, its summary section, what later stages refer to"""
    config: str
    """path of the stage's base YAML (e.g. configs/sft/tiny.yaml)"""
    overrides: dict = field(default_factory=dict)
    """nested keys merged over the base (e.g. {trainer: {max_epochs: 3}})"""
    inputs: dict = field(default_factory=dict)
    """dotted config keys set from earlier stages' exports: "{sft}" in a value is the sft stage's export
    folder, "{ppo/actor}" a sub-folder (e.g. model.init_args.actor.init_args.path: "{sft}")"""
    policies: dict = field(default_factory=dict)
    """summary section -> export sub-folder ("" the export itself) evaluated as a policy on held-out prompts"""
    reward_model: bool = False
    """its export is a reward model: accuracy on its held-out pairs, and the proxy judge of the policies"""


@dataclass
class EvalPlan:
    """What the pipeline measures on held-out data after the stages."""

    prompts: int = 200
    """held-out prompts used to evaluate the policies"""
    gold: Optional[str] = None
    """import path of a gold reward function (prompt, response, **columns) -> float, when the task has one"""
    max_new_tokens: int = 32
    temperature: float = 1.0
    seed: int = 0
    reward_pairs: Optional[int] = None
    """held-out pairs scored for the reward model's accuracy (None: all of them)"""
    examples: int = 3
    """held-out prompts whose responses each policy's summary keeps (before/after answers)"""
    baseline: Optional[str] = None
    """the policy the others are compared with (KL reference, win rate); default: the first policy"""
    prompts_from: Optional[str] = None
    """the stage whose held-out records give the prompts (default: the last stage)"""
    models: dict = field(default_factory=dict)
    """policies no stage trains, evaluated beside the stages' exports: name -> model folder or hub name
    (e.g. {start: models/smollm2-135m-instruct}, the checkpoint an RL stage starts from without SFT)"""


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


def set_key(cfg: dict, dotted: str, value) -> None:
    """Merge ``value`` at a dotted key of a nested config (as an override of that key would be)."""
    *parents, last = dotted.split(".")
    node = cfg
    for k in parents:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise InputError(f"inputs: {dotted}: {k} is not a mapping in the stage config")
    old = node.get(last)
    node[last] = deep_merge({"x": old}, {"x": value})["x"] if isinstance(old, dict) else value  # class switch rule


class Pipeline:
    """A list of stages run in order in ``run_dir``, each fed earlier stages' exports, then an evaluation
    of the policies they export. The runner knows no stage by name: the YAML says what feeds what."""

    def __init__(
        self,
        run_dir: str,
        blend: dict,
        stages: list[StagePlan],
        tokenizer: Optional[dict] = None,
        evaluation: Optional[EvalPlan] = None,
        checkpoint_every_n_steps: int = 50,
    ) -> None:
        """
        Args:
            run_dir: output directory: one folder per stage, summary.json, the plot.
            blend: the data blend of every stage (init args of datamodules.Blend); its seeded split keeps
                the stages' rows disjoint.
            stages: the stages in order.
            tokenizer: tokenizer spec of the first stage (class_path/init_args); default: a BPE trained on the
                blend, saved in RUN_DIR/tokenizer. Later stages use the first stage's exported tokenizer
                unless their inputs set data.init_args.tokenizer.
            evaluation: held-out evaluation settings.
            checkpoint_every_n_steps: how often each stage saves the checkpoint a re-run resumes from.
        """
        self.run_dir = Path(run_dir)
        self.blend = blend
        self.stages = [StagePlan(**s) if isinstance(s, dict) else s for s in stages]
        self.plans = {p.name: p for p in self.stages}
        if not self.stages or len(self.plans) != len(self.stages):
            raise InputError(
                f"stages: give at least one stage, each with its own name; got {[p.name for p in self.stages]}"
            )
        for i, plan in enumerate(self.stages):
            earlier = [p.name for p in self.stages[:i]]
            for m in PLACEHOLDER.finditer(json.dumps(plan.inputs)):
                if m.group(1) not in earlier:
                    raise InputError(
                        f"stages[{i}] ({plan.name}).inputs: {{{m.group(1)}}} names no earlier stage "
                        f"(earlier: {', '.join(earlier) or 'none'})"
                    )
        self.tokenizer = tokenizer or spec(
            "rlhf_lit.tokenizer.TrainedBPE", save_dir=str(self.run_dir / "tokenizer"), vocab_size=1000
        )
        self.checkpoint_every = checkpoint_every_n_steps
        self.evaluation = evaluation or EvalPlan()
        named = {p.name for p in self.stages} | {n for p in self.stages for n in p.policies}
        clash = set(self.evaluation.models) & named
        if clash:
            raise InputError(f"evaluation.models: {', '.join(sorted(clash))} already names a stage or a stage's policy")
        self.summary_path = self.run_dir / "summary.json"
        self.summary: dict = json.loads(self.summary_path.read_text()) if self.summary_path.exists() else {}

    def export(self, stage: str, sub: str = "") -> str:
        return str(self.run_dir / stage / "export" / sub)

    def fill(self, value):
        """``value`` with every "{stage}" / "{stage/sub}" replaced by that export's folder."""
        if isinstance(value, str):
            return PLACEHOLDER.sub(lambda m: self.export(m.group(1), m.group(2).lstrip("/")).rstrip("/"), value)
        if isinstance(value, dict):
            return {k: self.fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.fill(v) for v in value]
        return value

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
        first = self.stages[0].name
        data["tokenizer"] = (
            self.tokenizer if stage == first else spec("rlhf_lit.tokenizer.HFTokenizer", path=self.export(first))
        )
        for key, value in plan.inputs.items():
            set_key(cfg, key, self.fill(value))
        if self.evaluation.gold and "reward" in (cfg.get("model") or {}).get("init_args", {}):
            # an RL stage: watch the gold reward on every rollout (never trained on)
            cfg["model"]["init_args"].setdefault(
                "monitor", spec("rlhf_lit.rewards.CallableReward", function=self.evaluation.gold)
            )
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
        self.record(stage, {"wall_s": round(wall, 1), "steps": cli.trainer.global_step, "final_metrics": metrics})
        if "val/loss" in metrics:
            self.record(stage, {"eval_loss": metrics["val/loss"]})
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

    def done_stamp(self, export: str) -> str:
        """The DONE stamp of the stage that wrote an export folder (changes when the stage re-runs); a model
        of ``evaluation.models`` (not written here) is known by its path."""
        if not Path(export).is_relative_to(self.run_dir):
            return f"model {export}"
        stage = Path(export).relative_to(self.run_dir).parts[0]
        done = self.run_dir / stage / "DONE"
        return done.read_text().strip() if done.exists() else ""

    def policies(self) -> dict[str, str]:
        """Summary section -> folder of every policy: ``evaluation.models`` first, then the exports the
        stages declare, in stage order."""
        staged = {name: self.export(p.name, sub) for p in self.stages for name, sub in p.policies.items()}
        return {**self.evaluation.models, **staged}

    def evaluate(self) -> None:
        from rlhf_lit.evaluate import evaluate_policy, reward_accuracy, win_rate
        from rlhf_lit.generation import GenerationConfig
        from rlhf_lit.rewards import CallableReward, ModelReward

        ev, rewards = self.evaluation, {}
        for plan in (p for p in self.stages if p.reward_model):
            if "heldout_accuracy" not in self.summary.get(plan.name, {}):
                pairs = self.heldout(plan.name)[: ev.reward_pairs]
                self.record(plan.name, reward_accuracy(self.export(plan.name), pairs, ev.gold))
            rewards["rm_score"] = ModelReward(self.export(plan.name), normalize=False)  # the last one judges
        if ev.gold:
            rewards["gold_reward"] = CallableReward(ev.gold)
        policies = {k: v for k, v in self.policies().items() if Path(v).exists() or k in ev.models}
        if not policies:
            return
        records = self.heldout(ev.prompts_from or self.stages[-1].name)[: ev.prompts]
        prompts = [r["prompt"] for r in records]
        names = {k for r in records for k in r.get("columns", {})}  # e.g. a reference answer for a checker
        columns = {k: [r.get("columns", {}).get(k) for r in records] for k in names}
        gen = GenerationConfig(max_new_tokens=ev.max_new_tokens, temperature=ev.temperature)
        base = ev.baseline or next(iter(policies))
        if base not in policies:
            raise InputError(f"evaluation.baseline: {base!r} is not a policy of this pipeline ({', '.join(policies)})")
        judge = "gold" if ev.gold else "rm"
        scores = {}
        for name, path in policies.items():
            # What this evaluation depends on: the policy's stage (its DONE stamp), the baseline, the prompts.
            asked = hashlib.sha1(json.dumps([prompts, columns, ev.max_new_tokens, ev.temperature, ev.seed]).encode())
            key = [self.done_stamp(path), self.done_stamp(policies[base]), asked.hexdigest()[:16]]
            if self.summary.get(name, {}).get("evaluated") == key:  # a re-run or a reused stage: known
                scores[name] = self.summary[name].get("scores")
                continue
            res = evaluate_policy(
                path, prompts, rewards, policies[base], gen, seed=ev.seed, examples=ev.examples, columns=columns
            )
            scores[name] = res.pop(f"{'gold_reward' if ev.gold else 'rm_score'}_scores", None)
            res.pop("rm_score_scores", None)
            self.record(name, {**res, "scores": scores[name], "evaluated": key})
        for name in policies:
            if name != base and scores[name] is not None and scores[base] is not None:
                self.record(name, {f"win_rate_vs_{base}_{judge}": win_rate(scores[name], scores[base])})
                if ev.gold:
                    s, b = self.summary[name], self.summary[base]
                    gain = (s["gold_reward_mean"] - b["gold_reward_mean"]) / max(b["gold_reward_std"], 1e-9)
                    self.record(name, {f"gold_gain_in_{base}_std": gain})
        # The last policy stage's first policy (PPO's actor, not its EMA), under one name across recipes.
        final = next(n for p in reversed(self.stages) for n in p.policies if n in policies)
        self.summary["final"] = {"policy": final, **self.summary[final]}
        self.record("final", {})

    def plot(self) -> Optional[Path]:
        """Gold and proxy reward against KL over every RL stage's training (the over-optimisation picture)."""
        from rlhf_lit.plots import reward_vs_kl

        runs = {}
        for plan in self.stages:
            logs = sorted((self.run_dir / plan.name).rglob("metrics.csv"))
            if logs and "objective/kl" in logs[-1].read_text().partition("\n")[0]:
                runs[plan.name] = logs[-1]
        if not runs:
            return None
        out = self.run_dir / "reward_vs_kl.png"
        reward_vs_kl(runs, out, title=f"{', '.join(runs)} on {self.run_dir.name}")
        self.record("pipeline", {"plot": str(out)})
        return out

    def run(self) -> dict:
        t0 = time.time()
        for plan in self.stages:
            self.run_stage(plan.name)
        self.evaluate()
        self.plot()
        self.record("pipeline", {"wall_s_this_invocation": round(time.time() - t0, 1)})
        print(self.headline(), flush=True)
        print(f"[pipeline] summary: {self.summary_path}", flush=True)
        return self.summary

    def headline(self) -> str:
        """The summary's numbers in a few lines (everything else is in summary.json)."""
        wanted = (
            "eval_loss",
            "heldout_accuracy",
            "gold_reward_mean",
            "rm_score_mean",
            "kl",
            "win_rate_vs_",
            "gold_gain_in_",
            "wall_s",
        )
        lines = []
        sections = [p.name for p in self.stages] + [n for n in self.policies() if n not in self.plans]
        for section in sections:
            found = self.summary.get(section, {})
            cells = [
                f"{k}={v:.4g}"
                for w in wanted
                for k, v in found.items()
                if (k == w or (w.endswith("_") and k.startswith(w))) and isinstance(v, (int, float))
            ]
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

    parser = ArgumentParser(prog="rlhf-lit pipeline", description=__doc__, exit_on_error=False)
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
