"""Pipelines: the parts of a model family wired into text-to-image (`sd.StableDiffusion`, `flux.FluxPipeline`)."""
