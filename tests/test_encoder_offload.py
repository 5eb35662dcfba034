"""
Encoder offload (model/encoder_offload.py): after caching, the text encoder and VAE leave memory when no validation
needs them (moved to the meta device, configs kept so vae.normalize still works), and stay usable for validation
otherwise; a train_image.py run without validation frees them and trains exactly as before.
"""
import pytest
import torch

from model.encoder_offload import EncoderOffload
from model.loading import load_longcat_image, load_longcat_video
from model.tiny_checkpoint import write_tiny_longcat_image, write_tiny_longcat_video


def _resident_bytes(module):
    return sum(t.nbytes for t in [*module.parameters(), *module.buffers()] if t.device.type != "meta")


@pytest.mark.parametrize("family", ["image", "video"])
def test_freed_encoders_release_their_weights_and_keep_normalize(tmp_path, family):
    if family == "image":
        m = load_longcat_image(write_tiny_longcat_image(tmp_path / "m"), device="cpu", dtype=torch.float32)
        z = torch.randn(1, m.vae.config.latent_channels, 4, 4)
    else:
        m = load_longcat_video(write_tiny_longcat_video(tmp_path / "m"), device="cpu", dtype=torch.float32)
        z = torch.randn(1, m.vae.config.z_dim, 2, 4, 4)
    expected = m.vae.normalize(z)
    before = _resident_bytes(m.text_encoder) + _resident_bytes(m.vae)
    dit_bytes = _resident_bytes(m.dit)
    lines = []
    EncoderOffload(m, torch.device("cpu"), needed_later=False, log=lines.append).park()
    assert before > 0 and _resident_bytes(m.text_encoder) == 0 and _resident_bytes(m.vae) == 0
    assert _resident_bytes(m.dit) == dit_bytes  # the DiT is not an encoder
    assert "freed" in lines[0]
    torch.testing.assert_close(m.vae.normalize(z), expected, rtol=0, atol=0)  # reads the config only


def test_kept_encoders_stay_usable_for_validation(tmp_path):
    m = load_longcat_image(write_tiny_longcat_image(tmp_path / "m"), device="cpu", dtype=torch.float32)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    expected = m.vae.encode(x)
    offload = EncoderOffload(m, torch.device("cpu"), needed_later=True, log=lambda s: None)
    offload.park()  # CPU run: host memory is the device, nothing moves
    with offload.on_device():
        torch.testing.assert_close(m.vae.encode(x), expected, rtol=0, atol=0)
    freed = EncoderOffload(m, torch.device("cpu"), needed_later=False, log=lambda s: None)
    freed.park()
    with pytest.raises(RuntimeError, match="freed"):
        with freed.on_device():
            pass


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_parked_encoders_leave_the_accelerator(tmp_path):
    m = load_longcat_image(write_tiny_longcat_image(tmp_path / "m"), device="cuda", dtype=torch.bfloat16)
    offload = EncoderOffload(m, torch.device("cuda"), needed_later=True, log=lambda s: None)
    offload.park()
    assert next(m.text_encoder.parameters()).device.type == "cpu" and next(m.vae.parameters()).device.type == "cpu"
    with offload.on_device():
        assert next(m.vae.parameters()).is_cuda
    assert next(m.vae.parameters()).device.type == "cpu"
