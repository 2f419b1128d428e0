"""The toy world: synthetic scenes with exact ground truth, captions, a pixel judge and metrics.

    world     vocabulary, palettes, class hierarchy, held-out split, personal concepts
    scenes    Scene / ObjectSpec, sample_scene (objects anywhere, or on the canvas halves: toy-flux's world),
              render (image + masks + boxes), reference_images
    captions  templated captions whose words are tied to the objects they name
    judge     objects read back from pixels alone (shape, color, size, pattern, box, mask)
    degrade   blur, noise, colour shift, JPEG, rescaling: renders made to look generated
    metrics   prompt following, concept preservation, leakage, mask AUC, outside change
    data      the toy models' training set (rendered scenes and captions) and concept references
    pairs     reference -> target pairs (an object alone -> a scene holding it): the toy adapters' training set
    evaluate  VAE reconstruction PSNR and prompt following of a model on the held-out prompts
    reader    the reading heads that teach a toy text encoder the toy language (train_toy.py's reader stage)
    shape_probe  whether a caption's shape word decides the drawn shape (one-step estimates, swapped words)
"""
