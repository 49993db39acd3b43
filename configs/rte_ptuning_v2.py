"""P-Tuning v2 on RTE sentence pairs: deep prompts on the frozen bundled jaxft-tiny, plus a classifier head.

  python -m jaxft.train --config=configs/rte_ptuning_v2.py
Each example is `<s> premise </s> hypothesis </s>` (`data.text_pair_field=hypothesis`, the bundled
set's own), cut to 128 tokens as HF cuts pairs (longest first). RTE is the P-Tuning v2 paper's
SuperGLUE task; figures are in BENCHMARKS.md ("RTE over 3 seeds"). jaxft-tiny is a 4M-parameter
decoder pretrained on SST-2 and C4 text, and entailment is beyond it: measured 2026-11-26 over seeds
0-2 (`--config.train.seed=`), validation accuracy 0.517 ± 0.006 after 200 steps (`--config.train.steps=200`: the config
runs 400; 0.504 ± 0.006 with lr 3e-3) against 0.546 ± 0.022 untrained (random heads that answer "entailment" for 90-100% of pairs;
majority class 0.527): no learning beyond chance. Nor on the bundled encoder (`--config.model.path=jaxft-tiny-bert
--config.model.pooling=first`, with BERT's token types, which pairs get by default there; or mean pooling, lr 1e-2 or 3e-3), nor
with every weight training on either base (BENCHMARKS.md, "RTE on both bundled bases"): entailment
needs a real pretrained model, e.g. `--config.model.path=` a Llama-family or BERT/RoBERTa directory
(with BERT: `--config.model.pooling=first`). For scale: Google's
BERT-Tiny and BERT-Mini, of the bundled bases' size but pretrained on ~3.3B words, score only 57-58 on
RTE (their model card). 6-12 minutes for 200 steps on a 2-core machine shared with other jobs (load 7-13).
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny"
    c.model.pooling = "mean"

    # Method section: learned key/value prefixes at every layer, started from real tokens' keys/values.
    c.method.name = "ptuning_v2"
    c.method.num_virtual_tokens = 32
    c.method.init_from_tokens = True

    # Data section: bundled SuperGLUE RTE (2,490 train / 277 validation pairs).
    c.data.name = "rte"
    c.data.seq_len = 128

    # Training section.
    c.train.steps = 400  # about 5 epochs
    c.train.batch_size = 32
    c.train.log_every_steps = 50
    c.optimizer.learning_rate = 1e-2
    c.optimizer.warmup_steps = 20
    c.eval.every_steps = 200
    c.checkpoint.every_steps = 200
    return c
