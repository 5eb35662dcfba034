"""
What every training script shares once its data and models are loaded: the options common to image and video runs,
their checks, and a `Trainer` that owns the trainable parameters (LoRA or full, fp32 master weights, an optional
quantized frozen base), DDP or FSDP2 (distributed_strategy), the optimizer and LR schedule, EMA, exact resume, the
optimizer step (clipping, EMA, the loss averaged over ranks, metrics.jsonl), atomic checkpoints (sharded under FSDP:
checkpoint_sharded.py) and the export of the result.

    trainer = Trainer(cfg, dit, dist, lora_targets=LONGCAT_IMAGE_LORA_TARGETS, max_steps=max_steps)
    step = trainer.resume(gen, sampler)                   # 0, or the step of the checkpoint it restored
    while step < max_steps:
        lr = trainer.begin_step(step)
        for micro in range(cfg.gradient_accumulation_steps):
            with trainer.sync(micro == cfg.gradient_accumulation_steps - 1), autocast:
                loss = my_loss(trainer.model, ...)        # trainer.model: DDP wrapper / the DiT sharded in place
            trainer.backward(loss)
        step, loss = trainer.end_step(step, lr)           # clip, step, EMA, mean over ranks, metrics, checkpoint
    trainer.export()                                      # LoRA files (diffusers/PEFT, ComfyUI, ...) or a model folder

The training scripts keep what differs (data, caches, the objective, validation) and read as the story of a run.
"""
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from tqdm import tqdm

from config import ConfigError


@dataclass
class TrainConfig:
    """SimpleTuner option names and defaults (specs/simpletuner_compat.md §3) shared by train_image and train_video;
    each script subclasses it with its own model and data options (and may change a default)."""
    model_type: str = "lora"  # lora | full
    model_family: str = ""
    model_flavour: str = "final"
    pretrained_model_name_or_path: Optional[str] = None
    base_model_precision: str = "no_change"  # no_change | bf16 | fp32 | int8-*/fp8-* (ours) | int8-bnb | nf4-bnb
    text_encoder_1_precision: str = "no_change"  # the same values, for the text encoder that fills the prompt cache
    quantize_modulation: bool = False  # 8/4-bit base: quantize the per-block AdaLN linears too (quant.convert.dit_skip)
    data_backend_config: str = "config/multidatabackend.json"
    output_dir: str = "output"
    seed: int = 42
    # batches and steps
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 0  # 0: num_train_epochs decides
    num_train_epochs: int = 1
    # optimizer and schedule
    optimizer: str = "adamw_bf16"
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    lr_num_cycles: float = 1.0
    lr_power: float = 0.8
    lr_end: float = 4e-7
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.01
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 2.0
    grad_clip_method: str = "value"  # value | norm (SimpleTuner's default is value)
    mixed_precision: str = "bf16"  # bf16 | no; bf16 autocast on GPU, fp32 on CPU
    gradient_checkpointing: bool = True
    # block swap (model/block_swap.py): the last N blocks' frozen weights streamed in per block, forward and backward
    musubi_blocks_to_swap: int = 0
    musubi_block_swap_device: str = "cpu"  # cpu (pinned host memory) | disk (a file in output_dir)
    enable_group_offload: bool = False  # the quickstarts' flags: every block swapped, blocks_per_group at a time
    group_offload_type: str = "block_level"  # leaf_level is not supported
    group_offload_blocks_per_group: int = 1
    group_offload_use_stream: bool = False  # CUDA: copies on a side stream (musubi_blocks_to_swap always uses one)
    group_offload_to_disk_path: Optional[str] = None  # the disk store, in this folder instead of host memory
    distributed_strategy: str = "ddp"  # ddp | fsdp: FSDP2 shards a full fine-tune's weights, grads, optimizer state
    fsdp_enable: bool = False  # SimpleTuner's switch: true means distributed_strategy fsdp
    use_ema: bool = False
    ema_decay: float = 0.995
    # LoRA
    lora_rank: int = 16
    lora_alpha: Optional[float] = None  # None: = rank
    lora_dropout: float = 0.1
    lora_init_type: str = "default"  # default | gaussian
    peft_lora_target_modules: Optional[list] = None  # None: the official LoRA set of the model
    init_lora: Optional[str] = None
    # objective
    caption_dropout_probability: float = 0.1
    flow_schedule_shift: float = 3.0
    flow_sigmoid_scale: float = 1.0
    flow_use_uniform_schedule: bool = False
    latent_sample_mode: str = "sample"  # sample (official trainer) | mode: how cached posteriors become latents
    # data defaults for every dataset that does not set them (SimpleTuner global flags)
    aspect_bucket_alignment: int = 64
    resolution: Optional[float] = None
    resolution_type: Optional[str] = None
    caption_strategy: Optional[str] = None
    instance_prompt: Optional[str] = None
    minimum_image_size: Optional[float] = None
    maximum_image_size: Optional[float] = None
    target_downsample_size: Optional[float] = None
    crop: Optional[bool] = None
    crop_style: Optional[str] = None
    crop_aspect: Optional[str] = None
    cache_dir_vae: Optional[str] = None
    vae_batch_size: int = 4
    # SimpleTuner options that would change what is trained and that this version does not implement: accepted only
    # at their neutral value, so a config that relies on them fails at start-up instead of training something else
    lora_type: str = "standard"
    use_dora: bool = False
    loss_type: str = "l2"
    flow_use_beta_schedule: bool = False
    flow_custom_timesteps: Optional[str] = None
    train_text_encoder: bool = False
    pretrained_transformer_model_name_or_path: Optional[str] = None
    pretrained_vae_model_name_or_path: Optional[str] = None
    deepspeed_config: Optional[str] = None
    # checkpoints
    checkpoint_step_interval: int = 500
    checkpoints_total_limit: int = 5
    resume_from_checkpoint: Optional[str] = "latest"
    lora_format: str = "diffusers"  # the main export; a ComfyUI copy is always written too
    # validation
    validation_prompt: Optional[str] = None
    validation_negative_prompt: str = ""
    validation_resolution: Optional[str] = None
    validation_guidance: float = 4.5
    validation_num_inference_steps: int = 30
    validation_seed: int = 42
    validation_step_interval: int = 100
    num_validation_images: int = 1
    validation_using_datasets: bool = False
    eval_dataset_id: Optional[str] = None
    validation_disable: bool = False
    # print the expected peak memory (memory_estimate.py) from the config.json files alone, and exit
    estimate_memory: bool = False


