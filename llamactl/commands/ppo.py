"""``llamactl ppo``: RLHF by Proximal Policy Optimization against Llama 2's hybrid safety/helpfulness reward.

Each iteration samples one answer per prompt from the policy (through the generation engine), scores it with the
reward models, and takes one gradient step per minibatch of the clipped PPO objective, all on the one training loop
(``llamactl.training.loop.fit``): the loop's steps are the minibatches, and a ``PPOTask`` makes an iteration's
rollouts when the loop asks for the first minibatch of that iteration.

Reward, as the paper's section 3.2.3: R_c = R_s if the prompt is a safety prompt (``"is_safety": true``) or
sigmoid(R_s) < 0.15, else R_h; R~_c = WHITEN(LOGIT(R_c)) over the iteration's samples; and per token the penalty
-beta * (log pi(y_t) - log pi_0(y_t)) against the frozen reference policy, R~_c added at the answer's last token.
Advantages by GAE on a value model initialised from the helpfulness reward model (the paper does not say what its
value model starts from; the helpfulness model already reads answers as the reward does, so its first values are
on the reward's scale instead of noise). Checkpoints are taken at iteration boundaries only (``--save-every`` counts
iterations): the rollouts of an iteration are then regenerated on resume from the restored policy with the same
seeded generator, which is what makes a resumed run repeat the uninterrupted one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from llamactl.errors import UserError
from llamactl.flags import TrainFlags

# Llama 2, section 3.2.3: AdamW (0.9, 0.95, eps 1e-5), weight decay 0.1, gradient clipping 1.0, constant learning
# rate 1e-6; 512 prompts an iteration, minibatches of 64, one gradient step per minibatch; PPO clip 0.2; KL penalty
# 0.01 (0.005 for the 34B and 70B models).
DEFAULT_LR = 1e-6
DEFAULT_BETA, DEFAULT_BETA_LARGE = 0.01, 0.005


@dataclass(kw_only=True)
class PPOConfig(TrainFlags):
    model: str
    rm: str
    prompts: str
    output: str
    safety_rm: str | None = None
    rm_adapter: str | None = None  # an adapter on --rm (the value model starts from the merged reward model)
    safety_rm_adapter: str | None = None
    iterations: int = 1
    prompts_per_iteration: int = 512
    minibatch_size: int = 64
    batch_size: int = 8  # samples per micro-batch per process (a minibatch is reached by accumulation)
    max_new_tokens: int = 256
    temperature: float = 1.0  # on-policy: the ratio's old log-probs are the policy's own at temperature 1
    top_p: float = 1.0
    kl_beta: float | None = None  # None: the paper's for the model's size
    clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    value_coef: float = 0.5
    gen_batch_size: int = 16  # prompts generated (and scored) at once
    compile_decode: str = "auto"  # the rollouts' decode step compiled: auto, always, never (--compile: training's)
    save_every: int = 1  # iterations between checkpoints
    eval_every: int = 0  # not a flag of ppo (its figures are logged every iteration)

    def validate(self) -> None:
        from llamactl.files import check_output, input_problem, overlaps
        from llamactl.flags import compile_problems, flag_problems

        problems = flag_problems(self) + compile_problems(self.compile_decode, "--compile-decode")
        for name in ("iterations", "prompts_per_iteration", "minibatch_size", "max_new_tokens", "gen_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.prompts_per_iteration % self.minibatch_size:
            problems.append(f"--prompts-per-iteration {self.prompts_per_iteration} is not a multiple of "
                            f"--minibatch-size {self.minibatch_size}")  # fmt: skip
        if self.kl_beta is not None and self.kl_beta < 0:
            problems.append(f"--kl-beta must be >= 0, got {self.kl_beta}")
        for name, lo, hi in (("clip", 0, 1), ("gamma", 0, 1), ("lam", 0, 1), ("top_p", 0, 1)):
            value = getattr(self, name)
            if not lo < value <= hi:
                problems.append(f"--{name.replace('_', '-')} must be in ({lo}, {hi}], got {value}")
        if self.temperature <= 0:
            problems.append(f"--temperature must be > 0 (PPO samples from the policy), got {self.temperature}")
        if self.value_coef < 0:
            problems.append(f"--value-coef must be >= 0, got {self.value_coef}")
        if self.distributed != "ddp":
            # each rank samples its own prompts, so ranks decode different numbers of steps: FSDP2's per-block
            # all-gathers in generation would pair up across ranks wrongly (or wait forever)
            problems.append("ppo runs data-parallel (--distributed ddp): sampling under FSDP2 would need every rank "
                            "to decode in lockstep")  # fmt: skip
        inputs = [("-m/--model", self.model, "checkpoint"), ("--rm", self.rm, "checkpoint"),
                  ("--prompts", self.prompts, "prompts JSONL file")]  # fmt: skip
        if self.safety_rm is not None:
            inputs.append(("--safety-rm", self.safety_rm, "checkpoint"))
        for flag, path in (("--adapter", self.adapter), ("--rm-adapter", self.rm_adapter),
                           ("--safety-rm-adapter", self.safety_rm_adapter)):  # fmt: skip
            if path is not None:
                inputs.append((flag, path, "adapter"))
        if self.safety_rm_adapter is not None and self.safety_rm is None:
            problems.append("--safety-rm-adapter goes with --safety-rm")
        if self.rm_adapter is not None and self.lora_rank:
            problems.append("--rm-adapter with --lora-rank: the value model's adapters need a base file; merge the "
                            "reward model's adapter first (convert --rm --merge-adapter)")  # fmt: skip
        for flag, path, what in inputs:
            if problem := input_problem(path, what):
                problems.append(f"{flag} {problem}")
        if problem := check_output(self.output, "-o/--output", directory=True):
            problems.append(problem)
        problems += overlaps([("-o/--output", self.output)], [(f, p) for f, p, _ in inputs])
        if problems:
            raise UserError("; ".join(problems))


def run_settings(cfg: PPOConfig, beta: float, lr: float) -> dict:
    keys = ("prompts_per_iteration", "minibatch_size", "max_new_tokens", "temperature", "top_p", "clip", "gamma",
            "lam", "value_coef", "weight_decay", "grad_clip", "iterations")  # fmt: skip
    return {**{k: getattr(cfg, k) for k in keys}, "seed": cfg.seed, "kl_beta": beta, "lr": lr}


# ------------------------------------------------------------------------------------------------ the command


def run(cfg: PPOConfig) -> dict:
    from llamactl import compiled
    from llamactl.checkpoint import CheckpointMeta, load_tensors, make_lineage
    from llamactl.config import rope_bytes
    from llamactl.loading import read_checked_meta
    from llamactl.ppo import ActorCritic, AdaptersOff, encode_prompts
    from llamactl.reward import Scorer
    from llamactl.tokenizer import Tokenizer
    from llamactl.training import distributed, lifecycle
    from llamactl.training.tasks import PPOTask

    cfg.validate()
    base = read_checked_meta(cfg.model, "lm", "as the policy ppo trains", train=not cfg.lora_rank)
    # the value model starts from --rm's weights and is trained
    rm_meta = read_checked_meta(cfg.rm, None, "as the value model ppo starts from --rm", need_tokenizer=False,
                                train=not cfg.lora_rank)  # fmt: skip
    if cfg.dry_run:  # a step: the policy's log-probs, the value model's scores, the reference's (without LoRA)
        from dataclasses import replace

        value_args = rm_meta.args  # a scalar head (an --rm-adapter may give a language model one)
        if value_args.head == "lm":
            value_args = replace(value_args, head="scalar", tie_embeddings=False)
        parts = [
            lifecycle.memory_part(cfg, base.args, base.quant, "logprobs"),
            lifecycle.memory_part(cfg, value_args, rm_meta.quant),
        ]
        if not cfg.lora_rank:
            parts.append(lifecycle.memory_part(cfg, base.args, None, "logprobs", frozen=True))
        seq = min(base.args.max_seq_len, rm_meta.args.max_seq_len)  # at most: the prompt and answer fill the context
        return lifecycle.dry_run(cfg, parts, micro_batch=cfg.batch_size, seq_len=seq, items_per_step=cfg.minibatch_size)
    policy_tensors, adapted, continued = lifecycle.base_weights(cfg, cfg.model, base, "lm", "as the policy ppo trains")
    d, device, say, use_bf16 = lifecycle.start(cfg, "ppo")
    if cfg.prompts_per_iteration % d.world or cfg.minibatch_size % (cfg.batch_size * d.world):
        raise UserError(f"--minibatch-size {cfg.minibatch_size} is not a multiple of --batch-size x processes = "
                        f"{cfg.batch_size * d.world}")  # fmt: skip
    infer_dtype = "bf16" if use_bf16 else "fp32"
    help_rm = Scorer(cfg.rm, device, infer_dtype, cfg.gen_batch_size, adapter=cfg.rm_adapter)
    help_rm.check_fits(base.tokenizer, cfg.model, "--rm")
    if help_rm.role == "safety":
        say(f"--rm {cfg.rm} is a safety reward model; it is used as the helpfulness one")
    safety_rm = None
    if cfg.safety_rm is not None:
        safety_rm = Scorer(cfg.safety_rm, device, infer_dtype, cfg.gen_batch_size, adapter=cfg.safety_rm_adapter)
        safety_rm.check_fits(base.tokenizer, cfg.model, "--safety-rm")
    tok = Tokenizer(base.tokenizer, cfg.model)
    context = min(base.args.max_seq_len, help_rm.context, safety_rm.context if safety_rm else help_rm.context)
    prompts = encode_prompts(cfg.prompts, tok, context, cfg.max_new_tokens)
    large = base.args.num_params() > 30e9  # the paper's 34B and 70B models
    beta = cfg.kl_beta if cfg.kl_beta is not None else DEFAULT_BETA_LARGE if large else DEFAULT_BETA
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR
    steps_per_iteration = cfg.prompts_per_iteration // cfg.minibatch_size
    steps = cfg.iterations * steps_per_iteration
    accum = cfg.minibatch_size // (cfg.batch_size * d.world)
    settings = run_settings(cfg, beta, lr)
    value_meta = help_rm.meta
    inputs = [cfg.model, cfg.rm, cfg.prompts] + ([cfg.adapter] if cfg.adapter else [])
    lineage = make_lineage("ppo", cfg.argv or sys.argv[1:], inputs, parent=adapted.lineage)
    value_tensors = load_tensors(cfg.rm)
    if cfg.rm_adapter is not None:  # the value model starts from the reward model the adapter makes
        from llamactl.loading import merged_tensors
        from llamactl.lora import read_adapter

        rm_adapter, rm_adapter_tensors = read_adapter(cfg.rm_adapter)
        value_tensors = merged_tensors(value_tensors, rm_meta, rm_adapter, rm_adapter_tensors, cfg.rm)
    policy = lifecycle.trainee(cfg, cfg.model, CheckpointMeta(adapted.args, base.tokenizer, lineage), base,
                               policy_tensors, use_bf16, "policy.", continued=continued)  # fmt: skip
    value_out_meta = CheckpointMeta(value_meta.args, value_meta.tokenizer, dict(lineage), "value")
    value_file = "value-adapter.safetensors" if cfg.lora_rank else "value.safetensors"
    value = lifecycle.trainee(cfg, cfg.rm, value_out_meta, rm_meta, value_tensors, use_bf16, "value.", value_file)
    tasks = []

    def make_task() -> PPOTask:
        if cfg.lora_rank:  # the reference policy is the frozen base: the policy with its adapters off, no copy
            reference = AdaptersOff(policy.model)
        else:  # the starting weights, frozen (fp32, run under the same autocast)
            reference = lifecycle.meta_model(adapted.args, None, cfg.model)
            distributed.materialize(reference, {"": policy_tensors}, cfg.seed, device)
            reference.eval().requires_grad_(False)
        # the rollouts' decode step, compiled where the run repays it (not frozen: the policy's weights change)
        compiled.enable(policy.model, cfg.compile_decode, cfg.iterations * cfg.prompts_per_iteration // d.world
                        * cfg.max_new_tokens, cfg.gen_batch_size, fixed_weights=False)  # fmt: skip
        tasks.append(PPOTask(cfg, prompts, (policy.model, value.model, reference), (help_rm, safety_rm), d, device,
                             beta, use_bf16))  # fmt: skip
        say(f"{len(prompts)} prompts; {cfg.iterations} iterations of {cfg.prompts_per_iteration} samples, "
            f"{steps_per_iteration} steps each; KL beta {beta}")  # fmt: skip
        return tasks[0]

    spec = lifecycle.RunSpec(
        command="ppo", flags=cfg, output=cfg.output, args=base.args, parts=[policy, value],
        module=ActorCritic(policy.model, value.model), settings=settings, steps=steps, task=make_task,
        # one optimizer step a minibatch; a constant learning rate (Llama 2); checkpoints between iterations only
        loop=dict(accum=accum, lr=lr, warmup=0, bf16=use_bf16, unit="samples", units_per_step=cfg.minibatch_size,
                  min_lr_ratio=1.0, save_every=cfg.save_every * steps_per_iteration, eval_every=0),
        memory_what="training a policy and a value model", memory_source=cfg.model,
        extra_bytes=2 * rope_bytes(base.args),
    )  # fmt: skip
    result = lifecycle.train(spec, d, device)
    if "stopped" not in result:  # --resume of a finished run
        return result
    task = tasks[0]
    last = task.history[-1] if task.history else {}
    if last:
        say(f"iteration {last['iteration']}: reward {last['reward_raw']:.4f}, KL {last['kl']:.4f}; policy in "
               f"{cfg.output}/{lifecycle.output_name(cfg)}")  # fmt: skip
    iterations = result["step"] // steps_per_iteration
    return {"step": result["step"], "checkpoint": result["checkpoint"], "iterations": iterations, **last}
