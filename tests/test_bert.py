"""The BERT/RoBERTa family against transformers and peft: logits of every head, HF I/O both ways,
LoRA and P-Tuning v2 adapters both ways, and training through the CLI.

Tiny random transformers models (hidden 32, 2 layers) written with `save_pretrained` to tmp dirs;
weights re-randomised (larger std, LayerNorms away from 1, biases non-zero) so a wrong mapping,
position offset or mask cannot pass.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxft.hf as hf  # noqa: E402
from jaxft.errors import JaxftError  # noqa: E402

TOL = 1e-5
VOCAB = 96
CONFIG = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=40, type_vocab_size=2, num_labels=3)
CLASSES = {"masked_lm": "ForMaskedLM", "classification": "ForSequenceClassification",
           "token_classification": "ForTokenClassification"}
CASES = [(f, h) for f in ("bert", "roberta") for h in CLASSES]


def hf_class(family, head):
    return getattr(transformers, {"bert": "Bert", "roberta": "Roberta"}[family] + CLASSES[head])


def randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def make(tmp_path, family, head, **kw):
    cfg_cls = transformers.BertConfig if family == "bert" else transformers.RobertaConfig
    pad = 0 if family == "bert" else 1
    cfg = cfg_cls(**{**CONFIG, "pad_token_id": pad, **kw})
    torch.manual_seed(0)
    model = randomise(hf_class(family, head)(cfg))
    d = tmp_path / f"{family}-{head}"
    model.save_pretrained(d)
    return model, d


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    return {case: make(root, *case) for case in CASES}


def batch(family, seed=0, t=11):
    """Three rows: right padding of 4, no padding, right padding of 7; token types 0/1 (BERT)."""
    r = np.random.RandomState(seed)
    pad = 0 if family == "bert" else 1
    ids = r.randint(3, VOCAB, (3, t))
    mask = np.ones((3, t), np.int64)
    mask[0, t - 4:] = 0
    mask[2, t - 7:] = 0
    ids = np.where(mask == 1, ids, pad)
    types = (np.arange(t)[None] >= 5).astype(np.int64) * mask if family == "bert" else np.zeros_like(ids)
    return ids, mask, types


def torch_logits(model, ids, mask, types, **kw):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     token_type_ids=torch.tensor(types), **kw).logits.numpy()


def ours(model, params, ids, mask, types):
    return np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                                  token_type_ids=jnp.asarray(types)))


def assert_close(got, ref, tol=TOL):
    assert got.shape == ref.shape
    err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
    assert err < tol, err


@pytest.mark.parametrize("family,head", CASES)
def test_logits_match_transformers(models, family, head):
    model_t, d = models[(family, head)]
    model, params = hf.load(d)
    assert model.cfg.head == head and model.cfg.model_type == family
    ids, mask, types = batch(family)
    assert_close(ours(model, params, ids, mask, types), torch_logits(model_t, ids, mask, types))


@pytest.mark.parametrize("scan", [True, False])
def test_untied_decoder_and_unscanned_layers(tmp_path, scan):
    model_t, d = make(tmp_path, "bert", "masked_lm", tie_word_embeddings=False, hidden_act="gelu_new")
    model, params = hf.load(d, scan_layers=scan)
    assert not model.cfg.tie_word_embeddings and "decoder" in params["cls"]["predictions"]
    ids, mask, types = batch("bert", seed=1)
    assert_close(ours(model, params, ids, mask, types), torch_logits(model_t, ids, mask, types))


def test_roberta_positions_follow_padding_not_the_mask(models):
    """RoBERTa counts positions over non-pad ids (a left-padded row shifts its positions)."""
    model_t, d = models[("roberta", "token_classification")]
    model, params = hf.load(d)
    ids, mask, types = batch("roberta", seed=2)
    ids, mask = ids[:, ::-1].copy(), mask[:, ::-1].copy()  # left padding
    assert_close(ours(model, params, ids, mask, types), torch_logits(model_t, ids, mask, types))


@pytest.mark.parametrize("family,head", CASES)
def test_save_round_trip(models, tmp_path, family, head):
    model_t, d = models[(family, head)]
    model, params = hf.load(d)
    out = hf.save(model, params, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [hf_class(family, head).__name__]
    back = hf_class(family, head).from_pretrained(out).eval()
    ids, mask, types = batch(family, seed=3)
    assert_close(torch_logits(back, ids, mask, types), torch_logits(model_t, ids, mask, types))
    again, params2 = hf.load(out)
    assert_close(ours(again, params2, ids, mask, types), torch_logits(model_t, ids, mask, types))


def test_mean_pooling_is_recorded(models, tmp_path):
    model, params = hf.load(models[("bert", "classification")][1], pooling="mean")
    out = hf.save(model, params, tmp_path / "mean")
    assert json.loads((out / "config.json").read_text())["classifier_pooling"] == "mean"
    again, _ = hf.load(out)
    assert again.cfg.pooling == "mean"
    first, _ = hf.load(models[("bert", "classification")][1])
    ids, mask, types = batch("bert")
    assert not np.allclose(ours(model, params, ids, mask, types), ours(first, params, ids, mask, types))


def test_bare_encoder_dir(tmp_path):
    """A bare BertModel directory reads as masked_lm: it has no head weights, so that is a clear error; its
    encoder is used by a classification run, which adds the head (see the CLI test)."""
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(**CONFIG)).save_pretrained(tmp_path / "bare")
    with pytest.raises(JaxftError, match=r"no cls\.predictions\..*BertForMaskedLM"):
        hf.load(tmp_path / "bare")
    cfg = hf.read_config(tmp_path / "bare")
    assert cfg.head == "masked_lm"


def test_config_errors(tmp_path):
    c = transformers.BertConfig(**CONFIG).to_dict()
    for change, match in ((dict(position_embedding_type="relative_key"), "position_embedding_type"),
                          (dict(hidden_act="swish"), "hidden_act"), (dict(is_decoder=True), "is_decoder")):
        with pytest.raises(JaxftError, match=match):
            hf.config_from_dict({**c, **change, "model_type": "bert"})


# ---------------------------------------------------------------------------------------------
# PEFT adapters, both ways.

import copy  # noqa: E402

import flax.linen as nn  # noqa: E402

from jaxft.config import base_config  # noqa: E402
from jaxft.models import family  # noqa: E402
from jaxft.peft import build  # noqa: E402
from jaxft.peft.hf_peft import save_adapter  # noqa: E402
from jaxft.peft.partition import added_params, flat, merge, split, unflat  # noqa: E402


def hooked(base_dir, seed=1, **method_kw):
    """Base weights from disk + the method's parameters, randomised so that they matter."""
    model, params = hf.load(base_dir)
    m = base_config().method
    for k, v in method_kw.items():
        m[k] = v
    method = build(m, model.cfg)
    model = family.build(model.cfg, method.hooks)
    fresh = nn.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"])
    added = {k: 0.3 * jax.random.normal(jax.random.PRNGKey(i), v.shape)
             for i, (k, v) in enumerate(flat(added_params(fresh)).items())}
    return model, method, merge(params, unflat(added))


