"""Diffusion core: schedules, denoisers (network -> denoiser + training loss), samplers, guidance. Depends on torch only."""
