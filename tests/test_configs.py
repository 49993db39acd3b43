"""Every shipped config runs offline on the bundled model and data, and its export loads back."""

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from jaxft import hf
from jaxft.config import base_config, get as config_get, validate
from jaxft.data import sources, tasks
from jaxft.tokenizer import Tokenizer
from test_evaluate import cli as evaluate_cli
from test_sft import chatml_dir, with_template  # noqa: F401 (a fixture)
from test_train import ROOT, cli

CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.py"))
# 3 steps of 8 examples and one evaluation, the final one (the one the export is checked against): the configs'
# batches of 32 (and their evaluation of the untrained model) made a run cost 2-3 times as much on CPU.
QUICK = ("--config.train.steps=3", "--config.train.batch_size=8", "--config.data.max_train_examples=96",
         "--config.data.max_eval_examples=40", "--config.train.log_every_steps=1", "--config.eval.every_steps=0",
         "--config.eval.at_start=False",
         "--config.optimizer.warmup_steps=0")  # the configs warm up over more than 3 steps


def load_config(name):
    spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_valid_and_documented(name):
    config = load_config(name)
    validate(config)
    doc = (ROOT / "configs" / name).read_text().split('"""')[1]
    assert "python -m jaxft.train --config=configs/" + name in doc  # the docstring gives the exact command


# The SST-2 configs differ only in their method. The default run keeps the main job's config (ptuning_v2.py, the
# README's first command) and an adapter export (lora.py); every config is validated in
# test_config_is_valid_and_documented, and each method trains, exports and loads back with the same logits on
# llama in test_family_methods.py::test_method_on_family[llama-<method>].
# slow: full.py (a config's whole-model export rebuilt alone scores as its run did:
# test_encoder_configs_run_on_the_bundled_bert_and_export[bitfit.py]; llama's whole-model export:
# test_family_methods.py::test_method_on_family[llama-full]), prompt_tuning.py, ptuning.py, prefix_tuning.py,
# adapter.py, ia3.py, dora.py, pissa.py (the run and export path: [lora.py]; PiSSA's converted export:
# test_lora_init.py::test_pissa_trains_on_a_mesh_resumes_and_exports_for_peft).
SST2_DEFAULT = ("ptuning_v2.py", "lora.py")


@pytest.mark.parametrize("name", [
    n if n in SST2_DEFAULT else pytest.param(n, marks=pytest.mark.slow)
    for n in ["ptuning_v2.py", "lora.py", "full.py", "prompt_tuning.py", "ptuning.py", "prefix_tuning.py", "adapter.py",
              "ia3.py", "dora.py", "pissa.py"]])
def test_sst2_configs_run_and_export(tmp_path, name):
    # One batch width, so one train step compile per config: the RTE run below keeps its config's length
    # buckets (a compile per width) on.
    r = cli(tmp_path, *QUICK, "--config.data.length_buckets=False", config=f"configs/{name}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trainable" in r.stdout and "done:" in r.stdout and "eval/accuracy=" in r.stdout
    final = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]

    # Rebuild the trained model from the export alone and score the same 40 dev examples.
    export = tmp_path / "export"
    if (export / "adapter_config.json").exists():
        model, params = hf.load("jaxft-tiny", adapter=str(export))
    else:
        model, params = hf.load(str(export))
    assert model.cfg.head == "classification"
    tok = Tokenizer(hf.resolve("jaxft-tiny"))
    dev = sources.read_file(sources.BUNDLED["sst2"].eval)
    dev = sources.Records(dev.rows[:40], dev.where[:40])
    arrays, _ = tasks.classification(dev, tok, 64, "sentence", "label", [0, 1])
    logits = np.asarray(model.apply({"params": params}, arrays["input_ids"], arrays["attention_mask"]))
    accuracy = float((logits.argmax(-1) == arrays["labels"]).mean())
    assert accuracy == pytest.approx(final["eval/accuracy"], abs=1e-6)


@pytest.mark.parametrize("name,data,labels", [("rte_ptuning_v2.py", "rte", ("entailment", "not_entailment")),
                                               ("chnsenticorp_lora.py", "chnsenticorp", None)])  # 0..C-1: no names
def test_pair_and_chinese_configs_run_and_export(tmp_path, name, data, labels):
    """RTE (sentence pairs on jaxft-tiny, named labels) and ChnSentiCorp (Chinese characters on
    jaxft-tiny-bert): the export, rebuilt alone on the config's base, scores the first 40 dev examples as
    the run's own evaluation did."""
    # RTE keeps its config's length buckets (a compile per batch width); ChnSentiCorp runs at one width.
    buckets = () if data == "rte" else ("--config.data.length_buckets=False",)
    r = cli(tmp_path, *QUICK, *buckets, config=f"configs/{name}")
    assert r.returncode == 0, r.stderr[-3000:]
    final = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    config = load_config(name)
    model, params = hf.load(config.model.path, adapter=str(tmp_path / "export"))
    assert model.cfg.labels == labels
    bundled = sources.BUNDLED[data]
    dev = sources.read_file(bundled.eval)
    dev = sources.Records(dev.rows[:40], dev.where[:40])
    label_names = tasks.label_vocab(sources.read_file(bundled.train), bundled.label_field)
    arrays, _ = tasks.classification(dev, Tokenizer(hf.resolve(config.model.path)), config.data.seq_len, bundled.text_field,
                                     bundled.label_field, label_names, bundled.text_pair_field)
    logits = np.asarray(model.apply({"params": params}, arrays["input_ids"], arrays["attention_mask"]))
    assert float((logits.argmax(-1) == arrays["labels"]).mean()) == pytest.approx(final["eval/accuracy"], abs=1e-6)


