"""
One config loader for every script: dataclass defaults < `--config file.json` < `--key value` / `--key=value` flags.

Keys are SimpleTuner's option names, so a SimpleTuner `config.json` works as is: keys may be written with or without
the leading `--` (SimpleTuner accepts both), and `//` comments are allowed (the quickstarts show jsonc). Strict:
  - a key that is neither ours nor a known SimpleTuner option is an error naming the key and the nearest valid one;
  - a SimpleTuner option we accept but do not use (report_to, attention_mechanism, ...) prints one warning listing them;
  - values are converted to the field's type, and a value that does not fit is an error naming the key.
"""
import dataclasses
import difflib
import json
import types
import typing


class ConfigError(ValueError):
    """Bad user configuration; the message is one line and says what to change."""


# SimpleTuner options (4.10.1) that a LongCat user may bring and that we accept; scripts list the ones they use as
# dataclass fields, the rest are reported once as ignored. See ../shared/specs/simpletuner_compat.md §3.
SIMPLETUNER_KEYS = set("""
model_type model_family model_flavour pretrained_model_name_or_path pretrained_vae_model_name_or_path
pretrained_transformer_model_name_or_path pretrained_transformer_subfolder pretrained_t5_model_name_or_path
lora_type lora_rank lora_alpha lora_dropout lora_init_type use_dora peft_lora_target_modules lora_format init_lora
init_lora_step base_model_precision quantize_via base_model_default_dtype text_encoder_1_precision vae_dtype
attention_mechanism aspect_bucket_alignment tokenizer_max_length framerate train_batch_size
gradient_accumulation_steps max_train_steps num_train_epochs strict_epoch_limit learning_rate lr_scheduler
lr_warmup_steps lr_num_cycles lr_power lr_end optimizer optimizer_config adam_beta1 adam_beta2 adam_weight_decay
adam_epsilon max_grad_norm grad_clip_method mixed_precision gradient_checkpointing gradient_checkpointing_interval
gradient_checkpointing_backend seed use_ema ema_decay ema_device ema_update_interval ema_validation
caption_dropout_probability noise_offset noise_offset_probability snr_gamma loss_type flow_schedule_shift
flow_schedule_auto_shift flow_sigmoid_scale flow_use_uniform_schedule flow_use_beta_schedule flow_beta_schedule_alpha
flow_beta_schedule_beta flow_custom_timesteps flow_cubic_schedule_weights disable_segmented_timestep_sampling
data_backend_sampling disable_bucket_pruning allow_dataset_oversubscription musubi_blocks_to_swap
musubi_block_swap_device ramtorch ramtorch_target_modules ramtorch_transformer_percent offload_during_startup
vae_batch_size vae_enable_tiling vae_enable_slicing vae_cache_ondemand vae_cache_disable text_cache_ondemand
text_cache_disable compress_disk_cache enable_group_offload group_offload_type group_offload_blocks_per_group
group_offload_use_stream fsdp_enable deepspeed_config output_dir checkpoint_step_interval checkpointing_steps
checkpoint_epoch_interval checkpoints_total_limit checkpointing_rolling_steps checkpoints_rolling_total_limit
resume_from_checkpoint delete_invalid_checkpoints validation_step_interval validation_steps validation_epoch_interval
validation_prompt validation_negative_prompt validation_prompt_library user_prompt_library validation_resolution
validation_guidance validation_guidance_rescale validation_num_inference_steps validation_num_video_frames
validation_seed validation_randomize num_validation_images validation_disable_unconditional validation_disable
validation_using_datasets eval_dataset_id validation_multigpu validation_preview evaluation_type num_eval_images
eval_steps_interval report_to tracker_project_name tracker_run_name push_to_hub hub_model_id push_checkpoints_to_hub
data_backend_config instance_prompt resolution resolution_type minimum_image_size maximum_image_size
target_downsample_size crop crop_style crop_aspect caption_strategy cache_dir cache_dir_vae cache_dir_text
logging_dir disable_benchmark validation_torch_compile allow_tf32 dataloader_prefetch
aws_config train_text_encoder override_dataset_config is_i2v
""".split())