ALIASES = {"checkpointing_steps": "checkpoint_step_interval", "validation_steps": "validation_step_interval"}
NOT_YET = dict(lora_type="standard", use_dora=False, loss_type="l2", flow_use_beta_schedule=False,
               flow_custom_timesteps=None, train_text_encoder=False, pretrained_transformer_model_name_or_path=None,
               pretrained_vae_model_name_or_path=None, deepspeed_config=None)

# start-up ranges of the numeric options (config.check_ranges): one line naming key, value and range when outside
TRAIN_BOUNDS = dict(
    seed="[0, 18446744073709551615]", train_batch_size="[1, 65536]", gradient_accumulation_steps="[1, 1000000]",
    max_train_steps="[0, 1e12]", num_train_epochs="[0, 1e9]", learning_rate="(0, 1e3]", lr_warmup_steps="[0, 1e12]",
    lr_num_cycles="(0, 1e6]", lr_power="[0, 1e3]", lr_end="[0, 1e3]", adam_beta1="[0, 1)", adam_beta2="[0, 1)",
    adam_weight_decay="[0, 1e3]", adam_epsilon="(0, 1]", max_grad_norm="(0, 1e12]", musubi_blocks_to_swap="[0, 1e6]",
    group_offload_blocks_per_group="[1, 1e6]", ema_decay="[0, 1]", lora_rank="[1, 65536]", lora_alpha="(0, 1e9]",
    lora_dropout="[0, 1)", caption_dropout_probability="[0, 1]", flow_schedule_shift="(0, 1e6]",
    flow_sigmoid_scale="(0, 1e6]", aspect_bucket_alignment="[1, 65536]", resolution="(0, 1e9]",
    minimum_image_size="[0, 1e9]", maximum_image_size="(0, 1e9]", target_downsample_size="(0, 1e9]",
    vae_batch_size="[1, 65536]", checkpoint_step_interval="[0, 1e12]", checkpoints_total_limit="[-1, 1e9]",
    validation_guidance="[0, 1e3]", validation_num_inference_steps="[1, 10000]", validation_seed="[0, 1.8e19]",
    validation_step_interval="[0, 1e12]", num_validation_images="[1, 10000]")


