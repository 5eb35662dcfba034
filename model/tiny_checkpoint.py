"""
Write a tiny random LongCat-Image (or -Edit, or -Video) checkpoint folder in the release's layout, offline.

    python -m model.tiny_checkpoint runs/tiny-longcat-image [--edit] [--seed 0]
    python -m model.tiny_checkpoint runs/tiny-longcat-video --video

The folder has the same files as the release (model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
text_processor/, scheduler/), written with our own modules and configs in diffusers' format, so the real loading
code runs and diffusers itself can open the folder too. The architecture is LongCat's at toy width: 2 double +
2 single blocks, 4 heads x 16, a 4-level 16-channel KL VAE (8x down), a 2-layer Qwen2.5-VL with a 64-d hidden state
and a small byte-level BPE tokenizer with the Qwen2.5 special tokens. Used by the README demo and by the tests.
"""
import argparse
from pathlib import Path

import torch

from model.dit_image import ImageDiTConfig, LongCatImageDiT
from model.flow import FlowSchedulerConfig
from model.loading import save_module_folder, write_json
from model.tiny_qwen import save_tiny_text_stack
from model.vae_image import ImageVAE, ImageVAEConfig

TINY_DIT = ImageDiTConfig(in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                          num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64,
                          axes_dims_rope=[4, 6, 6])
TINY_VAE = ImageVAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=16,
                          norm_num_groups=8, sample_size=256)
LONGCAT_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                     "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                     "max_image_seq_len": 4096, "time_shift_type": "exponential"}


def write_tiny_longcat_image(root, edit: bool = False, seed: int = 0, dit_cfg=TINY_DIT, vae_cfg=TINY_VAE) -> Path:
    """Random weights from `seed`; a fresh call with the same arguments writes identical files."""
    root = Path(root)
    assert FlowSchedulerConfig.from_dict(LONGCAT_SCHEDULER)  # the written scheduler is one we load
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit, vae = LongCatImageDiT(dit_cfg), ImageVAE(vae_cfg)
    save_module_folder(dit, root / "transformer", dit_cfg.to_dict())
    save_module_folder(vae, root / "vae", vae_cfg.to_dict())
    save_tiny_text_stack(root, hidden_size=dit_cfg.joint_attention_dim, seed=seed)
    write_json(root / "scheduler" / "scheduler_config.json", LONGCAT_SCHEDULER)
    pipeline = "LongCatImageEditPipeline" if edit else "LongCatImagePipeline"
    write_json(root / "model_index.json", {
        "_class_name": pipeline, "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "text_processor": ["transformers", "Qwen2VLProcessor"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "LongCatImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]})
    return root


TINY_VIDEO_DIT = dict(in_channels=16, out_channels=16, hidden_size=64, depth=2, num_heads=4, caption_channels=64,
                      mlp_ratio=4, adaln_tembed_dim=32, frequency_embedding_size=32, patch_size=[1, 2, 2])
TINY_VIDEO_VAE = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                      temperal_downsample=[False, True, True])
LONGCAT_VIDEO_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                           "shift": 12.0, "use_dynamic_shifting": False}


def write_tiny_longcat_video(root, seed: int = 0) -> Path:
    """dit/ vae/ text_encoder/ tokenizer/ scheduler/ of LongCat-Video at toy width (the release's layout)."""
    from model.dit_video import LongCatVideoDiT, VideoDiTConfig
    from model.tiny_umt5 import save_tiny_umt5
    from model.vae_video import VideoVAE, VideoVAEConfig
    root = Path(root)
    dit_cfg, vae_cfg = VideoDiTConfig(**TINY_VIDEO_DIT), VideoVAEConfig(**TINY_VIDEO_VAE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit, vae = LongCatVideoDiT(dit_cfg), VideoVAE(vae_cfg)
        with torch.no_grad():  # the release's init zeroes the output layers: give the toy model some signal
            for p in dit.parameters():
                if not p.any():
                    p.normal_(0, 0.02)
    save_module_folder(dit, root / "dit", dit_cfg.to_dict())
    save_module_folder(vae, root / "vae", vae_cfg.to_dict())
    save_tiny_umt5(root, d_model=dit_cfg.caption_channels, seed=seed)
    write_json(root / "scheduler" / "scheduler_config.json", LONGCAT_VIDEO_SCHEDULER)
    return root


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--edit", action="store_true", help="mark it as a LongCat-Image-Edit checkpoint")
    ap.add_argument("--video", action="store_true", help="a LongCat-Video folder instead")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.video:
        print(f"wrote {write_tiny_longcat_video(args.out, args.seed)}")
    else:
        print(f"wrote {write_tiny_longcat_image(args.out, args.edit, args.seed)}")
