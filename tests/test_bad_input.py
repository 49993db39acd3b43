"""Exit 0 means the result is right (issue 10): each case runs through the real CLI.

A bad input must end with exit status 2, exactly one line on stderr starting with "error:", and
nothing written (the workdir absent, or byte for byte as before). An input that used to crash or
to train something silently wrong must now do the right thing, checked against an oracle:
transformers and PEFT, or a confusion matrix computed here by hand.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from test_train import ROOT, cli
from forkserver import python_m

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SST2 = ROOT / "jaxft" / "assets" / "sst2"
NO_WARMUP = "--config.optimizer.warmup_steps=0"  # a shipped config cut to a few steps (its warmup is longer)
TINY_TOKENIZER = ROOT / "jaxft" / "assets" / "jaxft-tiny"  # real text for a tiny_hf_model of vocab=4096


def checksums(workdir) -> dict:
    root = Path(workdir)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def assert_one_line_error(r, *fragments):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def tiny_hf_model(directory, model_cls="LlamaForCausalLM", config_cls="LlamaConfig", vocab=128, **kw):
    """A random transformers model saved to `directory` (safetensors + config.json)."""
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=64, **kw)
    getattr(transformers, model_cls)(config).save_pretrained(directory)
    return Path(directory)


def lora_adapter(out, layers: int, widths: dict, r: int, alpha: int, base=None):
    """A LoRA adapter of tiny_hf_model's 32-wide Llama, written as PEFT writes one (and a run exports it):
    random A and B of each `widths` module (its output width) in `layers` layers."""
    out.mkdir()
    rng = np.random.default_rng(0)
    save_file({f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight":
               rng.normal(size=(r, 32) if ab == "A" else (width, r)).astype(np.float32)
               for i in range(layers) for m, width in widths.items() for ab in "AB"},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(widths),
              "task_type": "CAUSAL_LM"}
    if base is not None:
        config["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def sst2_rows(split: str, n: int):
    with open(SST2 / f"{split}.tsv", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1 : n + 1]
    return [(text.strip(), int(label)) for text, label in rows]


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------
# 1. The task is data.task, or what the data says unambiguously.


@pytest.mark.parametrize("rows", [2, 300])
def test_label_column_under_another_name_is_an_error(tmp_path, rows):
    """Was: 2 rows -> "fewer than one block of 64"; 300 rows -> exit 0, a causal LM of the text."""
    data = write_csv(tmp_path / "reviews.csv", ["text", "sentiment"],
                     [(t, "pos" if y else "neg") for t, y in sst2_rows("train", rows)])
    wd = tmp_path / "run"
    r = cli(wd, f"--config.data.name={data}", "--config.train.steps=2", NO_WARMUP, config="configs/lora.py")
    assert_one_line_error(r, "data.task is empty", "no 'label' column", "columns found: text, sentiment")
    assert "fewer than one block" not in r.stderr
    assert checksums(wd) == {}


def test_classification_without_its_label_column_lists_the_columns(tmp_path):
    data = write_csv(tmp_path / "reviews.csv", ["text", "sentiment"], [("good", "pos"), ("bad", "neg")])
    wd = tmp_path / "run"
    r = cli(wd, f"--config.data.name={data}", "--config.data.task=classification", "--config.data.label_field=stars",
            config="configs/lora.py")
    assert_one_line_error(r, "no label column 'stars' for classification", "columns found: text, sentiment")
    assert checksums(wd) == {}


# ---------------------------------------------------------------------------------------------
# 2. A method must hook something.


def test_lora_targets_matching_nothing_is_an_error_and_the_old_run_is_untouched(tmp_path):
    """Was: exit 0, only the head trained (here: nothing), a full model exported."""
    wd = tmp_path / "run"
    assert cli(wd).returncode == 0
    before = checksums(wd)
    assert before
    r = cli(wd, "--config.method.targets=q_prj,v_prj")
    assert_one_line_error(r, "method.targets='q_prj,v_prj' matches no module",
                          "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj")
    assert checksums(wd) == before
    r = cli(wd, "--config.method.targets=q_proj,v_prj")  # one typo: LoRA on q_proj only, quietly
    assert_one_line_error(r, "method.targets='q_proj,v_prj': 'v_prj' names no module")
    assert checksums(wd) == before


# ---------------------------------------------------------------------------------------------
# 6. A missing base weight.


def test_missing_untied_lm_head_is_an_error(tmp_path):
    """Was: exit 0 with a random, frozen output layer."""
    d = tiny_hf_model(tmp_path / "base", tie_word_embeddings=False)
    tensors = load_file(str(d / "model.safetensors"))
    assert "lm_head.weight" in tensors
    del tensors["lm_head.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    wd = tmp_path / "run"
    r = cli(wd, f"--config.model.path={d}")
    assert_one_line_error(r, f"{d}: the checkpoint has no lm_head.weight", "tie_word_embeddings=false")
    assert checksums(wd) == {}


# ---------------------------------------------------------------------------------------------
# Bad input that ended in a traceback.


@pytest.mark.parametrize("rope,message", [
    ({"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [2.0] * 3,  # a factor per frequency short
      "original_max_position_embeddings": 32}, ("rope_type 'longrope': long_factor and short_factor have 3 and 3 "
                                                "values: expected",)),
    ({"rope_type": "proportional", "factor": 2.0}, ("rope_type 'proportional' is not supported", "expected one of default")),
])
def test_unsupported_rope_type_is_one_line(tmp_path, rope, message):
    """Was: a ValueError traceback from inside the traced model."""
    d = tiny_hf_model(tmp_path / "base")
    config = json.loads((d / "config.json").read_text())
    config["rope_parameters"] = {**rope, "rope_theta": 10000.0}
    (d / "config.json").write_text(json.dumps(config))
    wd = tmp_path / "run"
    r = cli(wd, f"--config.model.path={d}")
    assert_one_line_error(r, *message)
    assert checksums(wd) == {}


UNREACHABLE = {"HF_ENDPOINT": "http://127.0.0.1:9"}  # the discard port: refused at once, no network needed


@pytest.mark.parametrize("overrides,env,fragment", [
    (["--config.model.path=nobody/no-such-model"], UNREACHABLE, "model.path 'nobody/no-such-model'"),
    (["--config.model.path=nobody/no-such-model"], {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE=1"),
    (["--config.data.name=nobody/no-such-dataset"], UNREACHABLE, "data.name 'nobody/no-such-dataset'"),
], ids=["model-no-network", "model-hf-hub-offline", "dataset-no-network"])
def test_unreachable_hub_name_is_one_line_at_once(tmp_path, overrides, env, fragment):
    """Was: 26 s of retries and 23 lines for the dataset, a two-line message for the model."""
    wd = tmp_path / "run"
    t0 = time.time()
    r = cli(wd, *overrides, config="configs/lora.py", env={"HF_HOME": str(tmp_path / "hf"), **env})
    assert time.time() - t0 < 20  # start-up included; retries took 26 s
    assert_one_line_error(r, fragment, "the hub cannot be reached")
    assert checksums(wd) == {}


def no_bos_tokenizer(directory) -> Path:
    """A tiny HF tokenizer with an EOS and no BOS token, as Qwen2's."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for t, _ in sst2_rows("train", 400) + sst2_rows("dev", 100) for w in t.split()})
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words[:500])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>", unk_token="<unk>")
    assert fast.bos_token is None and fast.bos_token_id is None
    fast.save_pretrained(directory)
    return Path(directory)


