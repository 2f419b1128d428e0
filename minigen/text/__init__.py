"""Text side of SD1.x and SDXL: CLIP tokenizers, token spans, text encoders and prompt encoding."""
