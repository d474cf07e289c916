"""Training data: from flags to a data loader of (latents or pixels, captions).

    options.py         the data flags and their checks
    loader.py          the one entry point: flags → data set, sampler, caches, loader
    dataset.py         imagefolder / Hub loading, transforms, caption options, the data set
    caption_folder.py  caption-file folders (kohya / OneTrainer layout, `N_name` repeats)
    buckets.py         aspect-ratio buckets and the one-bucket-per-batch sampler
    cache.py           cached VAE posteriors and text embeddings, in memory or as safetensors
"""
