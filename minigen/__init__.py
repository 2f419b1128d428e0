"""minigen: Stable Diffusion, SDXL and FLUX in plain PyTorch, with personalization controls as explicit arguments."""
