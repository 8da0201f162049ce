"""sfumato: text-to-image diffusion from scratch.

The package is layered (see ARCHITECTURE.md): ``diffusion`` (schedules, denoisers, samplers) depends on
torch only; ``models`` holds the networks; ``text`` the tokenizer; ``checkpoints`` file formats;
``pipelines`` inference; ``training`` the training loop; ``cli`` and ``server`` the interfaces.
"""

__version__ = "0.1.0"