def uses_fsdp(cfg: TrainConfig) -> bool:
    return cfg.distributed_strategy == "fsdp" or cfg.fsdp_enable


def check_common(cfg: TrainConfig, script: str):
    """Start-up checks of the shared options: anything wrong here fails before a model is loaded. The one change it
    makes: FSDP over several processes turns validation off (with a note)."""
    from config import check_output_dir, check_ranges
    from optim import OPTIMIZERS, check_optimizer_options
    from quant.convert import check_precision
    check_ranges(cfg, TRAIN_BOUNDS)  # before anything else: one line naming the key, the value and the range
    check_output_dir(cfg.output_dir)
    choices = dict(model_type=("lora", "full"), grad_clip_method=("value", "norm"),
                   mixed_precision=("bf16", "no", "fp16"), latent_sample_mode=("sample", "mode"),
                   lora_init_type=("default", "gaussian"), lora_format=("diffusers", "comfyui", "peft"),
                   distributed_strategy=("ddp", "fsdp"))
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key} {getattr(cfg, key)!r}: expected one of {', '.join(allowed)}")
    try:
        quantized = check_precision(cfg.base_model_precision) is not None
        check_precision(cfg.text_encoder_1_precision, "text_encoder_1_precision")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.quantize_modulation and not quantized:
        raise ConfigError("quantize_modulation needs an 8/4-bit base_model_precision (e.g. int8-quanto), got "
                          f"{cfg.base_model_precision!r}")
    if quantized and cfg.model_type != "lora":
        raise ConfigError(f"base_model_precision {cfg.base_model_precision} freezes the base in 8/4 bits: it needs "
                          "model_type lora")
    if uses_fsdp(cfg) and cfg.model_type != "full":
        raise ConfigError("distributed_strategy fsdp (fsdp_enable) shards a full fine-tune: it needs model_type full "
                          "(LoRA's few trainable weights train with distributed_strategy ddp)")
    if uses_fsdp(cfg) and OPTIMIZERS.get(cfg.optimizer) == "adamw8bit":
        raise ConfigError(f"optimizer {cfg.optimizer}: bitsandbytes' 8-bit state cannot be sharded by FSDP; use adamw "
                          "with distributed_strategy fsdp")
    if uses_fsdp(cfg) and int(os.environ.get("WORLD_SIZE", 1)) > 1 and not cfg.validation_disable:
        from distributed import print0  # rank 0 renders alone, and alone it cannot run a sharded model
        print0("note: no validation images under distributed_strategy fsdp (validation_disable set); render the "
               "exported model folder with validate.py")
        cfg.validation_disable = True
    for key, neutral in NOT_YET.items():
        if getattr(cfg, key) != neutral:
            raise ConfigError(f"{key}={getattr(cfg, key)!r} is not supported by this version of {script} "
                              f"(remove it or set {neutral!r})")
    check_block_swap(cfg)
    from data.buckets import check_alignment
    try:
        check_alignment(cfg.aspect_bucket_alignment)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.lora_alpha is not None and cfg.lora_alpha <= 0:
        raise ConfigError(f"lora_alpha must be > 0 (or unset, meaning lora_rank), got {cfg.lora_alpha}")
    if cfg.validation_num_inference_steps < 1 or cfg.num_validation_images < 1:
        raise ConfigError("validation_num_inference_steps and num_validation_images must be >= 1")
    if cfg.init_lora and (cfg.model_type != "lora" or not os.path.exists(cfg.init_lora)):
        raise ConfigError(f"init_lora {cfg.init_lora!r}: " + ("needs model_type lora" if cfg.model_type != "lora"
                                                              else "file not found"))
    if OPTIMIZERS.get(cfg.optimizer) == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(f"optimizer {cfg.optimizer} needs bitsandbytes (pip install bitsandbytes)") from None
    if cfg.mixed_precision == "fp16":
        raise ConfigError("mixed_precision fp16 is not supported for LongCat (it overflows); use bf16 or no")
    for key in ("train_batch_size", "gradient_accumulation_steps", "lora_rank", "vae_batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if not 0 <= cfg.caption_dropout_probability <= 1:
        raise ConfigError("caption_dropout_probability must be in [0, 1]")
    if cfg.max_train_steps <= 0 and cfg.num_train_epochs <= 0:
        raise ConfigError("set max_train_steps or num_train_epochs to a positive number")
    check_optimizer_options(cfg.optimizer, cfg.lr_scheduler)


def check_block_swap(cfg: TrainConfig):
    """musubi_blocks_to_swap / musubi_block_swap_device and the quickstarts' group-offload flags (the block count is
    checked against the DiT by make_block_swap)."""
    from model.block_swap import STORES
    if cfg.musubi_blocks_to_swap < 0:
        raise ConfigError(f"musubi_blocks_to_swap must be >= 0, got {cfg.musubi_blocks_to_swap}")
    if cfg.musubi_block_swap_device not in STORES:
        raise ConfigError(f"musubi_block_swap_device {cfg.musubi_block_swap_device!r}: expected one of "
                          f"{', '.join(STORES)} (disk: a file in output_dir, for runs short of host RAM)")
    if cfg.group_offload_type not in ("block_level", "leaf_level"):
        raise ConfigError(f"group_offload_type {cfg.group_offload_type!r}: expected block_level")
    if cfg.group_offload_blocks_per_group < 1:
        raise ConfigError(f"group_offload_blocks_per_group must be >= 1, got {cfg.group_offload_blocks_per_group}")
    if not swaps_blocks(cfg):
        return
    if cfg.enable_group_offload and cfg.group_offload_type == "leaf_level":
        raise ConfigError("group_offload_type leaf_level is not supported: use block_level or musubi_blocks_to_swap")
    if cfg.enable_group_offload and cfg.musubi_blocks_to_swap:
        raise ConfigError("set musubi_blocks_to_swap or enable_group_offload, not both (they are the same mechanism)")
    if cfg.model_type != "lora":
        raise ConfigError("musubi_blocks_to_swap / enable_group_offload stream the frozen base weights: they need "
                          "model_type lora")
    if cfg.base_model_precision.endswith("-bnb"):
        raise ConfigError(f"block swap does not move bitsandbytes layers ({cfg.base_model_precision}); use "
                          "int8-quanto or fp8-torchao for a quantized base")


def swaps_blocks(cfg: TrainConfig) -> bool:
    """Block swap on: make_block_swap moves only the resident part of the DiT (loaded into host memory by the
    scripts) to the device, so a DiT larger than the accelerator never has to fit on it whole."""
    return bool(cfg.musubi_blocks_to_swap or cfg.enable_group_offload)


def make_block_swap(cfg: TrainConfig, dit: torch.nn.Module, dist, log: Callable = print):
    """The BlockSwap the config asks for, or None. musubi_blocks_to_swap N: the last N blocks, one at a time, copies
    on a side stream; enable_group_offload (block_level): every block, group_offload_blocks_per_group at a time."""
    from model.block_swap import BlockSwap, execution_order
    if not swaps_blocks(cfg):
        return None
    total = len(execution_order(dit))
    if cfg.musubi_blocks_to_swap > total:
        raise ConfigError(f"musubi_blocks_to_swap {cfg.musubi_blocks_to_swap}: this DiT has {total} blocks")
    n, per_group, stream = cfg.musubi_blocks_to_swap, 1, True
    if cfg.enable_group_offload:
        n, per_group, stream = total, cfg.group_offload_blocks_per_group, cfg.group_offload_use_stream
        log(f"enable_group_offload (block_level) runs as block swap: all {total} blocks, {per_group} per group")
    store = "disk" if cfg.group_offload_to_disk_path else cfg.musubi_block_swap_device
    name = "block_swap.bin" if dist.world_size == 1 else f"block_swap-rank{dist.rank}.bin"
    path = os.path.join(cfg.group_offload_to_disk_path or cfg.output_dir, name)
    swap = BlockSwap(dit, n, dist.device, store=store, path=path, blocks_per_group=per_group, use_stream=stream)
    dit.to(dist.device)  # the blocks that stay resident and the rest of the DiT; the swapped ones are in the store
    log(f"block swap: the last {n} of {total} blocks ({sum(swap.sizes) / 2 ** 30:.2f} GiB of frozen weights) live "
        f"in {path if store == 'disk' else 'host memory'}; {swap.nslots} resident buffer(s) of "
        f"{max(swap.sizes) / 2 ** 20:.1f} MiB")
    return swap


def quantize_text_encoder(cfg: TrainConfig, text_encoder, log: Callable = print) -> dict:
    """text_encoder_1_precision: quantize the text encoder's linears in place before it fills the prompt cache (a 7B
    Qwen2.5-VL or 5.7B umT5 in 8 bits). Returns what the prompt cache must key on ({} when nothing changed)."""
    from quant.convert import TEXT_ENCODER_SKIP, quantize_model
    swapped = quantize_model(text_encoder, cfg.text_encoder_1_precision, skip=TEXT_ENCODER_SKIP)
    if not swapped:
        return {}
    log(f"text_encoder_1_precision={cfg.text_encoder_1_precision}: {len(swapped)} text-encoder linear layers quantized")
    return {"text_encoder_precision": cfg.text_encoder_1_precision}


def run_cli(main, argv, script: str) -> int:
    """main(argv) with bad input turned into a one-line reason on stderr and exit status 2 (no traceback)."""
    from checkpoint import CorruptCheckpoint
    from data.cache import CacheError
    from data.discovery import DataError
    from model.loading import WeightsError
    try:
        main(argv)
    except (ConfigError, DataError, WeightsError, CorruptCheckpoint, CacheError, ValueError, OSError) as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        return 2
    return 0


def caption_variants(sample) -> list:
    """A sample's captions: several for a multi-line caption file, one otherwise ("" when it has none)."""
    return sample.caption if isinstance(sample.caption, list) else [sample.caption or ""]


def compute_dtypes(cfg: TrainConfig, device: torch.device):
    """(weight dtype of the frozen parts, autocast context): bf16 weights and autocast on GPU, fp32 on CPU."""
    on_gpu = device.type == "cuda"
    weight_dtype = torch.float32 if (not on_gpu or cfg.base_model_precision == "fp32") else torch.bfloat16
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu and cfg.mixed_precision == "bf16"
                else nullcontext())
    return weight_dtype, autocast


