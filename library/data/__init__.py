"""Training data as kohya defines it: dataset configs, image sources, buckets, captions, caches.

``dataset_schema`` validates ``--dataset_config`` tomls with kohya's key tables and parses their values;
``dataset_config`` resolves them and the dataset flags into blueprints; ``image_sources`` finds images
and captions; ``buckets`` and ``images`` size them; ``captions`` applies kohya's per-sample caption
processing; ``latent_cache`` keeps VAE latents in memory or in kohya's ``.npz`` files;
``bucketed_dataset`` loads one ``[[datasets]]`` entry, ``samples`` makes one sample of an image record,
``dataset_group`` turns them into batches, and ``metadata`` writes their ``ss_*`` metadata. Nothing here
knows about networks or training loops.
"""
