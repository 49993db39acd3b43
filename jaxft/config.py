"""The shared defaults every config file starts from, and their validation.

Config files (`configs/*.py`) call `base_config()` and change what their run needs; CLI overrides
(`--config.train.steps=100`) apply on top. `validate` turns impossible values into one-line errors
before anything is loaded or written.
"""

from __future__ import annotations

import ml_collections

from jaxft.errors import JaxftError


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # Model section.
    c.model = ml_collections.ConfigDict()
    c.model.path = "jaxft-tiny"  # HF directory, bundled name, or hub name (online); "" = from `model.init`
    c.model.init = ml_collections.ConfigDict()  # HF config.json keys of a model to build from scratch
    c.model.tokenizer = ""  # default: the model directory
    c.model.dtype = "float32"  # compute dtype: float32, bfloat16 or float16 (with loss scaling); trainable params stay float32
    c.model.param_dtype = "float32"  # storage of the frozen base: float32 or bfloat16
    c.model.head = ""  # "", causal_lm, classification, ... ("" = from the task)
    c.model.pooling = ""  # classification head reads: last (real token), mean or first ([CLS]) ("" = the model's own)
    c.model.scan_layers = True
    # What the backward pass keeps of each layer: none | full | save_dots | offload (see
    # `jaxft.models.layers.remat_policy`). Typed `object` so the old True / False still parse (full / none).
    c.model.remat = ml_collections.FieldReference("none", field_type=object)
    c.model.attention = "auto"  # xla, cudnn, splash, flash, or auto: the fastest the backend runs (see README)
    c.model.quantization = "none"  # none | int8 | nf4: the frozen decoder projections stored so (QLoRA)
    # A mixture of experts' load-balancing loss (transformers' output_router_logits), this times it joins the
    # training loss: -1 as the model's config.json says, 0 none (LLaMA-Factory's moe_aux_loss_coef)
    c.model.router_aux_loss_coef = -1.0

    # Method section: which parameters train and how the model is hooked.
    c.method = ml_collections.ConfigDict()
    # full | head | bitfit | lora | ptuning_v2 | prefix_tuning | prompt_tuning | ptuning | adapter | ia3 | adalora,
    # or several joined by '+' (see `jaxft.peft.methods`)
    c.method.name = "full"
    c.method.layers = ""  # "" all, or the decoder layers that train: '0-3', '0,2,5-7' (needs model.scan_layers=False)
    c.method.trainable_pattern = ""  # a regex of parameter paths that train too; '!regex' freezes them instead
    c.method.rank = 8
    c.method.alpha = 16.0
    c.method.dropout = 0.0
    # Comma-separated module names, or a regex on the dotted path; "" = the family's default (PEFT's):
    # q_proj,v_proj for Llama, c_attn for GPT-2, query,value for BERT/RoBERTa, q,v for T5.
    c.method.targets = ""
    c.method.rslora = False
    # LoRA's start (PEFT's init_lora_weights): "" PEFT's default (B = 0) | gaussian | pissa | pissa_niter_N | olora
    # (PiSSA / OLoRA: the adapter starts as a part of each target weight, which keeps the rest)
    c.method.init_lora_weights = ""
    c.method.num_virtual_tokens = 16
    c.method.projection = False  # P-Tuning v2 reparameterisation MLP
    c.method.projection_hidden = 512
    c.method.prompt_dropout = 0.0
    c.method.init_std = 1.0  # P-Tuning v2 random prefixes, prompt tuning's prompt_init=random: the normal's std
    c.method.init_from_tokens = False  # P-Tuning v2: start from the frozen model's keys/values of real tokens
    c.method.prompt_init = "random"  # prompt tuning: random | vocab (sampled token embeddings) | text
    c.method.prompt_init_text = ""  # prompt tuning, prompt_init=text: tokenized with the run's tokenizer
    c.method.encoder = "mlp"  # P-Tuning: the prompt encoder, mlp or lstm
    c.method.encoder_hidden = 0  # P-Tuning: its width (0 = the model's hidden size)
    c.method.encoder_layers = 2  # P-Tuning: LSTM layers
    c.method.encoder_dropout = 0.0  # P-Tuning: LSTM dropout between layers
    c.method.template = ""  # P-Tuning: "[P][P] {text} [P] It was": its virtual tokens placed in the input; "": in front
    c.method.dora = False  # LoRA as DoRA: a learned magnitude per output column (PEFT's use_dora)
    c.method.adapter_type = "houlsby"  # bottleneck adapters: houlsby (after attention and MLP) | pfeiffer (after MLP)
    c.method.adapter_size = 64  # their bottleneck width
    c.method.adapter_activation = "relu"  # relu | gelu | silu | tanh
    c.method.ia3_targets = ""  # IA3: module names or a regex; "" = the family's (PEFT's defaults for its model type)
    c.method.feedforward_modules = ""  # IA3: those of its targets whose input is scaled; "" = the family's
    c.method.init_r = 12  # AdaLoRA (PEFT's names and defaults): initial rank per target (uses method.targets, alpha)
    c.method.target_r = 8  # AdaLoRA: average rank per target after budget allocation
    c.method.tinit = 0  # AdaLoRA: steps before the budget starts falling
    c.method.tfinal = 0  # AdaLoRA: last steps, trained at the final rank pattern
    c.method.delta_t = 1  # AdaLoRA: steps between allocations (PEFT's deltaT)
    c.method.beta1 = 0.85  # AdaLoRA: EMA of the sensitivity
    c.method.beta2 = 0.85  # AdaLoRA: EMA of the uncertainty
    c.method.orth_reg_weight = 0.5  # AdaLoRA: weight of the orthogonal regularisation
    c.method.total_step = 0  # AdaLoRA: the schedule's length; 0 = train.steps

    # Data section.
    c.data = ml_collections.ConfigDict()
    c.data.name = "sst2"  # bundled name, local file (jsonl/json/csv/tsv/parquet), hub name, or synthetic
    c.data.eval_name = ""  # eval file ("" = none for local data; a bundled set's own eval split)
    # Hub datasets (data.name="hub:owner/name", or a bare hub name), loaded through `datasets` and its cache:
    c.data.hub_config = ""  # the dataset's config (subset) name, e.g. "sst2" of "hub:nyu-mll/glue"
    c.data.train_split = "train"
    c.data.eval_split = ""  # "" = data.eval_name if set, else "validation" where the dataset has it; "none" = no eval
    # "", classification, token_classification (NER: tagged words), causal_lm, sft, masked_lm, seq2seq,
    # span_corruption (T5's pretraining), cloze, dpo, reward
    # or grpo (reinforcement learning from rewards, jaxft.grpo; prompts from the records: jaxft.data.prompts)
    # ("" = what the data and the model say: see jaxft.data.tasks.choose_task; seq2seq for an encoder-decoder
    # such as T5 on source -> target pairs)
    c.data.task = ""
    # cloze (PET's hard prompts, on a masked LM): the text in a template with one mask, e.g.
    # "{text} it was {mask} ." ({text_b}: a pair's second text), and one label word per label, in the
    # order of data.labels (default: the labels sorted), e.g. "bad,good"; the class is the label word the
    # model puts at the mask (a word of several tokens: the sum of their log-probabilities, read at as
    # many masks).
    # On a causal LM (Llama, GPT-2) the row ends at the mask and the class is the word the model writes
    # next, so {mask} comes last: "{text} It was {mask}".
    c.data.cloze_template = ""
    c.data.verbalizer = ""
    # LM-BFF's demonstrations (Gao et al. 2021): this many training examples of every class, the template
    # filled with their label word, shown with each cloze question (after it for a masked LM, before it
    # for a causal LM), drawn per example (train.seed), never the example itself; 0 = none. LM-BFF's ensemble
    # over several drawn sets at test time: `jaxft.evaluate --demonstration_sets=N`.
    c.data.demonstrations = 0
    # True: a training example gets new demonstrations each time it is in a batch, drawn from (train.seed,
    # the batch's position, the example), as LM-BFF's training samples them; False: drawn once, up front.
    c.data.redraw_demonstrations = False
    c.data.demonstration_separator = ""  # text between them ("" = a masked LM's [SEP]; a space on a causal LM)
    # LM-BFF's demonstration filter (section 6.2): each example's demonstrations drawn from only this top
    # fraction of each class's training examples, by the cosine of sentence embeddings with it (LM-BFF: 0.5
    # with SBERT); 1.0 = no filter. The embeddings: data.demonstration_encoder's final hidden states (a HF
    # model directory or hub name; "" = model.path), mean-pooled over the real tokens, as SBERT's.
    c.data.demonstration_filter = 1.0
    c.data.demonstration_encoder = ""
    c.data.text_field = ""  # "" = "text" (a bundled set: its own field)
    c.data.label_field = ""  # "" = "label" (a bundled set: its own field)
    # Classification and cloze: the labels and their order (class 0 first), comma-separated, e.g. "neg,pos" or
    # "0,1"; a record whose label is not one of them is an error. "" = the training set's labels, sorted.
    c.data.labels = ""
    # token_classification: a word's later sub-word tokens are trained on its tag too (B-X as I-X, or M-X in BMES),
    # as HF run_ner's label_all_tokens; training split only: evaluation scores a tag per word either way.
    c.data.label_all_tokens = False
    c.data.text_pair_field = ""  # classification of pairs: the second text (RTE's hypothesis; "" = the set's own or none)
    # token_type_ids in the batch (0 first text, 1 second): auto = for pairs on a model with token-type
    # embeddings (BERT's), as HF's tokenizers give them; True / False force them on or off.
    c.data.token_type_ids = "auto"
    c.data.seq_len = 64
    c.data.target_len = 0  # seq2seq: the decoder's length (target tokens + EOS); 0 = data.seq_len
    c.data.length_buckets = True  # classification, unpacked sft, seq2seq: pad each batch to 16, 32, ... up to seq_len
    # sft: short examples share rows (segment ids: attention never crosses examples, positions restart);
    # causal_lm: each block's documents attend only within themselves. False: sft pads one example per row.
    c.data.packing = True
    c.data.train_on_prompt = False  # sft: the loss covers prompts too, not only the responses
    c.data.chat_template = ""  # sft: "" (the tokenizer's, else jaxft's default), "default", or a .jinja file
    # Variables the chat template reads, as apply_chat_template(**kwargs): "enable_thinking=false" (Qwen3's
    # answers without reasoning), "name=value,..." (JSON values, else text) or a JSON object
    c.data.chat_template_kwargs = ""
    c.data.source_field = ""  # sft / seq2seq on pairs: the prompt (source) field (e.g. "content")
    c.data.target_field = ""  # sft / seq2seq on pairs: the response (target) field (e.g. "summary")
    c.data.skip_bad_records = False  # sft, seq2seq: skip (and count) malformed or empty records instead of stopping
    c.data.weights = ""  # data.name='a+b': sampling weights, e.g. "0.7,0.3" ("" = every example once per epoch)
    c.data.eval_holdout = 0  # a source without an eval split (any task) gives its last N records to evaluation
    # Tokenized arrays of every task but classification and cloze, kept across runs:
    # "" = $JAXFT_CACHE or ~/.cache/jaxft; "none" = off
    c.data.cache_dir = ""
    c.data.max_train_examples = 0  # 0 = all; else the first N training records (after data.eval_holdout's)
    c.data.max_eval_examples = 0
    c.data.synthetic_examples = 4096
    c.data.synthetic_labels = 0  # >0: synthetic classification with this many classes

    # Training section.
    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 32  # global, across all processes
    c.train.grad_accum = 1
    c.train.seed = 0
    c.train.log_every_steps = 50
    c.train.sync_every_steps = 10  # multi-host: processes compare preemption flags every N steps (a collective)
    c.train.peak_flops = 0.0  # per-device FLOP/s for train/mfu; 0 = the datasheet table (CPU: measured at start)
    c.train.skip_nonfinite = False  # a NaN/Inf loss or gradient skips that update instead of stopping the run
    c.train.resume_anyway = False  # resume even if the checkpoint was made with other run-defining settings
    # XLA's persistent compilation cache: "" = <workdir>/xla_cache (or JAX_COMPILATION_CACHE_DIR where set),
    # "none" = off, or a directory / epath URL that several runs share (gs://bucket/xla_cache)
    c.train.compilation_cache = ""
    # NEFTune: uniform noise of alpha / sqrt(length * width) on the input embeddings while training (transformers'
    # neftune_noise_alpha; 5 in the paper's runs); 0: none
    c.train.neftune_noise_alpha = 0.0
    c.train.dpo_beta = 0.1  # data.task=dpo: how far from the reference the policy may move (DPO's beta; TRL's default)
    c.train.dpo_loss = "sigmoid"  # DPO's loss; ipo | hinge; simpo | orpo (no reference model; jaxft.dpo)
    c.train.simpo_gamma = 0.5  # dpo_loss=simpo: the target reward margin gamma (TRL's simpo_gamma)
    c.train.dpo_label_smoothing = 0.0  # sigmoid only: the share of pairs assumed mislabelled (cDPO), < 0.5
    # data.task=grpo (jaxft.grpo): reinforcement learning from the rewards of the policy's own completions.
    # reward functions: sentiment, accuracy, format, module:function, file.py:function, model=PATH (a reward model)
    c.train.grpo_rewards = ""
    c.train.grpo_reward_weights = ""  # one weight per reward function ("" = all 1)
    c.train.grpo_generations = 4  # completions per prompt (the group); train.batch_size counts prompts
    c.train.grpo_max_new_tokens = 32  # longest completion
    c.train.grpo_temperature = 1.0  # sampling temperature (the log-probabilities are of logits / temperature too)
    c.train.grpo_top_k = 0  # 0 = every token
    c.train.grpo_top_p = 1.0
    c.train.grpo_beta = 0.04  # weight of the KL penalty towards the starting policy (0 = none, no reference pass)
    c.train.grpo_epsilon = 0.2  # PPO's clip range of the probability ratio
    c.train.grpo_iterations = 1  # optimizer steps per batch of completions (PPO's epochs; TRL's num_iterations)
    c.train.grpo_scale_rewards = True  # divide advantages by their group's standard deviation
    c.train.grpo_loss_type = "dapo"  # the token losses' mean: dapo (over tokens) | grpo (per completion) | dr_grpo
    c.train.grpo_mask_truncated = False  # completions without an EOS (cut at max_new_tokens) count nothing
    # data.task=ppo (jaxft.ppo): PPO with a value head; its rollouts take the grpo_* settings above.
    c.train.ppo_value_coef = 0.1  # weight of the value loss
    c.train.ppo_value_clip = 0.2  # how far a value may move from the rollout's per update
    c.train.ppo_gamma = 1.0  # discount
    c.train.ppo_lam = 0.95  # GAE's lambda
    c.train.ppo_critic = ""  # a separate critic's model directory (e.g. the reward model); "": a value head
    # what of that critic trains: "full" (every weight), or lora, ia3, adapter, bitfit, head (+ its score head,
    # with the method.* settings of that method)
    c.train.ppo_critic_method = "full"

    # Optimizer section.
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 0
    c.optimizer.schedule = "cosine"  # cosine | linear | constant
    c.optimizer.end_lr_fraction = 0.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip = 1.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.mu_dtype = ""  # Adam's first moment: "" (as the parameters) or bfloat16
    # "regex=factor,...": trainable leaves whose path a regex matches train at factor x the learning rate
    # (the first match; e.g. "lora_b=16", LoRA+; "critic=0.1", PPO's separate critic slower)
    c.optimizer.lr_multipliers = ""

    # Eval section.
    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0  # 0 = only at the end
    c.eval.batch_size = 0  # 0 = train.batch_size
    c.eval.at_start = False  # also evaluate before the first step (logged as step 0)
    # Generation tasks (sft, seq2seq, dpo): each eval also generates answers to the first N distinct prompts of
    # the eval split and logs eval/rouge1, rouge2, rougeL, bleu, exact_match (0 = off; see jaxft.evaluate);
    # for dpo the prompts of the held-out pairs, scored against their chosen answers.
    # GRPO: the first N held-out prompts are completed greedily and scored (eval/reward); 0 = all of them.
    c.eval.generate_examples = 0
    c.eval.max_new_tokens = 64  # longest generated answer
    c.eval.num_beams = 1  # 1 = greedy
    # > 1 makes every token already in the prompt or the answer less likely (transformers'
    # repetition_penalty); 1 = none.
    c.eval.repetition_penalty = 1.0

    # Checkpoint section.
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500  # 0 = only at the end
    c.checkpoint.keep = 2  # the newest N are kept; 0 = all

    # Export section: at the end, a HF model directory (methods that train base weights) or a HF PEFT
    # adapter directory (methods that add parameters), so the result serves anywhere.
    c.export = ml_collections.ConfigDict()
    c.export.enabled = True
    c.export.dir = ""  # "" = <workdir>/export
    # also the whole model with the method folded in (PEFT's merge_and_unload), in <export dir>/merged:
    # LoRA, DoRA, PiSSA, IA3 or AdaLoRA; a quantized base is merged as trained, dequantized
    c.export.merged = False
    c.export.dtype = "float32"  # a whole model's weights (every weight trained, or export.merged): | bfloat16 | float16

    # Mesh section: sizes of the data, fsdp, expert and tensor axes; -1 takes the remaining devices.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    # Expert parallelism: a mixture's experts split over this many devices, which take the batch's tokens
    # to them; for the rest of the model (and a model without experts) it is one more data axis.
    c.mesh.expert = 1
    c.mesh.tensor = 1
    # Multi-slice TPU: the data / fsdp axes also span this many slices (DCN); the sizes above are per slice.
    c.mesh.dcn_data = 1
    c.mesh.dcn_fsdp = 1
    return c


