"""The flags every training command shares: their defaults and checks, in one place that imports nothing heavy (the
CLI builds its options from these dataclasses at start-up, and ``llamactl --help`` must stay instant)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class TrainFlags:
    """The flags every training command shares, with their defaults (a command overrides a default by declaring the
    field again). Keyword-only, so a command's own required fields (data, output ...) stay positional."""

    lr: float | None = None  # None: the command's default (the paper's)
    min_lr_ratio: float = 0.1
    warmup: int | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    save_every: int = 200
    keep: int = 2
    log_every: int = 1
    resume: bool = False
    distributed: str = "ddp"
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    dry_run: bool = False  # print the per-rank memory plan and exit
    device_memory: str | None = None  # with --dry-run: whether the plan fits this much per device ("80GB")
    world_size: int | None = None  # with --dry-run: processes to plan for (None: this run's, 1 outside torchrun)
    lora_rank: int = 0  # 0: full fine-tuning; else LoRA adapters of this rank (QLoRA over a quantized model)
    lora_alpha: float | None = None  # None: twice the rank
    lora_dropout: float = 0.05
    lora_targets: str = "all"  # "all" or a comma list of wq,wk,wv,wo,w1,w2,w3
    adapter: str | None = None  # an adapter (adapter.safetensors) on the model: continued with --lora-rank, else merged
    tensorboard: str | None = None  # a TensorBoard log directory that gets the metrics rows too
    argv: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class FinetuneFlags(TrainFlags):
    """The flags of the stages that fine-tune a checkpoint on JSONL records (sft, train-rm); a command restates a
    field to change its default (the paper's for that stage)."""

    model: str
    data: str
    output: str
    seq_len: int = 4096  # capped by the model's context
    batch_size: int = 8  # records (sequences, pairs) per micro-batch per process
    global_batch_size: int = 64  # records per optimizer step, reached by accumulation
    epochs: int = 1
    steps: int | None = None  # wins over --epochs
    val_fraction: float = 0.0
    eval_every: int = 0  # 0: only at the end (when there is a validation split)
    pack: bool = True

    def validate(self) -> None:
        """Every flag problem and unusable input or output, as one UserError."""
        from llamactl.errors import UserError
        from llamactl.files import check_output, input_problem, overlaps

        problems = flag_problems(self)
        for name in ("seq_len", "global_batch_size", "epochs"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            problems.append(f"--steps must be at least 1, got {self.steps}")
        if self.warmup is not None and self.warmup < 0:
            problems.append(f"--warmup must be >= 0, got {self.warmup}")
        if not 0 <= self.val_fraction < 1:
            problems.append(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        for path, what in ((self.model, "checkpoint"), (self.data, "JSONL file")):
            if problem := input_problem(path, what):
                problems.append(problem)
        if problem := check_output(self.output, "-o/--output", directory=True):
            problems.append(problem)
        problems += overlaps([("-o/--output", self.output)], [("-m/--model", self.model), ("--data", self.data)])
        problems += self.own_problems()
        if problems:
            raise UserError("; ".join(problems))

    def own_problems(self) -> list[str]:
        """A command's checks of its own flags."""
        return []


def flag_problems(cfg) -> list[str]:
    """The checks of the flags every training command shares (by their config field names), one message each."""
    problems = []
    for name in ("batch_size", "eval_batches", "log_every"):
        if hasattr(cfg, name) and getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("eval_every", "save_every", "keep", "weight_decay", "grad_clip"):
        if getattr(cfg, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.lr is not None and cfg.lr <= 0:
        problems.append(f"--lr must be positive, got {cfg.lr}")
    if cfg.tensorboard is not None:
        problems += tensorboard_problems(cfg.tensorboard)
    if not 0 <= cfg.min_lr_ratio <= 1:
        problems.append(f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.distributed not in ("ddp", "fsdp"):
        problems.append(f"--distributed {cfg.distributed!r} is not one of ddp, fsdp")
    if cfg.dtype not in ("auto", "fp32", "bf16"):
        problems.append(f"--dtype {cfg.dtype!r}: training runs in fp32 or bf16 autocast (auto picks)")
    if cfg.lora_rank < 0:
        problems.append(f"--lora-rank must be >= 0, got {cfg.lora_rank}")
    if cfg.lora_alpha is not None and cfg.lora_alpha <= 0:
        problems.append(f"--lora-alpha must be positive, got {cfg.lora_alpha}")
    if not 0 <= cfg.lora_dropout < 1:
        problems.append(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.lora_rank:
        from llamactl.errors import UserError
        from llamactl.lora import parse_targets

        try:
            parse_targets(cfg.lora_targets)
        except UserError as e:
            problems.append(str(e))
    if cfg.device_memory is not None and not cfg.dry_run:
        problems.append("--device-memory goes with --dry-run (it says whether the plan fits)")
    if cfg.world_size is not None and not cfg.dry_run:
        problems.append("--world-size goes with --dry-run (torchrun sets a run's processes)")
    if cfg.world_size is not None and cfg.world_size < 1:
        problems.append(f"--world-size must be at least 1, got {cfg.world_size}")
    return problems


@dataclass(kw_only=True)
class SamplingFlags:
    """The flags of every command that samples from a model (chat, gatt-augment; Meta's chat defaults)."""

    max_new_tokens: int = 512
    temperature: float = 0.6  # llama/generation.py's chat_completion: temperature 0.6, top-p 0.9
    top_p: float = 0.9
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    timings: bool = False  # one line on stderr at the end: load, prompt and decode tokens/s
    compile: str = "auto"  # the decode step compiled: auto (where the run repays it), always, never
    argv: list[str] | None = None


def sampling_problems(cfg) -> list[str]:
    """The checks of the sampling flags (by their config field names, ``top_k`` where a command has it)."""
    problems = []
    if cfg.max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be at least 1, got {cfg.max_new_tokens}")
    if cfg.temperature < 0:
        problems.append(f"--temperature must be >= 0, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        problems.append(f"--top-p must be in (0, 1], got {cfg.top_p}")
    if getattr(cfg, "top_k", 0) < 0:
        problems.append(f"--top-k must be >= 0, got {cfg.top_k}")
    if cfg.batch_size < 1:
        problems.append(f"--batch-size must be at least 1, got {cfg.batch_size}")
    problems += compile_problems(cfg.compile)
    return problems


def compile_problems(mode: str, flag: str = "--compile") -> list[str]:
    from llamactl.compiled import MODES

    return [] if mode in MODES else [f"{flag} must be one of {', '.join(MODES)}, got {mode!r}"]


def tensorboard_problems(log_dir: str) -> list[str]:
    """--tensorboard DIR: a directory that can be written, and TensorBoard's package to write it with."""
    import importlib.util

    from llamactl.files import check_output

    problems = []
    if importlib.util.find_spec("tensorboard") is None:
        problems.append("--tensorboard needs the tensorboard package (pip install 'llamactl[tensorboard]')")
    if problem := check_output(log_dir, "--tensorboard", directory=True):
        problems.append(problem)
    return problems
