"""sfumato: text-to-image diffusion from scratch.

The package is layered (see ARCHITECTURE.md): ``diffusion`` (schedules, denoisers, samplers) depends on
torch only; ``models`` holds the networks; ``text`` the tokenizer; ``checkpoints`` file formats;
``pipelines`` inference; ``training`` the training loop; ``cli`` and ``server`` the interfaces.
"""

__version__ = "0.1.0"


def load(path, **kwargs):
    """``pipe = sfumato.load(path)``: a `StableDiffusion` or `CLIPPipeline`; see `sfumato.pipelines.load`."""
    from sfumato.pipelines import load as _load

    return _load(path, **kwargs)
