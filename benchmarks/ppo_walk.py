"""How far a reader walks through the repository's files to follow one PPO step (issue #29).

Traces one training step of ``configs/ppo/tiny.yaml`` and records, for the calls of the repository's own
code down to ``--depth`` levels below ``training_step`` (1: training_step itself), every move from one file
to another: a call into another file, or a return ("climb back up") to the caller's file. Prints the moves,
the climbs back, the files entered and the path. Run it in a directory holding the tiny SFT and reward
exports (``runs/tiny/{sft,reward}/export``; two short ``rlhf-lit fit`` runs make them), against any checkout:

    python benchmarks/ppo_walk.py --repo . --depth 3
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--depth", type=int, default=3)
    args = ap.parse_args()
    repo = os.path.abspath(args.repo)
    sys.path.insert(0, repo)
    warnings.simplefilter("ignore")
    import lightning as L

    try:
        from rlhf_lit.apps.cli import lightning_cli
    except ImportError:  # a checkout from before the layers (0.1)
        from rlhf_lit.cli import lightning_cli

    roots = tuple(os.path.join(repo, d) + os.sep for d in ("rlhf_lit", "modules", "datamodules"))
    stack: list[str] = []
    path: list[str] = []

    def profile(frame, event, arg):
        file = frame.f_code.co_filename
        if not file.startswith(roots):
            return
        file = os.path.relpath(file, repo)
        if event == "call":
            if not stack and frame.f_code.co_name != "training_step":
                return
            if stack and len(stack) < args.depth and stack[-1] != file:
                path.append(file)
            stack.append(file)
        elif event == "return" and stack:
            top = stack.pop()
            if stack and len(stack) < args.depth and stack[-1] != top:
                path.append("^" + stack[-1])

    class Trace(L.Callback):
        def on_train_batch_start(self, *a):
            sys.setprofile(profile)

        def on_train_batch_end(self, *a):
            sys.setprofile(None)

    cli = lightning_cli(
        ["--config", os.path.join(repo, "configs/ppo/tiny.yaml"), "--trainer.max_steps=1", "--trainer.logger=false",
         "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false"],
        run=False,
    )  # fmt: skip
    cli.trainer.callbacks.append(Trace())
    cli.trainer.fit(cli.model, cli.datamodule)
    files = {p.lstrip("^") for p in path} | {"modules/ppo.py"}
    climbs = sum(p.startswith("^") for p in path)
    print(f"depth {args.depth}: {len(path)} moves between files, {climbs} climbs back up, {len(files)} files")
    print(" -> ".join(["modules/ppo.py", *path]))


if __name__ == "__main__":
    main()
