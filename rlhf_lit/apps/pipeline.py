"""``rlhf-lit pipeline``: a list of stages (e.g. SFT -> reward -> PPO, or SFT -> DPO) in one run directory, each fed
earlier stages' exports.

For each stage the pipeline writes the complete stage config it runs (``RUN_DIR/<stage>/config.yaml``,
re-runnable on its own with ``rlhf-lit fit --config``), runs it through the same LightningCLI, and
marks it done. Re-running the command skips finished stages and resumes an interrupted one from its
last checkpoint. ``summary.json`` collects the evaluation after every stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from rlhf_lit.apps.cli import lightning_cli
from rlhf_lit.apps.pipeline_plan import PLACEHOLDER, EvalPlan, StagePlan, configs_resolved, deep_merge, set_key, spec
from rlhf_lit.errors import InputError


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
            "rlhf_lit.hf.tokenizer.TrainedBPE", save_dir=str(self.run_dir / "tokenizer"), vocab_size=1000
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
            spec("rlhf_lit.training.callbacks.HFExport", dirpath=str(d / "export")),
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
            self.tokenizer if stage == first else spec("rlhf_lit.hf.tokenizer.HFTokenizer", path=self.export(first))
        )
        for key, value in plan.inputs.items():
            set_key(cfg, key, self.fill(value))
        if self.evaluation.gold and "reward" in (cfg.get("model") or {}).get("init_args", {}):
            # an RL stage: watch the gold reward on every rollout (never trained on)
            cfg["model"]["init_args"].setdefault(
                "monitor", spec("rlhf_lit.rl.rewards.CallableReward", function=self.evaluation.gold)
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
        from rlhf_lit.apps.evaluate import evaluate_policy, reward_accuracy, win_rate
        from rlhf_lit.rl.generation import GenerationConfig
        from rlhf_lit.rl.rewards import CallableReward, ModelReward

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
        from rlhf_lit.apps.plots import reward_vs_kl

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