def test_tokenizer_without_bos_trains(tmp_path):
    """Was: TypeError (None in the token list). Now: no BOS, EOS at the end, and the run trains."""
    from jaxft.data import tasks
    from jaxft.data.sources import Records
    from jaxft.tokenizer import Tokenizer

    tok_dir = no_bos_tokenizer(tmp_path / "tok")
    tok = Tokenizer(tok_dir)
    assert tok.bos_id is None and tok.eos_id == 0
    arrays, _ = tasks.classification(Records([{"text": "a charming journey", "label": 1}], ["x:1"]), tok, 8, "text",
                                     "label", [0, 1])
    expected = tok.encode("a charming journey") + [0]
    assert arrays["input_ids"][0, : len(expected)].tolist() == expected and arrays["attention_mask"][0].sum() == 4

    base = tiny_hf_model(tmp_path / "qwen", "Qwen2ForCausalLM", "Qwen2Config", vocab=512, eos_token_id=0,
                         bos_token_id=None, pad_token_id=0)
    data = write_csv(tmp_path / "train.csv", ["text", "label"], sst2_rows("train", 64))
    wd = tmp_path / "run"
    r = cli(wd, f"--config.model.path={base}", f"--config.model.tokenizer={tok_dir}", f"--config.data.name={data}",
            "--config.data.seq_len=32", "--config.data.length_buckets=False", "--config.train.steps=2",
            "--config.method.name=lora")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (wd / "export" / "adapter_config.json").exists()


# ---------------------------------------------------------------------------------------------
# 7. Label names, 8. adapters that point somewhere.

LABELS = {0: "negative", 1: "positive"}


@pytest.fixture(scope="module")
def named_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("named")
    train = write_csv(d / "train.csv", ["text", "label"], [(t, LABELS[y]) for t, y in sst2_rows("train", 256)])
    dev = write_csv(d / "dev.csv", ["text", "label"], [(t, LABELS[y]) for t, y in sst2_rows("dev", 96)])
    return train, dev


def run_named(workdir, named_data, *overrides, steps=30):
    train, dev = named_data
    r = cli(workdir, f"--config.data.name={train}", f"--config.data.eval_name={dev}", f"--config.train.steps={steps}",
            "--config.train.log_every_steps=10", "--config.checkpoint.every_steps=0", "--config.model.pooling=last",
            *overrides, config="configs/lora.py")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return r, [row for row in rows if "eval/loss" in row][-1]


def test_full_export_keeps_label_names_and_eval_reports_each_class(tmp_path, named_data):
    from jaxft import hf
    from jaxft.data import sources, tasks
    from jaxft.tokenizer import Tokenizer

    # A 32-wide random Llama (tied embeddings, as jaxft-tiny's) with jaxft-tiny's tokenizer: its 30 steps of
    # full fine-tuning take seconds (jaxft-tiny's took half a minute) and predict both classes (0.66 accuracy).
    base = tiny_hf_model(tmp_path / "base", vocab=4096, tie_word_embeddings=True)
    r, metrics = run_named(tmp_path, named_data, "--config.method.name=full", "--config.optimizer.learning_rate=1e-3",
                           f"--config.model.path={base}", f"--config.model.tokenizer={TINY_TOKENIZER}")
    assert "new classification head score/kernel" in r.stdout  # the head the config creates, named at start-up
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}
    assert transformers.AutoConfig.from_pretrained(tmp_path / "export").id2label == {0: "negative", 1: "positive"}

    # Per-class figures against a confusion matrix computed here from the exported model's predictions.
    model, params = hf.load(str(tmp_path / "export"))
    assert model.cfg.labels == ("negative", "positive")
    dev = sources.read_file(named_data[1])
    arrays, _ = tasks.classification(dev, Tokenizer(tmp_path / "export"), 64, "text", "label", ["negative", "positive"])
    logits = np.asarray(model.apply({"params": params}, arrays["input_ids"], arrays["attention_mask"]))
    pred, true = logits.argmax(-1), arrays["labels"]
    assert 0 < (pred == 1).sum() < len(pred)  # both classes predicted: the figures are not degenerate
    for k, name in LABELS.items():
        tp = np.sum((pred == k) & (true == k))
        fp, fn = np.sum((pred == k) & (true != k)), np.sum((pred != k) & (true == k))
        precision, recall = tp / (tp + fp), tp / (tp + fn)
        assert metrics[f"eval/precision/{name}"] == pytest.approx(precision, abs=1e-9)
        assert metrics[f"eval/recall/{name}"] == pytest.approx(recall, abs=1e-9)
        assert metrics[f"eval/f1/{name}"] == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-9)
    assert metrics["eval/accuracy"] == pytest.approx(np.mean(pred == true), abs=1e-6)


