"""Text side of SD1.x, SDXL and FLUX: CLIP and T5 tokenizers, token spans, text encoders and prompt encoding."""