class Trainer:
    """The trainable state of one run and everything done to it between the losses (module docstring)."""

    def __init__(self, cfg: TrainConfig, dit: torch.nn.Module, dist, *, lora_targets: list, max_steps: int,
                 lora_exports: Optional[dict] = None, full_folder: str = "transformer", log: Callable = print):
        """lora_exports: {format: name tail} of the LoRA files export() writes besides cfg.lora_format, e.g.
        {"comfyui": "_comfyui"} -> pytorch_lora_weights_comfyui.safetensors; full_folder: where a full fine-tune goes."""
        from model.lora import apply_lora, load_lora
        from optim import make_optimizer
        from quant.convert import dit_skip, precision_note, quantize_model
        self.cfg, self.dit, self.dist, self.log, self.max_steps = cfg, dit, dist, log, max_steps
        self.lora_exports, self.full_folder = lora_exports or {}, full_folder
        if precision_note(cfg.base_model_precision):
            swapped = quantize_model(dit, cfg.base_model_precision, skip=dit_skip(cfg.quantize_modulation),
                                     device=dist.device)  # layer by layer: the DiT waited on the host (scripts)
            log(f"{precision_note(cfg.base_model_precision)} ({len(swapped)} linear layers quantized"
                f"{', AdaLN included' if cfg.quantize_modulation else ''})")
        if cfg.model_type == "lora":
            torch.manual_seed(cfg.seed)  # the same LoRA init on every rank
            adapted = apply_lora(dit, cfg.peft_lora_target_modules or lora_targets, rank=cfg.lora_rank,
                                 alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, init=cfg.lora_init_type)
            if cfg.init_lora:
                load_lora(cfg.init_lora, dit)
            log(f"LoRA rank {cfg.lora_rank} alpha {cfg.lora_alpha or cfg.lora_rank} on {len(adapted)} modules")
        else:
            dit.requires_grad_(True)
        torch.manual_seed(cfg.seed + dist.rank)  # the global RNG feeds only LoRA dropout: a different mask per rank
        for p in dit.parameters():  # trainable weights are kept in fp32 (master weights); autocast does the rest
            if p.requires_grad:
                p.data = p.data.float()
        dit.gradient_checkpointing = cfg.gradient_checkpointing
        dit.train()
        self.trainable = {n: p for n, p in dit.named_parameters() if p.requires_grad}
        log(f"trainable parameters: {sum(p.numel() for p in self.trainable.values()):,}")
        self.swap = make_block_swap(cfg, dit, dist, log)  # None unless musubi_blocks_to_swap / enable_group_offload
        if self.swap is None:
            dit.to(dist.device)  # the scripts keep the DiT on the host while the caches fill
        self.model, self.fsdp = dit, uses_fsdp(cfg)  # fsdp: sharded checkpoints on any number of processes
        self.sharded = self.fsdp and dist.world_size > 1  # and weights, grads, optimizer state sharded over ranks
        if self.sharded:
            from distributed import fully_shard_blocks
            fully_shard_blocks(dit, bf16=dist.device.type == "cuda" and cfg.mixed_precision == "bf16")
            self.trainable = {n: p for n, p in dit.named_parameters() if p.requires_grad}  # the DTensor shards
        elif dist.world_size > 1:
            on_gpu = dist.device.type == "cuda"
            self.model = torch.nn.parallel.DistributedDataParallel(dit, device_ids=[dist.device.index] if on_gpu
                                                                   else None)
        self.ema = {n: p.detach().clone() for n, p in self.trainable.items()} if cfg.use_ema else None
        self.optimizer = make_optimizer(self.trainable.values(), cfg.optimizer, cfg.learning_rate,
                                        (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_weight_decay, cfg.adam_epsilon)
        self.lr_kw = dict(base_lr=cfg.learning_rate, schedule=cfg.lr_scheduler, warmup=cfg.lr_warmup_steps,
                          total=max_steps, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power, lr_end=cfg.lr_end)
        self.metrics, self.bar, self.history = None, None, []
        self._loss_sum, self._t0 = 0.0, 0.0

    # ---- resume -----------------------------------------------------------------------------------------------------
    def resume(self, gen: torch.Generator, sampler) -> int:
        """Restore the latest (or the configured) checkpoint into the weights, optimizer, EMA, the step generator and
        the sampler; returns its step (0 when starting fresh). Opens metrics.jsonl and the progress bar."""
        from checkpoint import (MetricsLogger, check_resume_config, check_resume_shapes, load_checkpoint,
                                refuse_non_finite, resolve_resume, set_aside_newer)
        from checkpoint_sharded import is_sharded, load_sharded_checkpoint
        cfg, step = self.cfg, 0
        path = resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint, log=self.log)
        check_resume_config(path, asdict(cfg), log=self.log)  # before anything is loaded: refuse what changes the model
        if path is not None:
            if is_sharded(path):  # loads in place, each rank its shards: the copies below copy tensors onto themselves
                ckpt = load_sharded_checkpoint(path, model=self.dit, optimizer=self.optimizer,
                                               model_tensors=self.trainable, log=self.log,
                                               extra_tensors={f"ema.{n}": t for n, t in (self.ema or {}).items()})
            elif self.sharded:
                raise ConfigError(f"{path} holds full weights (a distributed_strategy ddp run): resume it with ddp")
            else:
                ckpt = load_checkpoint(path, optimizer=self.optimizer, log=self.log)
            refuse_non_finite({**ckpt.model_tensors, **ckpt.extra_tensors}, path, "refusing to resume from it")
            missing = set(self.trainable) - set(ckpt.model_tensors)
            if missing:
                raise ConfigError(f"{path} does not hold this run's trainable weights (e.g. {sorted(missing)[:3]}); "
                                  "was it written with another model_type / LoRA targets?")
            check_resume_shapes(path, self.trainable, ckpt.model_tensors)
            with torch.no_grad():
                for n, p in self.trainable.items():
                    p.copy_(ckpt.model_tensors[n])
                if self.ema is not None:
                    for n in self.ema:
                        self.ema[n].copy_(ckpt.extra_tensors.get(f"ema.{n}", self.trainable[n]))
            gen.set_state(ckpt.extra_tensors["generator"])
            sampler.load_state_dict(ckpt.state["sampler"], log=self.log)
            step = ckpt.step
            set_aside_newer(cfg.output_dir, step, log=self.log)
            self.log(f"resumed from {path} at step {step}")
        self.gen, self.sampler = gen, sampler
        if self.dist.is_main:
            self.metrics = MetricsLogger(os.path.join(cfg.output_dir, "metrics.jsonl"), resume_step=step or None)
        self.bar = tqdm(total=self.max_steps, initial=step, desc="train", disable=not self.dist.is_main,
                        dynamic_ncols=True)
        return step

    # ---- one optimizer step ------------------------------------------------------------------------------------------
    def begin_step(self, step: int) -> float:
        from optim import lr_at, set_lr
        self._t0, self._loss_sum = time.time(), 0.0
        lr = lr_at(step, **self.lr_kw)
        set_lr(self.optimizer, lr)
        return lr

    def sync(self, final: bool):
        """Context for a forward + backward: DDP all-reduces (FSDP reduce-scatters) the gradients only on the step's
        `final` backward."""
        if self.sharded:
            self.model.set_requires_gradient_sync(final)
            return nullcontext()
        return nullcontext() if final or self.dist.world_size == 1 else self.model.no_sync()

    def backward(self, loss: torch.Tensor):
        (loss / self.cfg.gradient_accumulation_steps).backward()
        self._loss_sum = self._loss_sum + loss.detach()

    def end_step(self, step: int, lr: float) -> tuple:
        """Clip, optimizer step, EMA, the loss averaged over micro-batches and ranks, metrics and progress, and a
        checkpoint when one is due. Returns (step + 1, loss)."""
        from checkpoint import (check_step_finite, estimate_checkpoint_bytes, guarded_checkpoint_write,
                                peak_memory_bytes, poison_non_finite_grads)
        from distributed import all_reduce_mean
        cfg = self.cfg
        norm = {}
        self._loss_sum, grads_ok = poison_non_finite_grads(self._loss_sum, self.trainable.values())
        if cfg.grad_clip_method == "norm":  # on FSDP's DTensor shards too: the global norm, replicated on every rank
            total = torch.nn.utils.clip_grad_norm_(self.trainable.values(), cfg.max_grad_norm)
            norm["grad_norm"] = (total.to_local() if hasattr(total, "to_local") else total).item()
        else:
            torch.nn.utils.clip_grad_value_(self.trainable.values(), cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                for n, p in self.trainable.items():
                    self.ema[n].lerp_(p.detach(), 1 - cfg.ema_decay)
        step += 1
        loss = all_reduce_mean(self._loss_sum / cfg.gradient_accumulation_steps).item()  # a sync point, once a step
        check_step_finite(loss, step, cfg.output_dir, self.__dict__.pop("_batch_files", []), grads_ok)
        dt = time.time() - self._t0
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", it_s=f"{1 / dt:.2f}")
        self.history.append(loss)
        if self.metrics:
            self.metrics.log(step, loss=loss, lr=lr, step_time=dt, peak_mem_bytes=peak_memory_bytes(self.dist.device),
                             epoch=self.sampler.epoch, **norm)
        if (cfg.checkpoint_step_interval > 0 and step % cfg.checkpoint_step_interval == 0) or step == self.max_steps:
            guarded_checkpoint_write(cfg.output_dir, step, lambda: self.save_checkpoint(step),
                                     estimate_checkpoint_bytes(self.trainable, self.optimizer, self.ema))
        return step, loss

    def save_checkpoint(self, step: int):
        from checkpoint import check_weights_finite, rng_state, rotate_checkpoints, save_checkpoint
        from checkpoint_sharded import save_sharded_checkpoint
        from distributed import all_gather_object
        weights = {n: p.detach() for n, p in self.trainable.items()}
        check_weights_finite({**weights, **(self.ema or {})}, step, self.cfg.output_dir, f"checkpoint-{step}")
        ema = {f"ema.{n}": t for n, t in (self.ema or {}).items()}
        common = dict(config=asdict(self.cfg), rng=all_gather_object(rng_state()) if self.dist.world_size > 1 else True,
                      state={"sampler": self.sampler.state_dict(), "epoch": self.sampler.epoch})
        if self.fsdp:  # every rank writes its own shards of the weights, EMA and optimizer state
            path = save_sharded_checkpoint(self.cfg.output_dir, step, model=self.dit, optimizer=self.optimizer,
                                           tensors={**{f"model.{n}": t for n, t in weights.items()}, **ema},
                                           extra_tensors={"generator": self.gen.get_state()}, **common)
        else:
            path = save_checkpoint(self.cfg.output_dir, step, model_tensors=weights, optimizer=self.optimizer,
                                   extra_tensors={"generator": self.gen.get_state(), **ema}, **common)
        if self.dist.is_main:
            rotate_checkpoints(self.cfg.output_dir, self.cfg.checkpoints_total_limit, keep=path, log=self.log)

    def note_batch(self, batch):
        """Remember the sample paths of this step's batches (named if the loss turns non-finite); returns batch."""
        self.__dict__.setdefault("_batch_files", []).extend(getattr(s, "path", "?") for s in batch)
        return batch

    # ---- the end ----------------------------------------------------------------------------------------------------
    def finish(self):
        """Close the bar, print the loss trend, export the result (rank 0), close metrics.jsonl and remove the block
        swap file."""
        from checkpoint import release_output_dir
        self.bar.close()
        n = min(20, len(self.history) // 2)
        if n:
            self.log(f"loss: mean of the first {n} steps {sum(self.history[:n]) / n:.4f} -> "
                     f"last {n} {sum(self.history[-n:]) / n:.4f}")
        if self.dist.is_main or self.sharded:  # FSDP: every rank takes part in gathering the full weights
            self.export()
        if self.metrics:
            self.metrics.close()
        if self.swap:
            self.swap.close()
        release_output_dir(self.cfg.output_dir)

    def export(self):
        """LoRA: cfg.lora_format plus the extra layouts (a ComfyUI copy, ...); full: a loadable model folder.
        With EMA, the EMA weights are exported too (suffix _ema) through the same writers. Under FSDP every rank
        calls it and rank 0 writes the full tensors gathered to it."""
        from checkpoint import atomic_save_safetensors, check_weights_finite
        from distributed import gather_full_state
        from model.loading import save_module_folder, write_json
        from model.lora import save_lora
        cfg, dit = self.cfg, self.dit
        check_weights_finite({**self.trainable, **(self.ema or {})}, self.bar.n, cfg.output_dir, "the export")
        for suffix, weights in [("", None)] + ([("_ema", self.ema)] if self.ema else []):
            if weights:  # write the EMA weights through the same exporters, then put the trained ones back
                trained = {n: p.detach().clone() for n, p in self.trainable.items()}
                with torch.no_grad():
                    for n, p in self.trainable.items():
                        p.copy_(weights[n])
            if cfg.model_type == "lora":
                exports = {cfg.lora_format: "", **self.lora_exports}  # one file when lora_format is one of the extras
                for fmt, tail in exports.items():
                    ext = "" if fmt == "peft" else ".safetensors"
                    path = os.path.join(cfg.output_dir, f"pytorch_lora_weights{suffix}{tail}{ext}")
                    self.log(f"wrote {save_lora(path, dit, format=fmt)}")
            else:
                folder = os.path.join(cfg.output_dir, self.full_folder + suffix)
                if not self.sharded:
                    save_module_folder(dit, folder, dit.cfg.to_dict())
                else:  # save_module_folder's layout, from the gathered tensors
                    state = gather_full_state(dit)
                    if self.dist.is_main:
                        write_json(os.path.join(folder, "config.json"), dit.cfg.to_dict())
                        atomic_save_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"), state)
                self.log(f"wrote {folder}")
            if weights:
                with torch.no_grad():
                    for n, p in self.trainable.items():
                        p.copy_(trained[n])