SAVE_DTYPES = ("float32", "bfloat16", "float16")  # a whole model's weights as `jaxft.hf.save` writes them
CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.attention": ("auto", "xla", "chunked", "cudnn", "splash", "flash"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "save_dots", "offload", True, False),
    "export.dtype": SAVE_DTYPES,
    "model.head": ("", "causal_lm", "classification", "masked_lm", "token_classification", "seq2seq_lm"),
    "model.quantization": ("none", "int8", "nf4"),
    "model.pooling": ("", "last", "mean", "first"),
    "data.task": ("", "causal_lm", "classification", "token_classification", "sft", "masked_lm", "seq2seq",
                  "span_corruption", "cloze", "dpo",
                  "reward", "grpo", "ppo"),
    "optimizer.schedule": ("cosine", "linear", "constant"),
    "train.dpo_loss": ("sigmoid", "ipo", "hinge", "simpo", "orpo"),
    "optimizer.mu_dtype": ("", "bfloat16"),
}
POSITIVE = ("data.seq_len", "train.steps", "train.batch_size", "train.grad_accum", "train.log_every_steps",
            "mesh.dcn_data", "mesh.dcn_fsdp", "eval.max_new_tokens", "eval.num_beams")
NON_NEGATIVE = ("train.seed", "train.sync_every_steps", "eval.generate_examples",
                "checkpoint.every_steps", "checkpoint.keep", "eval.every_steps", "eval.batch_size",
                "optimizer.warmup_steps", "data.max_train_examples", "data.max_eval_examples", "data.eval_holdout",
                "data.target_len", "data.demonstrations")


