"""PET's hard prompts (Schick & Schuetze 2021) on SST-2: sentiment as a cloze question to a masked LM.

  python -m jaxft.train --config=configs/pet_bert.py
Each sentence is put into a template with one mask, `<sentence> it was [MASK] .`, and the class is the
label word (the verbalizer: "bad" for 0, "good" for 1) the masked LM ranks higher at the mask: no new
head, the pretrained MLM head answers (`data.task=cloze`, `jaxft.data.tasks.cloze`). Before training
this is zero-shot classification. Every weight trains, as in PET; LoRA or BitFit work as well
(`--config.method.name=lora`). The base is the bundled `jaxft-tiny-bert`; any BERT or RoBERTa
masked-LM directory works (`--config.model.path=bert-base-uncased`). Each label word is encoded as it
stands in the filled template (with RoBERTa's byte-level BPE, "Ġgood" after "was "). A word of several tokens is read at as many masks, its
score the sum of their log-probabilities (Chinese: `--config.data.name=chnsenticorp
"--config.data.cloze_template={text}。总之很{mask}。" --config.data.verbalizer=失望,满意`). Pairs: `{text_b}` places the second text, e.g. for RTE
`--config.data.name=rte "--config.data.cloze_template={text} ? {mask} , {text_b}" --config.data.verbalizer=yes,no`.
Measured (BENCHMARKS.md, "PET on jaxft-tiny-bert"): SST-2 dev 0.509 zero-shot (the small encoder
says "good" for every sentence) -> 0.702 +- 0.016 over 3 seeds after 600 steps (about 4 minutes each
on 2 cores); a new classification head on the same base reaches 0.739. With 64 training sentences
neither learns: PET's few-shot strength needs a masked LM that already knows the words.
LM-BFF's demonstrations (`--config.data.demonstrations=1 --config.data.seq_len=128`: one training
sentence of each class, filled with its label word, after each question) measured 0.591 / 0.552 (seeds
0 / 1) on this small base; redrawn for every batch as LM-BFF trains (`--config.data.redraw_demonstrations=True`)
0.581, and LM-BFF's ensemble over 16 drawn sets at test time (`python -m jaxft.evaluate ... --demonstration_sets=16`)
0.610 / 0.611 (BENCHMARKS.md). A causal LM takes the question too, with `{mask}` last: `configs/full.py` with
`--config.data.task=cloze "--config.data.cloze_template={text} It was {mask}"
--config.data.verbalizer=bad,good` reached 0.752 on jaxft-tiny (BENCHMARKS.md).
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny-bert"

    # Method section: every weight, PET's own setting.
    c.method.name = "full"

    # Data section: bundled SST-2 (train / GLUE dev) as a cloze question.
    c.data.name = "sst2"
    c.data.task = "cloze"
    c.data.cloze_template = "{text} it was {mask} ."
    c.data.verbalizer = "bad,good"  # labels 0, 1
    c.data.seq_len = 64

    # Training section.
    c.train.steps = 600
    c.train.batch_size = 32
    c.train.log_every_steps = 50
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 60
    c.eval.at_start = True  # step 0: the zero-shot answer of the pretrained masked LM
    c.eval.every_steps = 200
    c.checkpoint.every_steps = 200
    return c