@pytest.mark.parametrize("family_name", ["bert", "roberta"])
def test_lora_adapter_matches_peft_both_ways(models, tmp_path, family_name):
    from peft import PeftModel

    base, base_dir = models[(family_name, "classification")]
    model, method, params = hooked(base_dir, name="lora", rank=4, alpha=8.0)  # the family's targets
    assert method.hooks[0].targets == "query,value"
    trainable, _ = split(params, method.trainable)
    assert "classifier" in trainable and ("pooler" in trainable) == (family_name == "bert")
    save_adapter(model, method, trainable, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    ids, mask, types = batch(family_name)
    got = ours(model, params, ids, mask, types)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    ref = torch_logits(peft_model, ids, mask, types)
    assert np.abs(ref - torch_logits(base, ids, mask, types)).max() > 1e-3  # the adapter changes the output
    assert_close(got, ref, 1e-4)
    model2, params2 = hf.load(base_dir, adapter=str(tmp_path / "adapter"))
    assert_close(ours(model2, params2, ids, mask, types), got)


def test_peft_saved_lora_loads(models, tmp_path):
    """An adapter PEFT itself wrote (LoRA on query/value, its default for bert, classifier saved)."""
    from peft import LoraConfig, get_peft_model

    base, base_dir = models[("bert", "token_classification")]
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="TOKEN_CLS", r=4, lora_alpha=8,
                                                                init_lora_weights=False))
    with torch.no_grad():
        peft_model.base_model.model.classifier.modules_to_save["default"].weight.mul_(3.0)
    peft_model.save_pretrained(tmp_path / "peft")
    ids, mask, types = batch("bert", seed=4)
    ref = torch_logits(peft_model.eval(), ids, mask, types)
    model, params = hf.load(base_dir, adapter=str(tmp_path / "peft"))
    assert model.cfg.head == "token_classification"
    assert_close(ours(model, params, ids, mask, types), ref, 1e-4)


