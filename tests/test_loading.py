"""Loading released-layout folders: sharded safetensors, strict reports, BFL VAE files, flavour checks, rewrite."""
import json

import pytest
import torch
from safetensors.torch import save_file

from model.dit_image import LongCatImageDiT
from model.loading import (WeightsError, load_image_dit, load_image_vae, load_longcat_image, load_safetensors,
                           load_weights)
from model.pipeline_image import SamplingOptions, generate_t2i
from model.tiny_checkpoint import TINY_DIT, write_tiny_longcat_image


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_longcat_image(tmp_path_factory.mktemp("tiny") / "ckpt")


def shard(folder, n=3):
    """Rewrite folder's single safetensors file as n shards with a diffusers-style index."""
    sd = load_safetensors(folder)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    keys, weight_map = sorted(sd), {}
    for i in range(n):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::n]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sd


def test_sharded_transformer_loads_identically(tmp_path):
    root = write_tiny_longcat_image(tmp_path / "ckpt")
    before = load_image_dit(root / "transformer").state_dict()
    shard(root / "transformer")
    after = load_image_dit(root / "transformer").state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    (root / "transformer" / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    with pytest.raises(WeightsError, match="missing.*00002-of-00003"):
        load_image_dit(root / "transformer")


def test_mismatch_report_names_keys():
    with torch.device("meta"):
        dit = LongCatImageDiT(TINY_DIT)
    sd = {k: torch.zeros(v.shape) for k, v in dit.state_dict().items()}
    sd.pop("proj_out.bias")
    sd["extra.weight"] = torch.zeros(2)
    sd["x_embedder.weight"] = torch.zeros(3, 3)
    with pytest.raises(WeightsError) as e:
        load_weights(dit, sd, "transformer")
    msg = str(e.value)
    assert "proj_out.bias" in msg and "extra.weight" in msg and "x_embedder.weight: checkpoint (3, 3)" in msg


def test_dtype_and_strict_load(tiny):
    dit = load_image_dit(tiny / "transformer", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in dit.parameters()) and not any(p.is_meta for p in dit.parameters())


def test_bfl_single_file_vae(tiny, tmp_path):
    """A BFL-layout ae.safetensors loads through the same entry point (keys converted, [C,C,1,1] squeezed)."""
    from test_vae_image import to_bfl
    from model.tiny_checkpoint import TINY_VAE
    vae = load_image_vae(tiny / "vae")
    save_file({k: v.contiguous() for k, v in to_bfl(vae.state_dict()).items()}, str(tmp_path / "ae.safetensors"))
    vae2 = load_image_vae(tmp_path / "ae.safetensors", config=TINY_VAE)  # a single file has no config.json
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(vae.encode(x), vae2.encode(x)) and torch.equal(vae.decode(vae.encode(x)), vae2.decode(vae.encode(x)))


def test_pickle_files_are_refused(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(WeightsError, match="only .safetensors"):
        load_safetensors(tmp_path / "model.bin")


def test_edit_flavour_needs_edit_folder(tiny):
    with pytest.raises(WeightsError, match="LongCat-Image-Edit folder"):
        load_longcat_image(str(tiny), flavour="edit")


def test_missing_component_folder(tmp_path):
    root = write_tiny_longcat_image(tmp_path / "ckpt")
    import shutil
    shutil.rmtree(root / "scheduler")
    with pytest.raises(WeightsError, match="scheduler"):
        load_longcat_image(str(root))


def test_prompt_rewrite_matches_diffusers(tiny, monkeypatch):
    """enable_prompt_rewrite: the LM head rewrites the prompt first, exactly as the official pipeline does."""
    from diffusers import LongCatImagePipeline
    m = load_longcat_image(str(tiny))
    ref = LongCatImagePipeline(scheduler=_scheduler(tiny), vae=_vae(tiny), transformer=_dit(tiny),
                               text_encoder=m.text_encoder, tokenizer=m.tokenizer, text_processor=m.text_processor)
    ref.tokenizer_max_length = 8  # diffusers uses it as max_new_tokens; keep the CPU generation short
    import model.pipeline_image as pipeline_image
    original = pipeline_image.rewrite_prompts
    monkeypatch.setattr(pipeline_image, "rewrite_prompts",
                        lambda te, proc, prompts: original(te, proc, prompts, max_new_tokens=8))
    opts = SamplingOptions(num_inference_steps=2, guidance_scale=1.0, progress=False)
    ours = generate_t2i(m, "a cat", width=32, height=32, generator=torch.Generator().manual_seed(1), opts=opts,
                        rewrite=True, output="latent")
    # diffusers pads the rewritten prompt to its tokenizer_max_length, so compare through the shared prompt text
    rewritten = original(m.text_encoder, m.text_processor, ["a cat"], max_new_tokens=8)
    ref_prompt = ref.rewire_prompt("a cat", "cpu")
    assert rewritten == ref_prompt
    ref.tokenizer_max_length = 512
    want = ref(prompt=rewritten, width=32, height=32, num_inference_steps=2, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(1), enable_prompt_rewrite=False, output_type="latent").images
    assert torch.equal(ours, want)


def _scheduler(root):
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler")


def _vae(root):
    from diffusers import AutoencoderKL
    return AutoencoderKL.from_pretrained(root / "vae")


def _dit(root):
    from diffusers import LongCatImageTransformer2DModel
    return LongCatImageTransformer2DModel.from_pretrained(root / "transformer")


def test_pickle_only_qwen_text_encoder_is_refused(tmp_path, monkeypatch):
    """Issue 15 item 9: the Qwen text_encoder/ is read with use_safetensors=True; a folder with only
    pytorch_model.bin is one WeightsError line (safetensors required, how to convert), never unpickled."""
    from safetensors.torch import load_file
    root = write_tiny_longcat_image(tmp_path / "tiny")
    te = root / "text_encoder"
    for f in te.glob("*.safetensors*"):
        sd = load_file(str(f)) if f.suffix == ".safetensors" else None
        f.unlink()
    torch.save(sd, te / "pytorch_model.bin")

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load was called on a user file")
    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(WeightsError, match="safetensors is required") as e:
        load_longcat_image(root, device="cpu", dtype=torch.float32)
    assert "\n" not in str(e.value) and "pytorch_model.bin" in str(e.value)
