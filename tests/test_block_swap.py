"""
model/block_swap.py on CPU (host to host, and through the disk store): a LoRA forward + backward of the image and
video DiTs with 0, half or all of their blocks swapped gives bit-identical outputs and LoRA gradients, with and
without gradient checkpointing, one or several blocks per group, a quantized base; no_grad sampling is identical;
train_image.py / train_video.py follow the same loss curve with block swap or group offload; bad values fail at start.
"""
import pytest
import torch

import train_image
import train_video
from model.block_swap import BlockSwap, execution_order
from model.dit_image import ImageDiTConfig, LongCatImageDiT, image_position_ids, text_position_ids
from model.dit_video import LongCatVideoDiT, VideoDiTConfig
from model.lora import LONGCAT_IMAGE_LORA_TARGETS, LONGCAT_VIDEO_LORA_TARGETS, apply_lora, lora_parameters
from quant.convert import quantize_model
from tests import test_train_image, test_train_video
from tests.test_train_image import args as image_args, losses
from tests.test_train_video import args as video_args

image_world = test_train_image.world  # the tiny checkpoints and synthetic data, built once per module
video_world = test_train_video.world
IMAGE = dict(in_channels=64, num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
             joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])
VIDEO = dict(in_channels=16, out_channels=16, hidden_size=64, depth=4, num_heads=4, caption_channels=32, mlp_ratio=4,
             adaln_tembed_dim=32, frequency_embedding_size=24, patch_size=[1, 2, 2])


def perturbed(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every weight away from its init (zero gates, unit norms), LoRA B included
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def image_dit(targets=LONGCAT_IMAGE_LORA_TARGETS, quant=None):
    torch.manual_seed(0)
    dit = LongCatImageDiT(ImageDiTConfig(**IMAGE))
    if quant:
        quantize_model(dit, quant)
    apply_lora(dit, targets, rank=4, alpha=4)
    return perturbed(dit).train()


def video_dit(targets=LONGCAT_VIDEO_LORA_TARGETS):
    torch.manual_seed(0)
    dit = LongCatVideoDiT(VideoDiTConfig.from_dict(VIDEO))
    apply_lora(dit, targets, rank=4, alpha=4)
    return perturbed(dit).train()


def image_inputs():
    g = torch.Generator().manual_seed(1)
    L, h, w = 5, 4, 4
    return (torch.randn(2, h * w, 64, generator=g), torch.randn(2, L, 32, generator=g), torch.tensor([0.3, 0.8]),
            image_position_ids(h, w, offset=L), text_position_ids(L)), {}


def video_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 2, 4, 4, generator=g)
    t = torch.tensor([[0.0, 300.0], [0.0, 700.0]])
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    return (x, t, torch.randn(2, 6, 32, generator=g), mask), {"num_cond_latents": 1}


def step(dit, inputs, ckpt: bool):
    """(output, [LoRA gradients]) of one forward + backward; the DiT's weights are then checked in place."""
    dit.gradient_checkpointing = ckpt
    for p in lora_parameters(dit):
        p.grad = None
    out = dit(*inputs[0], **inputs[1])
    out.square().mean().backward()
    return out.detach(), [p.grad for p in lora_parameters(dit)]


def assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert torch.equal(out_a, out_b)
    assert len(grads_a) == len(grads_b) and all(torch.equal(x, y) for x, y in zip(grads_a, grads_b))


CASES = [("image", image_dit, image_inputs), ("video", video_dit, video_inputs)]