def test_bundled_model_card_matches_weights():
    root = Path(hf.resolve("jaxft-tiny"))
    card = (root / "README.md").read_text()
    model, params = hf.load("jaxft-tiny")
    n = sum(int(np.prod(v.shape)) for v in __import__("jax").tree_util.tree_leaves(params))
    assert f"{n:,}" in card
    assert "python -m jaxft.train --config=configs/pretrain_tiny.py" in card
    assert (root / "model.safetensors").stat().st_size <= 25 * 2**20


# slow: ptuning_v2_bert.py; the bundled BERT's run and export is checked in [bitfit.py], a prefix method on BERT
# in test_family_methods.py::test_method_on_family[bert-ptuning_v2], a ptuning_v2 config's run and adapter
# export in test_pair_and_chinese_configs_run_and_export[rte_ptuning_v2.py-rte-labels0].
def test_chinese_ner_config_runs_and_exports_a_token_classifier(tmp_path):
    """configs/ner_adgen_bert.py: tagged characters, entity scores in the eval, a BertForTokenClassification
    export that transformers reads with the tag names."""
    import transformers

    r = cli(tmp_path, *QUICK, config="configs/ner_adgen_bert.py")
    assert r.returncode == 0, r.stderr[-3000:]
    final = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"eval/entity_f1", "eval/entity_f1/颜色", "eval/f1/B-颜色"} <= set(final)
    back = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "export")
    assert type(back).__name__ == "BertForTokenClassification" and back.config.id2label[0] == "B-图案"


@pytest.mark.parametrize("name", [pytest.param("ptuning_v2_bert.py", marks=pytest.mark.slow), "bitfit.py"])
def test_encoder_configs_run_on_the_bundled_bert_and_export(tmp_path, name):
    """The encoder configs run offline on jaxft-tiny-bert; the export, on that base, scores the first 40
    dev examples (WordPiece, [CLS] ... [SEP]) as the run's own evaluation did."""
    r = cli(tmp_path, *QUICK, "--config.data.length_buckets=False", config=f"configs/{name}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "model: bert" in r.stdout
    final = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    export = tmp_path / "export"  # BitFit (no PEFT type) exports the whole model
    adapter = (export / "adapter_config.json").exists()
    model, params = hf.load("jaxft-tiny-bert", adapter=str(export)) if adapter else hf.load(str(export))
    dev = sources.read_file(sources.BUNDLED["sst2"].eval)
    dev = sources.Records(dev.rows[:40], dev.where[:40])
    arrays, _ = tasks.classification(dev, Tokenizer(hf.resolve("jaxft-tiny-bert")), 64, "sentence", "label", [0, 1])
    logits = np.asarray(model.apply({"params": params}, arrays["input_ids"], arrays["attention_mask"]))
    assert float((logits.argmax(-1) == arrays["labels"]).mean()) == pytest.approx(final["eval/accuracy"], abs=1e-6)


def test_chinese_cloze_config_runs_and_its_export_answers_alike(tmp_path):
    """configs/pet_chnsenticorp.py on the bundled encoder: the exported masked LM, loaded alone, puts the
    run's label words at the mask of the first 40 dev reviews as the run's own evaluation did."""
    from jaxft import objectives

    # One batch width (one train step compile); the RTE run keeps a config's length buckets.
    r = cli(tmp_path, *QUICK, "--config.data.length_buckets=False", config="configs/pet_chnsenticorp.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "head=masked_lm" in r.stdout
    final = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    config = load_config("pet_chnsenticorp.py")
    model, params = hf.load(str(tmp_path / "export"))
    dev = sources.read_file(sources.BUNDLED["chnsenticorp"].eval)
    dev = sources.Records(dev.rows[:40], dev.where[:40])
    d = config.data
    arrays, _ = tasks.cloze(dev, Tokenizer(hf.resolve(config.model.path)), d.seq_len, "review", "label", [0, 1],
                            d.cloze_template, d.verbalizer)
    logits = objectives.cloze_logits(model.apply({"params": params}, **objectives.cloze_inputs(arrays)), arrays)
    assert float((np.asarray(logits).argmax(-1) == arrays["labels"]).mean()) == pytest.approx(final["eval/accuracy"],
                                                                                             abs=1e-6)


def test_qwen3_sft_config_runs_on_a_tiny_qwen3_in_non_thinking_mode(tmp_path, chatml_dir):
    """configs/gpu_qwen3_lora_sft_zh.py, its model.path a tiny random Qwen3 beside a ChatML tokenizer whose
    template has Qwen3's non-thinking switch: it trains and exports, and the eval prompts of its export
    are transformers' apply_chat_template(..., add_generation_prompt=True, enable_thinking=False)."""
    import transformers
    from test_hf import build_hf

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(with_template(chatml_dir, tmp_path / "thinking")))
    config = transformers.Qwen3Config(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                                      eos_token_id=hf_tok.eos_token_id, max_position_embeddings=512)
    model_dir = with_template(chatml_dir, build_hf(tmp_path, config, "Qwen3ForCausalLM")[1])
    name, run = "configs/gpu_qwen3_lora_sft_zh.py", tmp_path / "run"
    small = (f"--config.model.path={model_dir}", "--config.data.seq_len=96", "--config.train.batch_size=4",
             "--config.data.eval_holdout=8")
    r = cli(run, *QUICK, *small, config=name)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "chat template from" in r.stdout and "with enable_thinking=false" in r.stdout and "done:" in r.stdout
    assert (run / "export" / "adapter_config.json").is_file()

    e = evaluate_cli(f"--config={name}", f"--checkpoint={run / 'export'}", *small, "--max_examples=3",
                     "--max_new_tokens=4", f"--out={tmp_path / 'eval'}")
    assert e.returncode == 0, e.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    records = json.loads((ROOT / "jaxft/assets/alpaca_zh_demo/alpaca_zh_demo.json").read_text())[-8:]
    assert len(rows) == 3
    for row, record in zip(rows, records):
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        want = hf_tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                          add_generation_prompt=True, enable_thinking=False)
        assert want.endswith("<think>\n\n</think>\n\n") and row["prompt"] == want