def test_adapter_names_a_loadable_base_and_keeps_label_names(tmp_path, named_data):
    from peft import PeftModel

    from jaxft import hf

    # A trained adapter; no accuracy asked: two short steps, one row length, a few eval rows.
    run_named(tmp_path, named_data, "--config.method.name=lora", NO_WARMUP, "--config.train.batch_size=8",
              "--config.data.seq_len=32", "--config.data.length_buckets=False", "--config.data.max_eval_examples=16",
              steps=2)
    export = tmp_path / "export"
    from safetensors.numpy import load_file

    assert any(np.abs(v).max() > 0 for k, v in load_file(str(export / "adapter_model.safetensors")).items()
               if "lora_B" in k)  # B starts at zero: the logits below compare a trained adapter
    config = json.loads((export / "adapter_config.json").read_text())
    base = config["base_model_name_or_path"]
    assert Path(base).is_absolute() and Path(base) == TINY_TOKENIZER.resolve()
    assert config["id2label"] == {"0": "negative", "1": "positive"}

    # What a PEFT user does: the base by the adapter's own reference, the labels from its config.
    id2label = {int(k): v for k, v in config["id2label"].items()}
    torch_base = transformers.AutoModelForSequenceClassification.from_pretrained(base, id2label=id2label)
    peft_model = PeftModel.from_pretrained(torch_base, export).eval()

    model, params = hf.load(base, adapter=str(export))
    assert model.cfg.labels == ("negative", "positive")
    ids = np.array([[1, 45, 300, 12, 7, 2], [1, 99, 2, 3, 3, 3]], np.int32)
    mask = (np.arange(6)[None] < np.array([[6], [3]])).astype(np.int32)
    ours = np.asarray(model.apply({"params": params}, ids, mask))
    with torch.no_grad():
        ref = peft_model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
    ref = ref.numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_missing_pair_field_names_file_and_line_via_the_cli(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"premise": "a cat sat", "hypothesis": "a cat", "label": "yes"}\n'
                    '{"premise": "a dog ran", "hypothesis": "a dog", "label": "no"}\n'
                    '{"premise": "a bird", "hypo": "a bird flew", "label": "yes"}\n')
    wd = tmp_path / "run"
    r = cli(wd, f"--config.data.name={data}", "--config.data.text_field=premise",
            "--config.data.text_pair_field=hypothesis", "--config.train.steps=2", NO_WARMUP, config="configs/lora.py")
    assert_one_line_error(r, f"{data}:3:", "missing field 'hypothesis'", "premise, hypo, label")
    assert checksums(wd) == {}


# ---------------------------------------------------------------------------------------------
# Found by the input audit: each used to exit 0 with a wrong result, or to end in a traceback.


@pytest.mark.parametrize("key,value", [("method.dropout", "1.5"), ("method.dropout", "-0.1"),
                                       ("method.prompt_dropout", "1.0"), ("method.encoder_dropout", "2")])
def test_dropout_outside_0_1_is_an_error(tmp_path, key, value):
    """Was: exit 0 (a rate of 1.5 scales the kept activations by -2)."""
    wd = tmp_path / "run"
    r = cli(wd, f"--config.{key}={value}")
    assert_one_line_error(r, f"{key}={float(value)}", "expected a probability, 0 <= p < 1")
    assert checksums(wd) == {}


def test_workdir_or_export_dir_that_is_a_file_is_an_error(tmp_path):
    """Was: a FileExistsError traceback (workdir), or a traceback after training (export.dir)."""
    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    r = cli(afile)
    assert_one_line_error(r, f"workdir={afile}", "is a file, expected a directory")
    r = cli(afile / "run")
    assert_one_line_error(r, f"workdir={afile / 'run'}", f"{afile} is a file")
    wd = tmp_path / "run"
    r = cli(wd, f"--config.export.dir={afile}")
    assert_one_line_error(r, f"export.dir={afile}", "is a file, expected a directory")
    assert checksums(wd) == {} and afile.read_text() == "keep me\n"


@pytest.mark.parametrize("overrides,culprit", [
    (["--config.method.name=full+lora"], "method.name='full+lora' trains the base weight"),
    (["--config.method.name=lora", "--config.method.trainable_pattern=q_proj"],
     "trains the base weight layers/self_attn/q_proj/kernel inside layers/self_attn/q_proj"),
])
def test_base_weights_an_adapter_export_cannot_hold_are_an_error(tmp_path, overrides, culprit):
    """Was: exit 0, base weights trained, and an adapter export without them (what they learned lost).
    Base weights outside the method's modules export as PEFT modules_to_save (tests/test_peft.py); those
    inside a module the method changes have no PEFT form."""
    wd = tmp_path / "run"
    r = cli(wd, *overrides)
    assert_one_line_error(r, culprit, "a HF PEFT adapter cannot hold both", "export.enabled=False")
    assert checksums(wd) == {}
    r = cli(wd, *overrides, "--config.export.enabled=False", "--config.train.steps=2")  # no export: nothing lost
    assert r.returncode == 0, r.stderr[-3000:]