def get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def validate(config) -> None:
    for key, allowed in CHOICES.items():
        if get(config, key) not in allowed:
            raise JaxftError(f"{key}={get(config, key)!r}: expected one of {', '.join(map(repr, allowed))}")
    for key in POSITIVE:
        if int(get(config, key)) <= 0:
            raise JaxftError(f"{key}={get(config, key)}: expected a positive integer")
    for key in NON_NEGATIVE:
        if int(get(config, key)) < 0:
            raise JaxftError(f"{key}={get(config, key)}: expected zero or a positive integer")
    if config.train.batch_size % config.train.grad_accum:
        raise JaxftError(
            f"train.batch_size={config.train.batch_size} is not divisible by train.grad_accum={config.train.grad_accum}"
        )
    if not config.model.path and not config.model.init:
        raise JaxftError("model.path is empty and model.init is not set: expected a model directory or HF config keys")
    if not float(config.train.get("neftune_noise_alpha", 0.0)) >= 0:  # NaN fails too
        raise JaxftError(f"train.neftune_noise_alpha={config.train.neftune_noise_alpha}: expected >= 0 (0: no noise)")
    if not float(config.train.get("dpo_beta", 0.1)) > 0:  # NaN fails too
        raise JaxftError(f"train.dpo_beta={config.train.dpo_beta}: expected > 0")
    smoothing = float(config.train.get("dpo_label_smoothing", 0.0))
    if not 0 <= smoothing < 0.5:
        raise JaxftError(f"train.dpo_label_smoothing={smoothing}: expected 0 <= e < 0.5")
    if smoothing and config.train.dpo_loss not in ("sigmoid", "simpo"):
        raise JaxftError(f"train.dpo_label_smoothing={smoothing}: applies to train.dpo_loss='sigmoid' or 'simpo', "
                         f"not {config.train.dpo_loss!r}")
    if int(config.data.get("demonstrations", 0)) and config.data.task != "cloze":
        raise JaxftError(f"data.demonstrations={config.data.demonstrations}: demonstrations fill a cloze template: "
                         f"expected data.task='cloze', not {config.data.task!r}")
    if config.data.get("redraw_demonstrations", False) and not int(config.data.get("demonstrations", 0)):
        raise JaxftError("data.redraw_demonstrations=True: redraws LM-BFF's demonstrations, and "
                         "data.demonstrations=0: expected data.demonstrations >= 1")
    keep = config.data.get("demonstration_filter", 1.0)
    if not (isinstance(keep, (int, float)) and 0 < keep <= 1):  # NaN fails too
        raise JaxftError(f"data.demonstration_filter={keep!r}: expected a fraction in (0, 1] (1.0: no filter; "
                         "LM-BFF's 0.5)")
    if keep < 1 and not int(config.data.get("demonstrations", 0)):
        raise JaxftError(f"data.demonstration_filter={keep}: filters LM-BFF's demonstrations, and "
                         "data.demonstrations=0: expected data.demonstrations >= 1")
    if config.data.get("chat_template_kwargs"):
        from jaxft.data import sft

        sft.template_variables(config.data.chat_template_kwargs)
    if config.train.get("ppo_critic", "") and config.data.task != "ppo":
        raise JaxftError(f"train.ppo_critic={config.train.ppo_critic!r}: PPO's separate critic: expected "
                         f"data.task='ppo', not {config.data.task!r}")
    if config.train.get("ppo_critic_method", "full") != "full" and not config.train.get("ppo_critic", ""):
        raise JaxftError(f"train.ppo_critic_method={config.train.ppo_critic_method!r}: the method of PPO's separate "
                         "critic, and train.ppo_critic is unset: expected train.ppo_critic=PATH (the value head "
                         "always trains whole)")
    if config.data.task in ("grpo", "ppo"):
        check_grpo(config)
    from jaxft.data.tasks import declared_labels

    declared_labels(config.data.get("labels", ""))
    if float(config.train.peak_flops) < 0:
        raise JaxftError(f"train.peak_flops={config.train.peak_flops}: expected >= 0 (0 = the datasheet table)")
    if float(config.eval.get("repetition_penalty", 1.0)) <= 0:
        raise JaxftError(f"eval.repetition_penalty={config.eval.repetition_penalty}: expected > 0 (1 is none)")
    for key in ("method.dropout", "method.prompt_dropout", "method.encoder_dropout"):
        if not 0 <= float(get(config, key)) < 1:
            raise JaxftError(f"{key}={get(config, key)}: expected a probability, 0 <= p < 1")
    # LoRA's scale is alpha / rank: 0 trains nothing, NaN stops the run only at step 1.
    if not 0 < float(config.method.get("alpha", 16.0)) < float("inf"):
        raise JaxftError(f"method.alpha={config.method.alpha}: expected a positive number")
    if not 0 <= float(config.method.get("init_std", 1.0)) < float("inf"):
        raise JaxftError(f"method.init_std={config.method.init_std}: expected a standard deviation, >= 0")
    opt = config.optimizer
    from jaxft.step import lr_multipliers

    lr_multipliers(opt.get("lr_multipliers", ""))
    for key, ok, expected in (("b1", 0 <= float(opt.b1) < 1, "0 <= b1 < 1"), ("b2", 0 <= float(opt.b2) < 1, "0 <= b2 < 1"),
                              ("eps", float(opt.eps) >= 0, ">= 0"), ("weight_decay", float(opt.weight_decay) >= 0, ">= 0"),
                              ("grad_clip", float(opt.grad_clip) >= 0, ">= 0 (0 = no clipping)"),
                              ("end_lr_fraction", float(opt.end_lr_fraction) >= 0, ">= 0"),
                              ("learning_rate", float(opt.learning_rate) >= 0, ">= 0")):
        if not ok:  # NaN fails these comparisons too
            raise JaxftError(f"optimizer.{key}={opt[key]}: expected {expected}")


def check_grpo(config) -> None:
    """GRPO's settings, and a schedule that saves only where a batch of completions is used up (a
    resumed run draws the same completions only from such a step)."""
    from jaxft import grpo, ppo, rewards

    s = ppo.settings(config.train) if config.data.task == "ppo" else grpo.settings(config.train)
    rewards.load(s.rewards, s.reward_weights)
    for key in ("train.steps", "checkpoint.every_steps"):
        if int(get(config, key)) % s.iterations:
            raise JaxftError(f"{key}={get(config, key)}: expected a multiple of train.grpo_iterations={s.iterations} "
                             "(checkpoints are made where a batch of completions is used up)")