def test_glm4_ptuning_v2_config_runs_on_a_tiny_glm4_and_peft_reads_its_prefix(tmp_path, chatml_dir):
    """configs/gpu_glm4_ptuning_v2_adgen.py, its model.path a tiny random GLM-4-0414 (half-rotated heads, fused
    gate_up_proj, sandwich norms) beside a ChatML tokenizer: ADGEN's content -> summary trains as chat turns,
    ROUGE is scored, and the export is a PEFT prefix-tuning adapter with the config's 128 virtual tokens
    that PEFT loads onto transformers' Glm4ForCausalLM with jaxft's logits."""
    import peft
    import torch
    import transformers
    from test_hf import build_hf

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(chatml_dir))
    config = transformers.Glm4Config(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0,
                                     eos_token_id=hf_tok.eos_token_id, max_position_embeddings=512)
    model_dir = with_template(chatml_dir, build_hf(tmp_path, config, "Glm4ForCausalLM")[1])
    name, run = "configs/gpu_glm4_ptuning_v2_adgen.py", tmp_path / "run"
    r = cli(run, *QUICK, f"--config.model.path={model_dir}", "--config.data.eval_holdout=8",
            "--config.eval.generate_examples=4", "--config.eval.max_new_tokens=4", config=name)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "chat template from" in r.stdout and "model: glm4 2x32" in r.stdout and "eval/rougeL=" in r.stdout
    adapter = json.loads((run / "export" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "PREFIX_TUNING" and adapter["num_virtual_tokens"] == 128
    ours_model, params = hf.load(str(model_dir), adapter=str(run / "export"))
    ids = np.random.default_rng(0).integers(3, len(hf_tok), (2, 10)).astype(np.int32)
    ours = np.asarray(ours_model.apply({"params": params}, ids, np.ones_like(ids)))
    theirs = peft.PeftModel.from_pretrained(transformers.Glm4ForCausalLM.from_pretrained(str(model_dir)).eval(),
                                            str(run / "export")).eval()
    with torch.no_grad():
        got = theirs(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
    assert np.abs(got - ours).max() <= 1e-4 * np.abs(got).max()


def documented_keys(text, sections):
    """The config keys a text names: every `--config.KEY=...`, and every `KEY` or `KEY=VALUE` in backticks
    whose first part is a config section (`model.pooling`, `data.task=cloze`)."""
    keys = set(re.findall(r"--config\.([a-z_]+(?:\.[a-z0-9_]+)+)", text))
    keys |= set(re.findall(r"`((?:%s)\.[a-z0-9_]+)(?:=[^`]*)?`" % "|".join(sections), text))
    return {k for k in keys if not k.startswith("model.init.")}  # model.init holds a config.json's keys


def test_every_config_key_the_docs_name_exists():
    """README.md, BENCHMARKS.md, docs/, launch/README.md and the configs' docstrings name config keys a
    user will type: each must be a key of the base config, or the command stops with 'no such config key'."""
    base = base_config()
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "launch" / "README.md",
             *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "configs").glob("*.py"))]
    missing, named = [], 0
    for path in files:
        for key in sorted(documented_keys(path.read_text(), tuple(base.keys()))):
            named += 1
            try:
                config_get(base, key)
            except KeyError:
                missing.append(f"{path.relative_to(ROOT)}: {key}")
    assert named > 100  # the pattern still finds the README's keys
    assert not missing, missing