@pytest.mark.parametrize("family_name", ["bert", "roberta"])
def test_prefix_adapter_matches_peft_prompt(models, tmp_path, family_name):
    """P-Tuning v2 on an encoder classifier (the paper's setting) against PEFT's PREFIX_TUNING SEQ_CLS:
    PEFT 0.21 loads the adapter; its forward refuses transformers 5 classifiers (their cache is named
    `cache`), so its prompt goes in as that cache, with the prefix's columns in the mask."""
    from peft import PeftModel

    base, base_dir = models[(family_name, "classification")]
    model, method, params = hooked(base_dir, name="ptuning_v2", num_virtual_tokens=5)
    trainable, _ = split(params, method.trainable)
    save_adapter(model, method, trainable, tmp_path / "adapter")
    ids, mask, types = batch(family_name, seed=5)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    full_mask = np.concatenate([np.ones((len(ids), 5), mask.dtype), mask], axis=1)
    with torch.no_grad():
        ref = peft_model.base_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(full_mask),
                                    token_type_ids=torch.tensor(types),
                                    cache=peft_model.get_prompt(batch_size=len(ids))).logits.numpy()
    got = ours(model, params, ids, mask, types)
    assert np.abs(ref - torch_logits(base, ids, mask, types)).max() > 1e-3
    assert_close(got, ref, 1e-4)
    model2, params2 = hf.load(base_dir, adapter=str(tmp_path / "adapter"))
    assert_close(ours(model2, params2, ids, mask, types), got)


# ---------------------------------------------------------------------------------------------
# Training through the CLI: a tiny BERT with bert-base-uncased's WordPiece vocabulary, chosen by
# model.path alone, on a few SST-2 rows.

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

from tests.test_train import cli, losses  # noqa: E402

