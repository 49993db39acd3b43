"""PET's hard prompts on Chinese: ChnSentiCorp hotel reviews as a cloze question to a masked LM.

  python -m jaxft.train --config=configs/pet_chnsenticorp.py
Each review is put into `<review>。总之很[MASK]。` ("all in all, very [MASK].") and the class is the
label word the bundled jaxft-tiny-bert's masked LM ranks higher at the mask: 差 ("bad", label 0) or
好 ("good", label 1). The encoder reads each Chinese character as one token and was pretrained on
these training reviews' text (labels unused). Every weight trains, as in PET; no new head.
Words of several characters work too, read at as many masks, the score being the sum of their
log-probabilities: `--config.data.verbalizer=失望,满意` ("disappointed", "satisfied"; two [MASK]s),
or words of different lengths, `"--config.data.cloze_template={text}。总之{mask}。"
--config.data.verbalizer=不满意,满意` (a row per class).
Measured (BENCHMARKS.md, "ChnSentiCorp as a cloze question"): dev accuracy 0.678 zero-shot (always
"good", the majority class) -> 0.864 / 0.860 / 0.860 (seeds 0 / 1 / 2) after 600 steps, 15-25 minutes
on 2 cores shared with other runs; 失望 / 满意 0.840 / 0.855, 不满意 / 满意 0.820. LoRA with a new head
on the same base (`configs/chnsenticorp_lora.py`) reaches 0.829 +- 0.020.
"""

from jaxft.config import base_config


def get_config():
    c = base_config()
    c.model.path = "jaxft-tiny-bert"

    # Method section: every weight, PET's own setting.
    c.method.name = "full"

    # Data section: bundled ChnSentiCorp (train / dev) as a cloze question.
    c.data.name = "chnsenticorp"
    c.data.task = "cloze"
    c.data.cloze_template = "{text}。总之很{mask}。"
    c.data.verbalizer = "差,好"  # labels 0 (negative), 1 (positive)
    c.data.seq_len = 128  # about 120 characters of a review; longer ones lose their end, the template stays

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
