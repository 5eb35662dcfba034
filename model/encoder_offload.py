"""
Encoder offload. The text encoder (7B Qwen2.5-VL / 5.7B umT5) and the VAE fill the prompt and latent caches and render
validation samples; a training step never touches them (it reads the caches). So once the caches are built they leave
the accelerator, and when no validation will need them they leave memory altogether.

    offload = EncoderOffload(m, device, needed_later=validation_on, log=print0)
    offload.park()                    # after caching: host memory (validation on) or freed (validation off)
    with offload.on_device():         # a validation render: back on the accelerator, parked again afterwards
        render(m, ...)

Freeing moves the modules to the meta device: their weights are released but the objects (and their configs) stay,
so `vae.normalize`, which the training loop uses on cached latents, keeps working: it reads only the VAE config.
"""
from contextlib import contextmanager

import torch

ENCODERS = ("text_encoder", "vae")


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.nbytes for t in [*module.parameters(), *module.buffers()] if t.device.type != "meta")


class EncoderOffload:
    def __init__(self, models, device: torch.device, *, needed_later: bool, log=print):
        """models: the loaded bundle (model.loading.LongCatImage / LongCatVideo) whose text_encoder / vae move."""
        self.models, self.device, self.needed_later, self.log = models, device, needed_later, log

    def _modules(self):
        return [(name, getattr(self.models, name)) for name in ENCODERS]

    def park(self):
        """After caching. Validation on: to host memory (a no-op on a CPU run). Validation off: weights freed."""
        target = "cpu" if self.needed_later else "meta"
        moved = 0
        for name, module in self._modules():
            if target == "meta" or next(module.parameters()).device.type != "cpu":
                moved += _bytes(module)
                module.to(target)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if moved:
            where = "moved to host memory until validation" if target == "cpu" else "freed (no validation needs them)"
            self.log(f"encoder offload: text encoder + VAE ({moved / 2**30:.2f} GiB) {where}")

    @contextmanager
    def on_device(self):
        """The encoders on the training device for the body (validation), parked in host memory again after it."""
        if not self.needed_later:
            raise RuntimeError("the encoders were freed after caching (needed_later=False): nothing can use them")
        for _, module in self._modules():
            module.to(self.device)
        try:
            yield
        finally:
            self.park()