VOCAB_TXT = Path("/work/shared/data/tokenizers/bert-base-uncased/vocab.txt")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random BertForMaskedLM (hidden 32, 2 layers) with its WordPiece tokenizer, as a HF directory."""
    if not VOCAB_TXT.exists():
        pytest.skip(f"{VOCAB_TXT} is not on this machine")
    d = tmp_path_factory.mktemp("tiny-bert")
    vocab = {w: i for i, w in enumerate(VOCAB_TXT.read_text(encoding="utf-8").splitlines())}
    tok = transformers.BertTokenizer(vocab=vocab, do_lower_case=True)
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64)
    transformers.BertForMaskedLM(cfg).save_pretrained(d)
    return d


def test_wordpiece_tokenizer_adds_cls_and_sep(tiny_bert):
    from jaxft.tokenizer import Tokenizer

    tok = Tokenizer(tiny_bert)
    ref = transformers.AutoTokenizer.from_pretrained(str(tiny_bert))
    assert tok.bos + tok.encode("a gripping movie") + tok.eos == ref("a gripping movie")["input_ids"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (101, 102, 0)


SST2_FEW = ("--config.data.name=sst2", "--config.data.max_train_examples=8", "--config.data.max_eval_examples=16",
            "--config.data.seq_len=32", "--config.train.batch_size=8", "--config.optimizer.learning_rate=1e-2",
            "--config.train.log_every_steps=1")


# slow: [head]: a whole classifier trains and exports through the CLI in [full] (the same export branch and
# checks), head alone trains on BERT in test_family_methods.py::test_method_on_family[bert-head];
# [lora]: LoRA on BERT through the CLI trains and exports (the same checks) in test_sharded_run_resumes_exactly.
@pytest.mark.parametrize("method", ["full", pytest.param("head", marks=pytest.mark.slow),
                                    pytest.param("lora", marks=pytest.mark.slow), "ptuning_v2"])
def test_methods_train_a_bert_classifier(tiny_bert, tmp_path, method):
    # 8 examples = one batch seen every step, so any method can fit it a little.
    r = cli(tmp_path, f"--config.model.path={tiny_bert}", f"--config.method.name={method}", "--config.train.steps=6",
            *SST2_FEW)
    assert r.returncode == 0, r.stderr
    assert "model: bert 2x32 head=classification (first pooling)" in r.stdout
    got = losses(tmp_path)
    assert all(np.isfinite(v) for v in got.values())
    assert got[6] < got[1], got  # it learns something
    export = tmp_path / "export"
    if method in ("full", "head"):  # a HF model directory that transformers reads, with the tokenizer
        back = transformers.BertForSequenceClassification.from_pretrained(export).eval()
        model, params = hf.load(export)
        ids, mask, types = batch("bert")
        assert_close(ours(model, params, ids, mask, types), torch_logits(back, ids, mask, types))
        assert (export / "tokenizer.json").exists() or (export / "vocab.txt").exists()
    else:
        config = json.loads((export / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_CLS" and set(config["modules_to_save"]) == {"classifier", "pooler"}
        if method == "lora":
            assert "query" in config["target_modules"] and "value" in config["target_modules"]


def test_sharded_run_resumes_exactly(tiny_bert, tmp_path):
    """LoRA on a (data 2, fsdp 2, tensor 2) mesh of 8 devices; the newest checkpoint removed, the same
    command resumes from the one before and ends with the same loss and adapter."""
    args = (f"--config.model.path={tiny_bert}", "--config.method.name=lora", "--config.train.steps=6",
            "--config.checkpoint.every_steps=3", "--config.mesh.data=2", "--config.mesh.fsdp=2",
            "--config.mesh.tensor=2", *SST2_FEW)
    r = cli(tmp_path, *args, devices=8)
    assert r.returncode == 0, r.stderr
    first = losses(tmp_path)
    # LoRA on a BERT classifier through the CLI (test_methods_train_a_bert_classifier[lora]'s checks): it learns,
    # and its adapter is PEFT's SEQ_CLS one with BERT's default targets.
    assert "model: bert 2x32 head=classification (first pooling)" in r.stdout
    assert all(np.isfinite(v) for v in first.values()) and first[6] < first[1], first
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and set(config["modules_to_save"]) == {"classifier", "pooler"}
    assert "query" in config["target_modules"] and "value" in config["target_modules"]
    adapter = (tmp_path / "export" / "adapter_model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    r = cli(tmp_path, *args, devices=8)
    assert r.returncode == 0, r.stderr
    assert "resuming from step 3" in r.stdout
    assert losses(tmp_path) == first
    assert (tmp_path / "export" / "adapter_model.safetensors").read_bytes() == adapter


# ---------------------------------------------------------------------------------------------
# Objectives of the encoder heads, against torch's cross entropy with ignore_index=-100.

from jaxft import objectives  # noqa: E402


@pytest.mark.parametrize("name,field", [("masked_lm", "mlm_labels"), ("token_classification", "labels")])
def test_per_token_objectives_match_torch(name, field):
    r = np.random.RandomState(0)
    logits = r.randn(3, 7, 5).astype(np.float32)
    labels = r.randint(0, 5, (3, 7))
    labels[r.rand(3, 7) < 0.4] = -100
    mask = np.ones((3, 7), np.int32)
    mask[1, 5:] = 0
    weight = np.array([1.0, 1.0, 0.0], np.float32)  # an eval padding row counts nothing
    batch = {"input_ids": np.zeros((3, 7), np.int32), "attention_mask": mask, "weight": weight, field: labels}
    sums = objectives.for_head(name).loss(jnp.asarray(logits), batch)
    keep = np.where((mask == 1) & (weight[:, None] > 0), labels, -100)
    ref = torch.nn.functional.cross_entropy(torch.tensor(logits).reshape(-1, 5), torch.tensor(keep).reshape(-1),
                                            ignore_index=-100, reduction="sum").item()
    count = int((keep >= 0).sum())
    assert float(sums["count"]) == count
    np.testing.assert_allclose(float(sums["loss_sum"]), ref, rtol=1e-5)
    assert float(sums["correct"]) == float(((logits.argmax(-1) == keep) & (keep >= 0)).sum())
    if name == "token_classification":
        class Cfg:
            num_labels = 5
        conf = np.asarray(objectives.for_head(name).eval_sums(jnp.asarray(logits), batch, Cfg)["confusion"])
        assert conf.sum() == count
        assert np.trace(conf) == float(sums["correct"])


def test_token_type_ids_reach_the_model(models):
    """The objectives pass a batch's token_type_ids to the model (sentence pairs)."""
    model, params = hf.load(models[("bert", "classification")][1])
    ids, mask, types = batch("bert")
    b = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    with_types = np.asarray(model.apply({"params": params}, **objectives.model_inputs(b)))
    del b["token_type_ids"]
    without = np.asarray(model.apply({"params": params}, **objectives.model_inputs(b)))
    assert not np.allclose(with_types, without)
    np.testing.assert_allclose(with_types, ours(model, params, ids, mask, types), rtol=1e-6)