def test_base_weights_outside_the_methods_modules_export_with_the_adapter(tmp_path):
    r = cli(tmp_path, "--config.method.trainable_pattern=^norm/", "--config.train.steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.norm"]


def test_one_class_training_data_is_an_error(tmp_path):
    """Was: exit 0, a one-way softmax (loss 0 from the first step: nothing learns) exported as a classifier."""
    data = write_csv(tmp_path / "train.csv", ["text", "label"], [(t, "pos") for t, _ in sst2_rows("train", 40)])
    wd = tmp_path / "run"
    r = cli(wd, f"--config.data.name={data}", "--config.train.steps=2", NO_WARMUP, config="configs/lora.py")
    assert_one_line_error(r, f"{data}:2:", "label 'label' = 'pos'", "expected at least 2 classes")
    assert checksums(wd) == {}


def edited_config(directory, **changes) -> Path:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))
    return directory


def test_bad_model_files_are_one_line(tmp_path):
    """Each was a traceback (a reshape inside the model, np.stack, json.loads, sentencepiece), or, for a NaN
    weight, a stop at step 1 blamed on the learning rate after the workdir was made."""
    wd = tmp_path / "run"
    heads = edited_config(tiny_hf_model(tmp_path / "heads"), num_attention_heads=3)
    r = cli(wd, f"--config.model.path={heads}")
    assert_one_line_error(r, f"{heads / 'config.json'}", "num_attention_heads=3, num_key_value_heads=2",
                          "a multiple of the key/value heads")

    odd = tiny_hf_model(tmp_path / "odd")
    tensors = load_file(str(odd / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:32]
    save_file(tensors, str(odd / "model.safetensors"), metadata={"format": "pt"})
    r = cli(wd, f"--config.model.path={odd}")
    assert_one_line_error(r, f"{odd}: mlp.up_proj.kernel differs between layers", "layer 1: (32, 32)")

    nan = tiny_hf_model(tmp_path / "nan")
    tensors = load_file(str(nan / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"][3, 1] = np.inf
    save_file(tensors, str(nan / "model.safetensors"), metadata={"format": "pt"})
    r = cli(wd, f"--config.model.path={nan}")
    assert_one_line_error(r, f"{nan / 'model.safetensors'}: tensor model.layers.0.self_attn.k_proj.weight holds NaN "
                             "or Inf")

    index = tiny_hf_model(tmp_path / "index")
    (index / "model.safetensors").unlink()
    (index / "model.safetensors.index.json").write_text('{"metadata": {}}')
    r = cli(wd, f"--config.model.path={index}")
    assert_one_line_error(r, f"{index / 'model.safetensors.index.json'}: expected JSON with a \"weight_map\"")

    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.model").write_bytes(b"not a protobuf")
    r = cli(wd, f"--config.model.tokenizer={tok}", "--config.train.steps=2", NO_WARMUP, config="configs/lora.py")
    assert_one_line_error(r, f"{tok / 'tokenizer.model'}: not a SentencePiece model")
    assert checksums(wd) == {}


def test_lora_adapter_of_a_deeper_model_names_the_layer_counts(tmp_path):
    """Was: "LoRA on layers.self_attn.q_proj covers only some layers (not supported)" for an adapter
    made for another base model (here 4 layers, the base has 2)."""
    from jaxft import hf
    from jaxft.errors import JaxftError

    base = tiny_hf_model(tmp_path / "base")
    adapter = lora_adapter(tmp_path / "adapter", layers=4, widths={"q_proj": 32}, r=2, alpha=4)
    with pytest.raises(JaxftError, match=r"has weights for 4 layers \(0, 1, 2, 3\), the model has 2 \(0-1\).*"
                                         r"an adapter of another base model"):
        hf.load(str(base), adapter=str(adapter))


@pytest.mark.parametrize("key,value,expected", [
    ("b1", "1.5", "0 <= b1 < 1"), ("b2", "1.0", "0 <= b2 < 1"), ("eps", "-1.0", ">= 0"),
    ("weight_decay", "-0.1", ">= 0"), ("grad_clip", "-1.0", ">= 0"), ("end_lr_fraction", "-0.5", ">= 0"),
    ("learning_rate", "nan", ">= 0"),
])
def test_impossible_optimizer_settings_are_errors(tmp_path, key, value, expected):
    """Was: exit 0 (Adam with b1 >= 1 divides by a negative bias correction; a negative eps or weight decay,
    a NaN learning rate)."""
    wd = tmp_path / "run"
    r = cli(wd, f"--config.optimizer.{key}={value}")
    assert_one_line_error(r, f"optimizer.{key}={float(value)}", f"expected {expected}")
    assert checksums(wd) == {}


def test_bad_lr_multipliers_are_errors(tmp_path):
    """A rule that does not parse, or matches no trainable leaf (a typo would train all at the plain rate)."""
    from jaxft.errors import JaxftError
    from jaxft.step import lr_multipliers

    for value, expected in (("lora_b", "expected regex=factor"), ("lora_b=fast", "expected regex=factor"),
                            ("lora_b=0", "a positive factor"), ("(=2", "expected regex=factor")):
        with pytest.raises(JaxftError, match=re.escape(f"optimizer.lr_multipliers={value!r}: {value!r}: ") + ".*"
                           + re.escape(expected)):
            lr_multipliers(value)
    assert [(r.pattern, f) for r, f in lr_multipliers(" lora_b=16, critic=0.1,")] == [("lora_b", 16.0), ("critic", 0.1)]
    for value, expected in (("lora_b=0", "'lora_b=0': 'lora_b=0': expected regex=factor with a regex and a positive"),
                            ("lora_bb=16", "optimizer.lr_multipliers: 'lora_bb' matches no trainable parameter (they "
                                           "are e.g. ")):
        wd = tmp_path / "run"
        r = cli(wd, f"--config.optimizer.lr_multipliers={value}")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and expected in r.stderr, r.stderr
        assert checksums(wd) == {}


@pytest.mark.parametrize("overrides,fragment", [
    (["--config.data.task=cloze"], "data.task='cloze': data.name='synthetic' with data.synthetic_labels=0 is causal_lm"),
    (["--config.data.task=classification"], "is causal_lm (expected data.task='causal_lm' or empty)"),
    (["--config.data.synthetic_labels=1"], "data.synthetic_labels=1: expected 0 (a causal LM) or at least 2"),
    (["--config.data.synthetic_labels=-2"], "data.synthetic_labels=-2"),
])
def test_synthetic_data_with_another_task_is_an_error(tmp_path, overrides, fragment):
    """Was: data.task ignored (exit 0, a causal LM trained and exported), one class trained, or a traceback."""
    wd = tmp_path / "run"
    r = cli(wd, *overrides)
    assert_one_line_error(r, fragment)
    assert checksums(wd) == {}


@pytest.mark.parametrize("model_type,seq_len,fragment", [
    ("gpt2", 1100, "1100 positions (0 prefix + 1100 tokens) exceed the model's n_positions=1024"),
    ("bert", 520, "need position 519, past the model's max_position_embeddings=512 (lower data.seq_len)"),
])
def test_rows_longer_than_the_position_table_stop_before_anything_is_written(tmp_path, model_type, seq_len, fragment):
    """Was: GPT-2's one-line error only once the first step compiled, with the workdir already written;
    BERT: a NaN loss at step 1 blamed on the learning rate (positions past the table read NaN)."""
    wd = tmp_path / "run"
    r = cli(wd, f"--config.model.init.model_type={model_type}", f"--config.data.seq_len={seq_len}",
            "--config.data.synthetic_labels=2", "--config.data.synthetic_examples=16", "--config.train.steps=1")
    assert_one_line_error(r, fragment)
    assert checksums(wd) == {}


def test_csv_header_naming_a_column_twice_is_an_error(tmp_path):
    """Was: exit 0, each row keeping the last of the two columns."""
    data = write_csv(tmp_path / "d.csv", ["text", "text", "label"], [(t, "x", y) for t, y in sst2_rows("train", 40)])
    wd = tmp_path / "run"
    r = cli(wd, f"--config.data.name={data}", "--config.train.steps=2", NO_WARMUP, config="configs/lora.py")
    assert_one_line_error(r, f"{data}:1: column 'text' appears twice in the header (text, text, label)")
    assert checksums(wd) == {}


@pytest.mark.parametrize("bad,fragment", [("", "label field 'label' is empty, expected a label"),
                                          ("pos ", "label 'pos ' differs from 'pos' only in white space")])
def test_empty_or_white_space_variant_label_is_an_error(tmp_path, bad, fragment):
    """Was: exit 0 with a third class ('' or 'pos ') next to 'neg' and 'pos'."""
    rows = [(t, LABELS[y][:3]) for t, y in sst2_rows("train", 40)]
    k = next(i for i, (_, y) in enumerate(rows) if y == "pos" and i > 5)
    rows[k] = (rows[k][0], bad)
    data = write_csv(tmp_path / "d.csv", ["text", "label"], rows)
    wd = tmp_path / "run"
    r = cli(wd, f"--config.data.name={data}", "--config.train.steps=2", NO_WARMUP, config="configs/lora.py")
    assert_one_line_error(r, f"{data}:{k + 2}:", fragment)
    assert checksums(wd) == {}


@pytest.fixture(scope="module")
def pos_neg_run(tmp_path_factory):
    """One short LoRA run on 40 records labelled pos / neg, data.labels='pos,neg', the last 8 held out for
    evaluation (one row length): test_data_labels_declare_the_class_order and
    test_eval_holdout_applies_to_classification."""
    d = tmp_path_factory.mktemp("pos_neg")
    train = write_csv(d / "train.csv", ["text", "label"],
                      [(t, "pos" if y else "neg") for t, y in sst2_rows("train", 40)])
    wd = d / "run"
    r = cli(wd, f"--config.data.name={train}", "--config.data.labels=pos,neg", "--config.data.eval_holdout=8",
            "--config.train.steps=2", NO_WARMUP, "--config.train.batch_size=8", "--config.eval.every_steps=0",
            "--config.checkpoint.every_steps=0", "--config.data.seq_len=32", "--config.data.length_buckets=False",
            config="configs/lora.py")
    assert r.returncode == 0, r.stderr[-3000:]
    return wd


def test_eval_holdout_applies_to_classification(tmp_path, pos_neg_run):
    """Was: data.eval_holdout ignored for classification data (exit 0, no evaluation; 10**5 of 40 records
    accepted)."""
    data = write_csv(tmp_path / "d.csv", ["text", "label"], sst2_rows("train", 40))
    wd = tmp_path / "run"
    r = cli(wd, f"--config.data.name={data}", "--config.data.eval_holdout=100000", config="configs/lora.py")
    assert_one_line_error(r, "data.eval_holdout=100000: the source has only 40 records")
    assert checksums(wd) == {}
    rows = [json.loads(line) for line in (pos_neg_run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/accuracy" in row for row in rows)


def test_corrupt_only_checkpoint_is_one_clean_line_and_touches_nothing(tmp_path):
    """Was: the line ended in TensorStore's repr ("See full TensorStore details: <bound method
    pybind11_detail_function_record_v1_...spec of TensorStore({)")."""
    wd = tmp_path / "run"
    assert cli(wd, "--config.train.steps=4", "--config.checkpoint.every_steps=4").returncode == 0
    chunks = [p for p in (wd / "checkpoints" / "4" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert chunks
    for p in chunks:
        p.write_bytes(p.read_bytes()[:50])
    before = checksums(wd)
    for _ in range(3):  # the "Event loop is closed" tracebacks came in about half of the runs
        r = cli(wd, "--config.train.steps=6", "--config.checkpoint.every_steps=4")
        assert_one_line_error(r, f"{wd / 'checkpoints' / '4'}: cannot restore this checkpoint", "no older checkpoint")
        assert "TensorStore" not in r.stderr
    assert checksums(wd) == before


# ---------------------------------------------------------------------------------------------
# Found by the second input audit.


@pytest.mark.parametrize("key,value,expected", [
    ("train.seed", "-1", "expected zero or a positive integer"),  # was a numpy traceback
    ("method.alpha", "nan", "expected a positive number"),  # was a NaN at step 1, blamed on the learning rate
    ("method.alpha", "0", "expected a positive number"),  # was exit 0: LoRA's scale 0, nothing learned
    ("method.init_std", "nan", "expected a standard deviation, >= 0"),
])
def test_impossible_run_settings_are_errors(tmp_path, key, value, expected):
    wd = tmp_path / "run"
    r = cli(wd, f"--config.{key}={value}")
    assert_one_line_error(r, f"{key}=", expected)
    assert checksums(wd) == {}


def test_malformed_config_json_is_one_line(tmp_path):
    """Was: an AttributeError traceback (a JSON list), a TypeError from inside the model's init (a string size)."""
    wd = tmp_path / "run"
    listed = tiny_hf_model(tmp_path / "listed")
    (listed / "config.json").write_text("[1, 2]")
    r = cli(wd, f"--config.model.path={listed}")
    assert_one_line_error(r, f"{listed / 'config.json'}: expected a JSON object of config keys, got a list")
    quoted = edited_config(tiny_hf_model(tmp_path / "quoted"), hidden_size="32")
    r = cli(wd, f"--config.model.path={quoted}")
    assert_one_line_error(r, f"{quoted / 'config.json'}: hidden_size='32': expected an integer >= 1")
    assert checksums(wd) == {}


def test_generate_with_a_wrongly_shaped_weight_is_one_line(tmp_path):
    """Was: a flax ScopeParamShapeError traceback (hf.load checked that each weight is there, not its shape)."""
    d = tiny_hf_model(tmp_path / "base", tie_word_embeddings=False)
    tensors = load_file(str(d / "model.safetensors"))
    for i in range(2):  # the same in every layer: the stacking does not notice
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = tensors[f"model.layers.{i}.mlp.up_proj.weight"][:48].copy()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    r = python_m("jaxft.generate", f"--model={d}", "--prompt=hi", f"--tokenizer={TINY_TOKENIZER}", "--max_new_tokens=2",
                 env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert_one_line_error(r, f"{d}: layers/mlp/up_proj/kernel has shape (2, 32, 48), the model expects (2, 32, 64)")


def test_ptuning_v2_projection_of_width_0_is_an_error(tmp_path):
    """Was: a ZeroDivisionError traceback (prefix_tuning's same MLP already checked its width)."""
    wd = tmp_path / "run"
    r = cli(wd, "--config.method.name=ptuning_v2", "--config.method.projection=True",
            "--config.method.projection_hidden=0")
    assert_one_line_error(r, "method.projection_hidden=0: expected a positive integer")
    assert checksums(wd) == {}


def test_data_weights_of_a_single_source_is_an_error(tmp_path):
    """Was: exit 0, data.weights ignored (synthetic ids, classification data)."""
    wd = tmp_path / "run"
    r = cli(wd, "--config.data.weights=0.7,0.3")
    assert_one_line_error(r, "data.weights='0.7,0.3': weights sample the sources of data.name='a+b'",
                          "data.name='synthetic' names one source")
    assert checksums(wd) == {}


def test_json_file_holding_one_object_names_its_keys(tmp_path):
    """Was: "dict.json:1: invalid JSON (Expecting property name enclosed in double quotes)" for a valid JSON
    file whose records sit under a key (as many dataset dumps are)."""
    from jaxft.data import sources
    from jaxft.errors import JaxftError

    data = tmp_path / "dict.json"
    data.write_text(json.dumps({"version": 1, "data": [{"text": "good", "label": 1}]}, indent=1))
    with pytest.raises(JaxftError, match=r"dict.json: one JSON object \(keys: version, data\), expected a list of "
                                         r"records \[\{\.\.\.\}, \.\.\.\] or one record a line"):
        sources.read_file(data)
    broken = tmp_path / "broken.json"
    broken.write_text('{"text": "good", "label": 1}\n{"text": "bad"\n')
    with pytest.raises(JaxftError, match=r"broken.json:2: invalid JSON"):
        sources.read_file(broken)


def test_eval_name_replaces_a_bundled_sets_eval_split(tmp_path):
    """Was: data.eval_name ignored next to a bundled data.name (exit 0, evaluated on the bundled dev split;
    for adgen, which has none, jaxft.evaluate's own advice to set data.eval_name changed nothing)."""
    import ml_collections

    from jaxft.data import sources
    from jaxft.errors import JaxftError

    dev = write_csv(tmp_path / "dev.csv", ["sentence", "label"], sst2_rows("dev", 5))
    cfg = ml_collections.ConfigDict({"name": "sst2", "eval_name": str(dev), "text_field": "", "label_field": ""})
    train, ev, text_field, label_field = sources.resolve(cfg)
    assert len(train.rows) > 60000 and (text_field, label_field) == ("sentence", "label")
    assert len(ev.rows) == 5 and ev.where[0] == f"{dev}:2"
    cfg.eval_name = str(tmp_path / "none.txt")
    for name in ("sst2", "e2e_nlg"):  # e2e_nlg's own reader: its format, and a missing file is one line too
        cfg.name = name
        with pytest.raises(JaxftError, match="none.txt': not found"):
            sources.resolve(cfg)


@pytest.mark.parametrize("flag", ["--top_k=5", "--top_p=0.9"])
def test_generate_sampling_settings_without_a_temperature_are_an_error(flag):
    """Was: exit 0 with the greedy completion, --top_k / --top_p ignored (transformers warns; nothing here did)."""
    r = python_m("jaxft.generate", "--model=jaxft-tiny", "--prompt=the movie was", flag,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert_one_line_error(r, flag, "--temperature=0 decodes greedily: expected --temperature > 0 with them")


def test_preference_pairs_that_prefer_nothing_are_an_error(tmp_path):
    """Was: exit 0, DPO's loss log 2 and its gradient 0 from the first step (chosen == rejected in every pair)."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}", "chosen": "the same answer",
                                        "rejected": "the same answer"}) + "\n" for i in range(48)))
    wd = tmp_path / "run"
    r = cli(wd, f"--config.data.name={data}", "--config.data.weights=", "--config.data.cache_dir=none",
            "--config.data.seq_len=32", "--config.data.eval_holdout=8", "--config.train.steps=2", NO_WARMUP,
            config="configs/dpo_lora.py")
    assert_one_line_error(r, "data source 'pairs': in every training pair the chosen and rejected answers are the "
                             "same tokens (after truncation to data.seq_len=32)")
    assert checksums(wd) == {}


def test_export_into_the_base_models_directory_is_an_error(tmp_path):
    """Was: exit 0 with the base's config.json and model.safetensors deleted (an export first clears its
    directory of model files) and an adapter left in their place that names that directory as its base."""
    d = tiny_hf_model(tmp_path / "base", tie_word_embeddings=False)
    before = checksums(d)
    wd = tmp_path / "run"
    r = cli(wd, f"--config.model.path={d}", f"--config.export.dir={d}", "--config.train.steps=2")
    assert_one_line_error(r, f"export.dir={d}: the directory of model.path='{d}'", "expected another directory")
    assert checksums(d) == before and checksums(wd) == {}


def test_chat_template_that_leaves_out_the_messages_is_an_error(tmp_path):
    """Was: exit 0, every example trained on the template's own text ('hellohello'), the records unread."""
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}hello{% endfor %}")
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"instruction": t, "output": "yes" if y else "no"}) + "\n"
                            for t, y in sst2_rows("train", 40)))
    wd = tmp_path / "run"
    r = cli(wd, f"--config.data.name={data}", f"--config.data.chat_template={template}", "--config.data.weights=",
            "--config.data.eval_holdout=0", "--config.data.cache_dir=none", "--config.train.steps=2", NO_WARMUP,
            config="configs/sft_alpaca.py")
    assert_one_line_error(r, f"chat template {template}: a user message's content is not in what it renders "
                             "('hellohello'...)", "expected a template that writes each message's content")
    assert checksums(wd) == {}


def test_undecodable_or_truncated_side_files_are_one_line(tmp_path):
    """Was: a UnicodeDecodeError traceback for a config.json, chat template or E2E file with bytes that are
    not UTF-8, and a SafetensorError traceback for a truncated adapter_model.safetensors."""
    from jaxft.data import sft, sources
    from jaxft.errors import JaxftError

    wd = tmp_path / "run"
    d = tiny_hf_model(tmp_path / "base")
    (d / "config.json").write_bytes((d / "config.json").read_bytes().replace(b'"llama"', b'"llama", "x": "caf\xe9"'))
    r = cli(wd, f"--config.model.path={d}")
    assert_one_line_error(r, f"{d / 'config.json'}: not UTF-8 text (invalid continuation byte at byte")
    assert checksums(wd) == {}

    template = tmp_path / "t.jinja"
    template.write_bytes(b"{{ caf\xe9 }}")
    with pytest.raises(JaxftError, match=r"t.jinja: not UTF-8 text \(invalid continuation byte at byte 6\)"):
        sft.chat_template(None, str(template))
    e2e = tmp_path / "e2e.txt"
    e2e.write_bytes(b"name[a]||A.\nname[b]||caf\xe9\n")
    with pytest.raises(JaxftError, match=r"e2e.txt:2: not UTF-8 text"):
        sources.read_e2e(e2e)

    d = tiny_hf_model(tmp_path / "base2")
    # a LoRA adapter of d as a run exports it (q_proj and v_proj of both layers)
    export = lora_adapter(tmp_path / "export", layers=2, widths={"q_proj": 32, "v_proj": 16}, r=4, alpha=16, base=d)
    adapter = export / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    r = python_m("jaxft.generate", f"--model={d}", f"--adapter={export}", "--prompt=hi", f"--tokenizer={TINY_TOKENIZER}",
                 env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert_one_line_error(r, f"{adapter}: unreadable safetensors file")


def test_workdir_that_cannot_be_created_is_one_line(tmp_path, monkeypatch):
    """Was: a FileNotFoundError / PermissionError traceback from workdir.mkdir, once the model was loaded and
    the data tokenized (a read-only directory, or a file system such as /proc that takes no new directory)."""
    from jaxft import storage
    from jaxft.errors import JaxftError

    r = cli("/proc/jaxft-no-such-dir/run")
    assert_one_line_error(r, "workdir=/proc/jaxft-no-such-dir/run: cannot be created (No such file or directory)")
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and Path(p) != locked)  # as a user sees 0o555
    with pytest.raises(JaxftError, match=f"workdir={locked / 'run'}: {locked} is not writable"):
        storage.check_writable_dir(storage.path(str(locked / "run")), "workdir")


def test_empty_eval_file_is_an_error(tmp_path):
    """Was: the whole run trained and checkpointed, then a KeyError traceback at the final eval (no export)."""
    train = write_csv(tmp_path / "train.csv", ["text", "label"], sst2_rows("train", 40))
    dev = tmp_path / "dev.jsonl"
    dev.write_text("\n")
    wd = tmp_path / "run"
    r = cli(wd, f"--config.data.name={train}", f"--config.data.eval_name={dev}", "--config.train.steps=2", NO_WARMUP,
            config="configs/lora.py")
    assert_one_line_error(r, f"data.eval_name='{dev}': no eval examples")
    assert checksums(wd) == {}


def test_cloze_verbalizer_with_one_word_for_two_labels_is_an_error(tmp_path):
    """Was: exit 0 with train/accuracy=1.0 and eval/accuracy=1.0 (the tie of two equal scores), loss log 2
    and no gradient: the model cannot tell the two classes apart."""
    wd = tmp_path / "run"
    r = cli(wd, "--config.data.verbalizer=good,good", "--config.train.steps=2", NO_WARMUP, config="configs/pet_bert.py")
    assert_one_line_error(r, "data.verbalizer='good,good': labels 0 and 1 have the same word (['good'])",
                          "expected a different word per label")
    assert checksums(wd) == {}


def test_warmup_longer_than_the_run_is_said(tmp_path):
    """Was: silent. A config cut short for a try (its warmup longer than the run) trains, and the start-up
    log says the learning rate never reaches its peak: the logged rates show it (0.8 of it at step 8)."""
    wd = tmp_path / "run"
    r = cli(wd, "--config.train.steps=8", "--config.optimizer.warmup_steps=10", "--config.train.log_every_steps=1",
            "--config.export.enabled=False")
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("note: optimizer.warmup_steps=10 is more than train.steps=8: the learning rate rises to 0.8 of "
            "optimizer.learning_rate=0.01 and never decays") in r.stdout
    rates = [json.loads(line).get("train/learning_rate") for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert max(x for x in rates if x is not None) == pytest.approx(0.01 * 7 / 10)  # step 8 ran at step index 7
    r = cli(tmp_path / "full", "--config.train.steps=8", "--config.optimizer.warmup_steps=8",
            "--config.export.enabled=False")
    assert r.returncode == 0 and "warmup_steps" not in r.stdout


def test_warmup_steps_bounds():
    from jaxft.config import base_config, validate
    from jaxft.errors import JaxftError

    c = base_config()
    c.model.init = {"model_type": "llama"}
    c.optimizer.warmup_steps = -1
    with pytest.raises(JaxftError, match=r"^optimizer.warmup_steps=-1: expected zero or a positive integer$"):
        validate(c)


@pytest.mark.parametrize("stray_in", ["train", "eval"])
def test_a_label_outside_data_labels_is_an_error(tmp_path, stray_in):
    """Was: a stray "2" in a binary set became a third class (a 3-way head, exit 0). With data.labels
    declared, it is one line naming the file, line and value, before anything is written."""
    train, dev = sst2_rows("train", 40), sst2_rows("dev", 16)
    (train if stray_in == "train" else dev)[6] = ("a stray label", 2)  # line 8: the header is line 1
    train = write_csv(tmp_path / "train.csv", ["text", "label"], train)
    dev = write_csv(tmp_path / "dev.csv", ["text", "label"], dev)
    wd = tmp_path / "run"
    r = cli(wd, f"--config.data.name={train}", f"--config.data.eval_name={dev}", "--config.data.labels=0,1",
            "--config.train.steps=2", NO_WARMUP, config="configs/lora.py")
    where = train if stray_in == "train" else dev
    assert_one_line_error(r, f"error: {where}:8: label 2 is not one of data.labels: expected one of [0, 1]")
    assert checksums(wd) == {}


def test_an_eval_label_never_trained_on_is_an_error(tmp_path):
    """Labels inferred from the training set: an eval label it lacks is a class the model can never predict."""
    named = lambda rows: [(t, "pos" if y else "neg") for t, y in rows]  # noqa: E731
    dev = named(sst2_rows("dev", 16))
    dev[3] = ("neither here nor there", "neutral")
    train = write_csv(tmp_path / "train.csv", ["text", "label"], named(sst2_rows("train", 40)))
    dev = write_csv(tmp_path / "dev.csv", ["text", "label"], dev)
    wd = tmp_path / "run"
    r = cli(wd, f"--config.data.name={train}", f"--config.data.eval_name={dev}", "--config.train.steps=2", NO_WARMUP,
            config="configs/lora.py")
    assert_one_line_error(r, f"error: {dev}:5: label 'neutral' never occurs in the training set, whose labels are "
                          "['neg', 'pos']: the model could never predict it")
    assert checksums(wd) == {}


def test_data_labels_declare_the_class_order(pos_neg_run):
    """data.labels='pos,neg': class 0 is pos, as the export's id2label says (inferred: sorted, neg first)."""
    from jaxft import hf

    model, _ = hf.load("jaxft-tiny", adapter=str(pos_neg_run / "export"))
    assert model.cfg.labels == ("pos", "neg")


@pytest.mark.parametrize("overrides,fragment", [
    (("--config.data.name=synthetic", "--config.data.synthetic_labels=2"),
     "data.labels='0,1': data.name='synthetic' has the labels 0..N-1 of data.synthetic_labels"),
    (("--config.data.name=c4_demo", "--config.model.path=jaxft-tiny"),
     "data.labels='0,1': declares the labels of classification, cloze or token_classification, but the task is "
     "causal_lm"),
    (("--config.data.labels=0,1,0",), "data.labels='0,1,0': label 0 is named twice")])
def test_data_labels_where_they_mean_nothing_are_an_error(tmp_path, overrides, fragment):
    wd = tmp_path / "run"
    r = cli(wd, "--config.data.labels=0,1", *overrides)
    assert_one_line_error(r, fragment)
    assert checksums(wd) == {}
