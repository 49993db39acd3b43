"""P-Tuning v2 on an encoder with a classification head, the paper's own setting (Liu et al. 2022):
deep prompts on a frozen BERT, SST-2.

  python -m jaxft.train --config=configs/ptuning_v2_bert.py

The base is the bundled `jaxft-tiny-bert` (a 4-layer, 5.5M-parameter BERT that jaxft pretrained with
masked-LM on bundled text: `jaxft/assets/jaxft-tiny-bert/README.md`), so the config runs offline. For
the paper-size run, take `bert-base-uncased` from the Hugging Face hub (downloaded once into the HF
cache, then offline; any BERT or RoBERTa directory works, e.g. roberta-base):

  python -m jaxft.train --config=configs/ptuning_v2_bert.py --config.model.path=bert-base-uncased

Only the prefixes (20 tokens x each layer x keys and values) and the head train: the pooler (dense +
tanh on the pooled state) and the classifier, as in BertForSequenceClassification, whose checkpoint layout the
export keeps (PEFT `modules_to_save`: classifier, pooler). The tokenizer is the checkpoint's WordPiece
one (read with the `tokenizers` library), which puts [CLS] in front and [SEP] after each sentence.

Settings follow the paper's GLUE/SuperGLUE recipe for BERT-size models: prefix length 20, learning
rate 1e-2. The head reads the mean of the final states (`model.pooling=mean`): on jaxft-tiny-bert
that gives SST-2 dev 0.631 +- 0.010 over 3 seeds in 1,000 steps (about 4 minutes each on 2 cores),
against 0.560 for the paper's [CLS] pooler (`--config.model.pooling=first`, one seed; BENCHMARKS.md,
"P-Tuning v2 on jaxft-tiny-bert"). bert-base-uncased is not measured in this repository (its machines
have no network for the download); there, [CLS] is the paper's choice.
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny-bert"  # paper size: --config.model.path=bert-base-uncased
    c.model.pooling = "mean"  # the paper's [CLS]: "first"

    # Method section: learned key/value prefixes at every layer of the frozen encoder.
    c.method.name = "ptuning_v2"
    c.method.num_virtual_tokens = 20
    c.method.prompt_dropout = 0.1

    # Data section: bundled SST-2 (train / GLUE dev).
    c.data.name = "sst2"
    c.data.seq_len = 64

    # Training section.
    c.train.steps = 1000
    c.train.batch_size = 32
    c.train.log_every_steps = 100
    c.optimizer.learning_rate = 1e-2
    c.optimizer.warmup_steps = 50
    c.eval.every_steps = 250
    c.checkpoint.every_steps = 250
    return c
