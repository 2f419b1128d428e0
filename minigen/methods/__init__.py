"""Personalization methods, each built on the explicit controls of minigen/controls.py.

    residuals            Personalized Residuals and LAG sampling (Ham et al., CVPR 2024)
    conceptrol           Conceptrol: a textual concept mask gating IP-Adapter (SD1.5/SDXL) or OminiControl (FLUX)
    ominicontrol         OminiControl's condition token groups and subject LoRA on FLUX (Conceptrol's adapter)
    concept_conductor    Concept Conductor: multipath sampling, layout alignment, concept injection (with
                         conductor_masks: the masks; edlora_training: the ED-LoRAs it composes)
    aligngen             AlignGen on FLUX: S*, the Deviation Extraction Module, the selective mask (with
                         aligngen_training)
    lora_factors         the trainable LoRA factor pairs that ED-LoRA training and AlignGen learn
"""