def test_masked_lm_trains_and_exports(tiny_bert, tmp_path):
    """data.task=masked_lm on SST-2 sentences: BERT's masking, the loss on the masked positions only, and
    an export that transformers reads as a BertForMaskedLM with the same logits."""
    r = cli(tmp_path, f"--config.model.path={tiny_bert}", "--config.method.name=full", "--config.data.task=masked_lm",
            "--config.train.steps=6", *SST2_FEW)
    assert r.returncode == 0, r.stderr
    assert "head=masked_lm" in r.stdout and "eval/accuracy=" in r.stdout
    got = losses(tmp_path)
    assert got[6] < got[1], got
    back = transformers.BertForMaskedLM.from_pretrained(tmp_path / "export").eval()
    model, params = hf.load(tmp_path / "export")
    ids, mask, types = batch("bert")
    assert_close(ours(model, params, ids, mask, types), torch_logits(back, ids, mask, types))


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_masked_lm_logits_at_the_targets_only_give_the_same_loss_and_gradients(models, family):
    """`mlm_positions` (logits at the targets only, as BERT's pretraining computes them) changes the
    cost, not the result: loss, accuracy and gradients equal those of the logits at every token."""
    import jax

    from jaxft.data import tasks

    model, params = hf.load(models[(family, "masked_lm")][1])
    ids, mask, types = batch(family)

    class Tok:
        bos_id = eos_id = None
        pad_id, mask_id, vocab_size = model.cfg.pad_token_id, 4, model.cfg.vocab_size

    b = tasks.mask_tokens({"input_ids": ids, "attention_mask": mask}, Tok, 0, probability=0.3)
    b["weight"] = np.array([1.0] * (len(ids) - 1) + [0.0], np.float32)  # an eval padding row
    where = b["mlm_positions"]
    assert where.shape[1] == (b["mlm_labels"] >= 0).sum(1).max() and (where >= 0).sum() == (b["mlm_labels"] >= 0).sum()
    full = {k: v for k, v in b.items() if k != "mlm_positions"}
    objective = objectives.for_head("masked_lm")

    def sums(p, data):
        out = model.apply({"params": p}, **objective.inputs(data))
        s = objective.loss(out, data)
        return s["loss_sum"], s

    (loss_a, a), grads_a = jax.value_and_grad(sums, has_aux=True)(params, b)
    (loss_b, c), grads_b = jax.value_and_grad(sums, has_aux=True)(params, full)
    assert model.apply({"params": params}, **objective.inputs(b)).shape[1] == where.shape[1] < ids.shape[1]
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)
    assert float(a["count"]) == float(c["count"]) > 0 and float(a["correct"]) == float(c["correct"])
    for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-7)

    # The train loop's MFU counts the head at the K targets only: its transform and vocabulary projection.
    from flax.traverse_util import flatten_dict

    from jaxft import flops
    from jaxft.models import family

    shapes = {"/".join(k): v.shape for k, v in flatten_dict(params).items()}
    head = [v for k, v in shapes.items() if "transform" in k or "lm_head/dense" in k]
    vocab, d = shapes[next(k for k in shapes if "word_embeddings" in k)]
    assert family.of(model.cfg).head_weights(model.cfg) == d * d + vocab * d and (d, d) in head
    t, k = ids.shape[1], where.shape[1]
    saved = flops.train_flops_per_token(model.cfg, t, trains_base=True) - flops.train_flops_per_token(
        model.cfg, t, trains_base=True, head_width=k)
    assert saved == pytest.approx(6 * (t - k) / t * (d * d + vocab * d))


def test_mask_tokens_follows_bert():
    from jaxft.data import tasks

    class Tok:
        bos_id, eos_id, pad_id, mask_id, vocab_size = 101, 102, 0, 103, 1000

    ids = np.random.RandomState(0).randint(1000, size=(64, 128)).clip(200)
    ids[:, 0], ids[:, -1] = 101, 102
    ids[1, 100:] = 0  # a padded row
    attention = (ids != 0).astype(np.int32)
    out = tasks.mask_tokens({"input_ids": ids, "attention_mask": attention}, Tok, 0)
    chosen = out["mlm_labels"] >= 0
    # round(15% of the non-special tokens) per row, as BERT's create_pretraining_data; never [CLS] / [SEP] / pad
    np.testing.assert_array_equal(chosen.sum(1), np.floor((attention.sum(1) - 2) * 0.15 + 0.5))
    assert not chosen[:, [0, -1]].any() and not chosen[1, 100:].any()
    np.testing.assert_array_equal(out["mlm_labels"][chosen], ids[chosen])
    assert (out["input_ids"][~chosen] == ids[~chosen]).all()
    masked = (out["input_ids"][chosen] == 103).mean()
    kept = (out["input_ids"][chosen] == ids[chosen]).mean()
    assert 0.77 < masked < 0.83 and 0.07 < kept < 0.13
    # mlm_positions: each row's targets in order, -1 after; one width (round(0.15 * 128)) for every batch
    where = out["mlm_positions"]
    assert where.shape == (64, 19)
    for row, w in zip(chosen, where):
        np.testing.assert_array_equal(w[w >= 0], np.flatnonzero(row))
    with pytest.raises(JaxftError, match="no mask token"):
        Tok.mask_id = None
        tasks.mask_tokens({"input_ids": ids, "attention_mask": np.ones_like(ids)}, Tok, 0)