def strip_json_comments(text: str) -> str:
    """Drop `// ...` comments outside strings, and the trailing commas they leave (the quickstarts write jsonc)."""
    out, in_str, esc, i = [], False, False, 0
    while i < len(text):
        ch = text[i]
        if in_str:
            esc, in_str = (not esc and ch == "\\"), in_str and (esc or ch != '"')
        elif ch == '"':
            in_str = True
        elif text.startswith("//", i):
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        elif ch in "}]":
            j = len(out)
            while j and out[j - 1].isspace():
                j -= 1
            if j and out[j - 1] == ",":
                del out[j - 1]
        out.append(ch)
        i += 1
    return "".join(out)


def read_json_config(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.loads(strip_json_comments(f.read()))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def parse_argv(argv) -> dict:
    """`--key value`, `--key=value` and bare boolean `--flag` into a dict of strings (or True)."""
    out, i = {}, 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r}: options look like --key value or --key=value")
        key, eq, val = tok[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                val, i = argv[i + 1], i + 1
            else:
                val = True
        out[key.replace("-", "_")] = val
        i += 1
    return out


def _convert(key, value, typ):
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _convert(key, value, args[0])
    if value is None:
        raise ConfigError(f"{key}: null is not allowed here")
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return value if isinstance(value, str) else json.dumps(value)
        if origin is list or typ is list:
            if isinstance(value, str):
                value = json.loads(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            return list(value)
        if origin is dict or typ is dict:
            return json.loads(value) if isinstance(value, str) else dict(value)
    except (ValueError, TypeError, OverflowError, json.JSONDecodeError):
        pass
    else:
        return value
    raise ConfigError(f"{key}: {value!r} is not a valid {getattr(typ, '__name__', typ)}")


def load_config(cls, argv, extra_known=SIMPLETUNER_KEYS, aliases=None, quiet=False):
    """Build a `cls` dataclass from argv (which may name `--config file.json`). Returns the instance."""
    aliases = aliases or {}
    cli = parse_argv(list(argv))
    raw = {}
    if "config" in cli:
        path = cli.pop("config")
        data = read_json_config(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object of option names to values")
        raw.update({k.lstrip("-").replace("-", "_"): v for k, v in data.items()})
    raw.update(cli)

    flds = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values, ignored = {}, []
    for key, val in raw.items():
        key = aliases.get(key, key)
        if key in flds:
            values[key] = _convert(key, val, hints[key])
        elif key in extra_known:
            ignored.append(key)
        else:
            near = difflib.get_close_matches(key, list(flds) + sorted(extra_known), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"unknown option {key!r}{hint}")
    if ignored and not quiet:
        print(f"note: accepted but not used by this script: {', '.join(sorted(ignored))}")
    return cls(**values)


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _interval(spec: str):
    """'[0, 1)' -> (0.0, 1.0, lo_open=False, hi_open=True); 'inf' for an open end."""
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    return lo, hi, spec[0] == "(", spec[-1] == ")"


def check_ranges(cfg, bounds: dict):
    """Start-up range check of numeric options: bounds maps a key to an interval such as '[0, 1)', '(0, inf)';
    None values (unset options) pass. A value outside (or NaN / infinite) is one ConfigError naming the key, the
    value and the allowed range."""
    import math
    for key, spec in bounds.items():
        val = getattr(cfg, key, None)
        if val is None or isinstance(val, bool):
            continue
        lo, hi, lo_open, hi_open = _interval(spec)
        ok = (isinstance(val, (int, float)) and math.isfinite(val) and (val > lo if lo_open else val >= lo)
              and (val < hi if hi_open else val <= hi))
        if not ok:
            raise ConfigError(f"{key} {val!r} is out of range: allowed {spec}")


def check_output_dir(path):
    """An output_dir that exists as a file fails at start-up, before any model is loaded."""
    import os
    if path and os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"output_dir {path} is a file, not a folder")
