"""Decode speed of jaxft's `generate` against transformers' `generate`, same model, same device.

A Llama of the given size (random weights, made by transformers and loaded into jaxft from the same
safetensors), prompts of --prompt_len random tokens (no padding), --new_tokens greedy tokens each
(no EOS, so every row runs to the end), at each batch size of --batches. Prints one table: per
(framework, batch) the first call's time (jaxft: trace + compile + run), the best of --repeats timed
calls, and new tokens per second (batch * new_tokens / time), with jaxft's ratio to transformers and
whether the two produced the same tokens.

    python tools/decode_bench.py --layers 4 --hidden 256 --heads 4 --kv_heads 2 --intermediate 688 \
        --vocab 4096 --batches 1,8 --prompt_len 32 --new_tokens 128 --dtype float32

- jaxft: `jaxft.generate.generate` (prefill + `lax.while_loop`, one jit), scanned layers, parameters
  placed on the device once and stored in --dtype (`model.dtype` and `model.param_dtype`).
- transformers: `LlamaForCausalLM.generate(do_sample=False, min_new_tokens=max_new_tokens)` with its
  default dynamic cache and SDPA attention, eager, under `torch.no_grad()`; the model in --dtype.
On a GPU (`torch.cuda.is_available()`), transformers runs on CUDA and JAX on its default backend (the
GPU); JAX is told not to preallocate most of the GPU's memory, so both fit. Timing synchronises both.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to PyTorch too
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row (the best counts)")
    p.add_argument("--frameworks", default="jaxft,transformers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch_threads", type=int, default=0, help="PyTorch CPU threads (0: every core)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import jax
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxft import hf
    from jaxft.generate import generate

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    hf_cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.prompt_len + args.new_tokens,
                         initializer_range=0.2, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    torch_model = LlamaForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        torch_model.save_pretrained(d)
        model, params = hf.load(d, dtype=args.dtype, param_dtype=args.dtype)
    params = jax.device_put(jax.tree.map(lambda x: x.astype(args.dtype), params))  # weights stored as torch's
    torch_model = torch_model.to(device=device, dtype=tdtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cpu":
        torch.set_num_threads(args.torch_threads or os.cpu_count())
    weights = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"# {platform.node()} | jax {jax.__version__} on {jax.devices()[0].device_kind} | torch {torch.__version__} "
          f"on {torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or 'cpu'} "
          f"({os.cpu_count()} CPUs)")
    print(f"# Llama {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, intermediate "
          f"{args.intermediate}, vocab {args.vocab} ({weights / 1e6:.1f}M params), {args.dtype}; prompt "
          f"{args.prompt_len} tokens, {args.new_tokens} new tokens, greedy")

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, out

    rows = []
    frameworks = args.frameworks.split(",")
    for batch in (int(b) for b in args.batches.split(",")):
        ids = np.random.RandomState(args.seed + batch).randint(1, args.vocab, (batch, args.prompt_len))
        got = {}
        if "jaxft" in frameworks:
            run = lambda: np.asarray(generate(model, params, ids, max_new_tokens=args.new_tokens))  # noqa: E731
            first, got["jaxft"] = timed(run)
            best = min(timed(run)[0] for _ in range(args.repeats))
            rows.append(("jaxft", batch, first, best))
        if "transformers" in frameworks:
            tids = torch.tensor(ids, device=device)

            def run():
                with torch.no_grad():
                    out = torch_model.generate(input_ids=tids, attention_mask=torch.ones_like(tids),
                                               max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                               do_sample=False, pad_token_id=0)
                sync()
                return out[:, args.prompt_len:].cpu().numpy()

            first, got["transformers"] = timed(run)
            best = min(timed(run)[0] for _ in range(args.repeats))
            rows.append(("transformers", batch, first, best))
        if len(got) == 2:
            rows[-2] += (bool((got["jaxft"] == got["transformers"]).all()),)

    def rate(r):
        return r[1] * args.new_tokens / r[3]

    hf_rate = {r[1]: rate(r) for r in rows if r[0] == "transformers"}
    print("| framework | batch | first call s | best s | new tokens/s | vs transformers | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{rate(r) / hf_rate[r[1]]:.2f}x" if r[0] == "jaxft" and r[1] in hf_rate else ""
        same = ("yes" if r[4] else "no") if len(r) > 4 else ""
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.3f} | {rate(r):,.0f} | {ratio} | {same} |")


if __name__ == "__main__":
    main()