def test_masks_are_redrawn_every_batch_and_do_not_depend_on_the_process_split():
    """Dynamic masking (RoBERTa's): batch `position` of `Batches` with `tasks.redraw` is a pure function
    of (seed, position, global row): two processes' halves equal one process's batch, a resumed
    iterator repeats it, and the next epoch masks the same blocks differently."""
    from jaxft.data import tasks
    from jaxft.data.iterator import Batches

    class Tok:
        bos_id, eos_id, pad_id, mask_id, vocab_size = 101, 102, 0, 103, 1000

    ids = np.random.RandomState(1).randint(200, 1000, size=(8, 32))
    arrays = {"input_ids": ids, "attention_mask": np.ones_like(ids), "weight": np.ones(8, np.float32)}
    transform = tasks.redraw(lambda b, rngs: tasks.mask_tokens(b, Tok, rngs), seed=3)
    batches = Batches(arrays, 4, seed=3, shuffle=False, transform=transform)
    whole = batches.local(0, (0, 4))
    halves = [batches.local(0, (0, 2)), batches.local(0, (2, 4))]
    for k in whole:
        np.testing.assert_array_equal(whole[k], np.concatenate([h[k] for h in halves]))
    again = Batches(arrays, 4, seed=3, shuffle=False, transform=transform).local(0, (0, 4))
    np.testing.assert_array_equal(again["input_ids"], whole["input_ids"])
    next_epoch = batches.local(2, (0, 4))  # the same 4 blocks (no shuffle), new masks
    np.testing.assert_array_equal(np.where(next_epoch["mlm_labels"] >= 0, next_epoch["mlm_labels"], 0),
                                  np.where(next_epoch["mlm_labels"] >= 0, ids[:4], 0))
    assert (next_epoch["mlm_labels"] >= 0).tolist() != (whole["mlm_labels"] >= 0).tolist()


# slow: [True]: BERT's sown keys/values are read in [False]; init_from_tokens over scanned blocks in
# test_gpt2.py::test_prefix_init_from_tokens_uses_real_keys_and_values[True] and test_t5.py::test_prefix_init_from_tokens.
@pytest.mark.parametrize("scan", [pytest.param(True, marks=pytest.mark.slow), False])
def test_prefix_init_from_tokens_on_an_encoder(models, scan):
    """`method.init_from_tokens` reads the keys and values BERT's attention sows (its modules are not
    Llama's): the prefix starts as the frozen encoder's keys/values of the first real tokens."""
    base_dir = models[("bert", "classification")][1]
    model, params = hf.load(base_dir, scan_layers=scan)
    m = base_config().method
    m.name, m.num_virtual_tokens, m.init_from_tokens = "ptuning_v2", 3, True
    method = build(m, model.cfg)
    hooked_model = family.build(model.cfg, method.hooks)
    fresh = nn.unbox(hooked_model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    params = merge(params, added_params(fresh))
    ids, mask, _ = batch("bert")
    new = method.hooks[0].initialize(hooked_model, params, {"input_ids": ids, "attention_mask": mask})
    emb = np.asarray(new["prefix_encoder"]["embedding"])  # [P, layers * 2 * H * D]
    _, state = model.apply({"params": params}, ids[:1, :3], mutable=["intermediates"])
    sown = state["intermediates"]["layers" if scan else "layers_0"]["attention"]["self"]["keys_values"][0]
    k0 = np.asarray(sown[0][0] if scan else sown[0])[0]  # layer 0's keys of the first row: [3, H, D]
    np.testing.assert_allclose(emb.reshape(3, model.cfg.num_layers, 2, -1)[:, 0, 0], k0.reshape(3, -1), rtol=1e-5)
