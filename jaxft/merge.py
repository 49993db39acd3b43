"""Fold an adapter into its base model and save the whole model: `python -m jaxft.merge --model=BASE
--adapter=DIR --out=DIR` (PEFT's `merge_and_unload` + `save_pretrained`).

The adapter is a HF PEFT adapter directory (LoRA, DoRA, PiSSA / OLoRA, IA3, AdaLoRA; PEFT's own or a
jaxft export) on `--model` (a HF directory, jaxft-tiny, or a hub name when online). The result, a
config.json + model.safetensors directory with the base's tokenizer files, loads in transformers without
PEFT. Soft prompts, prefixes and bottleneck adapters have no weights to fold into: an error, as is an
`--out` that is the base's own directory (its weights would be replaced).
"""

from __future__ import annotations

import sys
from pathlib import Path

from jaxft.config import SAVE_DTYPES
from jaxft.errors import ArgumentParser, JaxftError, one_line_errors


def parse_args(argv):
    ap = ArgumentParser(prog="python -m jaxft.merge", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True,
                    help="the base: HF model directory, jaxft-tiny, or a hub name when online")
    ap.add_argument("--adapter", required=True, help="HF PEFT adapter directory (or a jaxft run's export)")
    ap.add_argument("--out", required=True, help="where the merged model goes (a new or a model directory)")
    ap.add_argument("--dtype", default="float32", choices=SAVE_DTYPES,
                    help="the saved weights' dtype (bfloat16 / float16: half the bytes)")
    return ap.parse_args(argv)


def main(argv=None) -> Path:
    return one_line_errors(_merge)(parse_args(sys.argv[1:] if argv is None else argv))


def _merge(args) -> Path:
    from jaxft import hf
    from jaxft.generate import load, tokenizer_files
    from jaxft.peft.methods import merge_into_base

    root = hf.resolve(args.model)
    out = Path(args.out)
    if out.resolve() == Path(root).resolve():
        raise JaxftError(f"--out={args.out} is the base model's own directory: expected another (the merged "
                         "weights would replace the base's)")
    model, params, tok_dir = load(args.model, args.adapter)
    if not model.hooks:
        raise JaxftError(f"--adapter={args.adapter} is a whole model, not an adapter: nothing to merge")
    kinds = "+".join(h.kind for h in model.hooks)
    plain, merged = merge_into_base(model, params)
    hf.save(plain, merged, out, tokenizer_dir=tok_dir if tokenizer_files(Path(tok_dir)) else None, dtype=args.dtype)
    print(f"merged {kinds} from {args.adapter} into {args.model}: {out}")
    return out


if __name__ == "__main__":
    main()