@pytest.mark.parametrize("kind,make,inputs", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
def test_lora_step_is_bit_identical(kind, make, inputs, ckpt, tmp_path):
    """N = half / all, stores cpu / disk, 1 or 2 blocks per group: the same output and LoRA gradients as no swap,
    over two steps (the second starts from the slots the first left behind)."""
    ref = step(make(), inputs(), ckpt)
    K = len(execution_order(make()))
    for n, store, per_group in [(K // 2, "cpu", 1), (K, "disk", 1), (K - 1, "cpu", 2)]:
        dit = make()
        swap = BlockSwap(dit, n, "cpu", store=store, path=str(tmp_path / "swap.bin"), blocks_per_group=per_group)
        assert_same(step(dit, inputs(), ckpt), ref)
        assert_same(step(dit, inputs(), ckpt), ref)
        swap.close()
    assert not (tmp_path / "swap.bin").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("store,use_stream", [("cpu", True), ("disk", True), ("cpu", False)])
def test_cuda_side_stream_matches_no_swap(store, use_stream, tmp_path):
    """CUDA: pinned host or disk store through pinned staging, copies on a side stream (events) or on the compute
    stream. Compared with a tolerance: SDPA's CUDA backward need not be deterministic; a race would be far off."""
    args, kw = video_inputs()
    inputs = (tuple(a.cuda() for a in args), kw)
    ref = step(video_dit().cuda(), inputs, True)
    dit = video_dit().cuda()
    BlockSwap(dit, 4, "cuda", store=store, path=str(tmp_path / "s.bin"), use_stream=use_stream)
    for _ in range(2):
        out, grads = step(dit, inputs, True)
        torch.testing.assert_close(out, ref[0], rtol=1e-5, atol=1e-6)
        for g, r in zip(grads, ref[1]):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_weights_are_off_between_blocks_and_back_for_backward():
    """After a forward the swapped blocks' frozen tensors are empty placeholders (LoRA stays); the backward brings
    them back where the forward had them, which is what autograd's saved views of the weights need."""
    dit = video_dit()
    K = len(dit.blocks)
    BlockSwap(dit, 2, "cpu")
    args, kw = video_inputs()
    out = dit(*args, **kw)
    for i, block in enumerate(dit.blocks):
        w = block.attn.qkv.base_layer.weight
        assert (w.numel() == 0) == (i >= K - 2)
        assert block.attn.qkv.lora_A.weight.numel() > 0
    out.square().mean().backward()
    assert all(p.grad is not None for p in lora_parameters(dit))


def test_adaln_lora_and_quantized_base(tmp_path):
    """LoRA on the AdaLN modulation too (refinement-style targets) and an int8 QuantLinear base (its buffers move)."""
    targets = LONGCAT_VIDEO_LORA_TARGETS + ["adaLN_modulation.1"]
    ref = step(video_dit(targets), video_inputs(), True)
    dit = video_dit(targets)
    BlockSwap(dit, 3, "cpu", store="disk", path=str(tmp_path / "s.bin"))
    assert_same(step(dit, video_inputs(), True), ref)
    ref = step(image_dit(quant="int8-quanto"), image_inputs(), False)
    dit = image_dit(quant="int8-quanto")
    BlockSwap(dit, 5, "cpu")
    assert_same(step(dit, image_inputs(), False), ref)


@torch.no_grad()
def test_no_grad_sampling_identical(tmp_path):
    for make, inputs, n, store in [(video_dit, video_inputs, 4, "disk"), (image_dit, image_inputs, 3, "cpu")]:
        args, kw = inputs()
        ref = make().eval()(*args, **kw)
        dit = make().eval()
        BlockSwap(dit, n, "cpu", store=store, path=str(tmp_path / "s.bin"))
        for _ in range(2):
            assert torch.equal(dit(*args, **kw), ref)


def test_bad_arguments():
    dit = image_dit()
    with pytest.raises(ValueError, match="1..5"):
        BlockSwap(dit, 6, "cpu")
    with pytest.raises(ValueError, match="cpu, disk"):
        BlockSwap(dit, 2, "cpu", store="nvme")


def test_train_image_same_loss_curve(image_world, tmp_path):
    """The quickstart's group-offload flags (every block, 2 per group, here with the disk store) train the same."""
    base = losses_of(train_image.main, image_args(image_world, tmp_path / "a", max_train_steps=2))
    grouped = losses_of(train_image.main, image_args(image_world, tmp_path / "b", max_train_steps=2,
                                                     enable_group_offload=True, group_offload_blocks_per_group=2,
                                                     group_offload_use_stream=True,
                                                     group_offload_to_disk_path=str(tmp_path / "offload")))
    assert grouped == base
    assert not list((tmp_path / "offload").iterdir())  # the disk store's file is gone at the end


def test_train_video_same_loss_curve(video_world, tmp_path):
    base = losses_of(train_video.main, video_args(video_world, tmp_path / "a", max_train_steps=2))
    swapped = losses_of(train_video.main, video_args(video_world, tmp_path / "b", max_train_steps=2,
                                                     musubi_blocks_to_swap=1))
    assert swapped == base


def losses_of(main, argv):
    main(argv)
    return losses(argv[[a.startswith("--output_dir=") for a in argv].index(True)].split("=", 1)[1])


@pytest.mark.parametrize("override,message", [
    ({"musubi_blocks_to_swap": 5}, "musubi_blocks_to_swap 5: this DiT has 4 blocks"),
    ({"musubi_blocks_to_swap": -1}, "musubi_blocks_to_swap"),
    ({"musubi_blocks_to_swap": 2, "musubi_block_swap_device": "cuda:0"}, "expected one of cpu, disk"),
    ({"enable_group_offload": True, "group_offload_type": "leaf_level"}, "block_level or musubi_blocks_to_swap"),
    ({"enable_group_offload": True, "group_offload_blocks_per_group": 0}, "group_offload_blocks_per_group"),
    ({"musubi_blocks_to_swap": 2, "model_type": "full"}, "model_type lora"),
])
def test_bad_config_fails_at_start(image_world, tmp_path, capsys, override, message):
    assert train_image.cli(image_args(image_world, tmp_path / "bad", **override)) == 2
    assert message in capsys.readouterr().err
